"""The sweep's state on a shared storage, without Ray: the study's journal (hpo.study) and the
mirror of the sweep's records (hpo.mirror), on a local folder as an NFS mount would be. (On an
object store they run in tests/test_cluster.py, against a real S3 server.)"""

import json
import pickle
import subprocess
import sys

import optuna
import pytest

from hpo.errors import SweepError
from hpo.mirror import JOURNAL_FOLDER, MIRROR_FOLDER, SweepMirror, is_mirror, restore_sweep_folder, storage_of
from hpo.plan import SweepOptions, plan_sweep
from hpo.record import SWEEP_FILE
from hpo.study import JOURNAL, StorageJournal, copy_to_sqlite, open_storage, redact, storage_journal
from hpo.trials import JOURNAL_FILE, TRIALS_FILE, read_journal

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(spec: str, name: str = "s") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=open_storage(spec), direction="maximize",
                               load_if_exists=True)


def test_a_journal_study_is_read_back_whole_by_another_process(tmp_path):
    spec = JOURNAL + str(tmp_path / "study")
    study = _study(spec)
    for value in (0.3, 0.7):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        trial.set_user_attr("ray_trial_id", f"t{value}")
        trial.report(value / 2, 1)
        study.tell(trial, value)
    running = study.ask()  # a trial a killed driver left running
    code = ("import optuna, sys; from hpo.study import open_storage; "
            "s = optuna.load_study(study_name='s', storage=open_storage(sys.argv[1])); "
            "print([(t.state.name, t.value, t.user_attrs.get('ray_trial_id'), t.intermediate_values) "
            "for t in s.get_trials()])")
    seen = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, check=True).stdout
    assert seen.strip() == str([("COMPLETE", 0.3, "t0.3", {1: 0.15}), ("COMPLETE", 0.7, "t0.7", {1: 0.35}),
                                ("RUNNING", None, None, {})])
    assert running.number == 2
    assert len(list((tmp_path / "study").glob("*.json"))) > 3  # one object per write: no appends on an object store


def test_one_journal_per_location_in_a_process_also_when_unpickled(tmp_path):
    location = str(tmp_path / "study")
    journal = storage_journal(location)
    assert storage_journal(location) is journal
    assert pickle.loads(pickle.dumps(journal)) is journal
    # a second storage of the same place sees the first one's writes without reading the folder again
    first, second = _study(JOURNAL + location, "a"), optuna.load_study(study_name="a",
                                                                       storage=open_storage(JOURNAL + location))
    first.tell(first.ask(), 1.0)
    assert [t.value for t in second.get_trials()] == [1.0]


def test_a_write_cut_short_is_dropped_and_a_gap_is_refused(tmp_path):
    folder = tmp_path / "study"
    study = _study(JOURNAL + str(folder))
    study.tell(study.ask(), 0.5)
    objects = sorted(folder.glob("*.json"))
    count = sum(len(json.loads(p.read_text())) for p in objects)
    (folder / f"{count:012d}-deadbeef.json").write_text('[{"op_code": 4')  # a killed driver's last write
    assert StorageJournal(str(folder)).read_logs(0)[-1] == json.loads(objects[-1].read_text())[-1]
    assert not (folder / f"{count:012d}-deadbeef.json").exists()
    objects[1].unlink()  # a log missing in the middle
    with pytest.raises(SweepError, match=r"two drivers wrote this sweep at once, or an object was removed"):
        StorageJournal(str(folder)).read_logs(0)


def test_a_study_kept_elsewhere_is_copied_into_the_sweep_folder(tmp_path):
    spec = JOURNAL + str(tmp_path / "study")
    study = _study(spec)
    study.tell(study.ask(), 0.25)
    copy_to_sqlite(spec, "s", tmp_path / "optuna.db")
    copy_to_sqlite(spec, "s", tmp_path / "optuna.db")  # again, over the older copy
    copied = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.value for t in copied.get_trials()] == [0.25]


def test_the_study_copy_writes_its_file_about_once(tmp_path):
    """Optuna copies a study a transaction per trial: into a file, each rewrote its pages and
    their journal, 60 times the copy's size at 200 trials here. Written once, it costs its size."""
    spec = JOURNAL + str(tmp_path / "study")
    study = _study(spec)
    for number in range(200):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        trial.report(0.1, 1)
        study.tell(trial, number / 200)

    def written() -> int:
        return int(next(line for line in open("/proc/self/io") if line.startswith("write_bytes")).split()[1])

    before = written()
    (tmp_path / "probe").write_bytes(b"0" * 1_000_000)
    if written() - before < 1_000_000:
        pytest.skip("this filesystem's writes are not counted in /proc/self/io (a tmpfs?)")
    before = written()
    copy_to_sqlite(spec, "s", tmp_path / "optuna.db")
    size = (tmp_path / "optuna.db").stat().st_size
    assert written() - before < 3 * size, (written() - before, size)
    copied = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.value for t in copied.get_trials()] == [n / 200 for n in range(200)]
    assert copied.get_trials()[7].intermediate_values == {1: 0.1} and "lr" in copied.get_trials()[7].params


def test_an_unreachable_study_database_is_one_line_without_its_password(tmp_path):
    with pytest.raises(SweepError) as error:
        open_storage("postgresql://cmath:secret@127.0.0.1:1/nothing")
    assert "secret" not in str(error.value) and "cmath:***@127.0.0.1:1" in str(error.value)
    assert "\n" not in str(error.value)
    assert redact("sqlite:///a/b.db") == "sqlite:///a/b.db"


def test_where_the_study_and_the_mirror_live(tmp_path, tiny_path):
    options = SweepOptions(space="search_spaces/quickstart.yaml", data=str(tiny_path), results=str(tmp_path / "r"),
                           name="n", num_samples=2)
    local = plan_sweep(options)
    assert local.study_storage == JOURNAL + str((tmp_path / "r" / "n" / "ray" / "cmath_study").resolve())
    assert local.shared_state is None
    (tmp_path / "r" / "n").mkdir(parents=True)
    (tmp_path / "r" / "n" / "optuna.db").touch()  # a sweep from when optuna.db was the study itself
    assert local.study_storage == f"sqlite:///{(tmp_path / 'r' / 'n' / 'optuna.db').resolve()}"
    shared = plan_sweep(SweepOptions(**{**options.__dict__, "storage": "s3://bucket/sweeps?endpoint_override=h:1"}))
    assert shared.study_storage == JOURNAL + "s3://bucket/sweeps/n/cmath_study?endpoint_override=h:1"
    assert shared.shared_state == f"s3://bucket/sweeps/n/{MIRROR_FOLDER}?endpoint_override=h:1"
    database = plan_sweep(SweepOptions(**{**options.__dict__, "storage": str(tmp_path / "nfs"),
                                          "study_storage": "postgresql://u@h/db"}))
    assert database.study_storage == "postgresql://u@h/db"
    assert storage_of(f"s3://bucket/sweeps/n/{MIRROR_FOLDER}/?endpoint_override=h:1") == \
        "s3://bucket/sweeps?endpoint_override=h:1"


def test_the_mirror_sends_only_what_changed_and_rebuilds_the_folder(tmp_path):
    sweep_dir, target = tmp_path / "results" / "n", str(tmp_path / "nfs" / "n" / MIRROR_FOLDER)
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps({"name": "n", "status": "running"}))
    (sweep_dir / TRIALS_FILE).write_bytes(b"table v1")
    lines = [json.dumps({"trial_id": "a", "epoch": e, "val_wf1": e / 10}) + "\n" for e in (1, 2, 3)]
    (sweep_dir / JOURNAL_FILE).write_text(lines[0] + lines[1] + lines[2][:9])  # the third is being written
    mirror = SweepMirror(sweep_dir, target)
    mirror.sync()
    segments = tmp_path / "nfs" / "n" / MIRROR_FOLDER / JOURNAL_FOLDER
    assert [p.name for p in sorted(segments.iterdir())] == [f"{0:015d}.jsonl"]
    with open(sweep_dir / JOURNAL_FILE, "a") as journal:
        journal.write(lines[2][9:])
    mirror.sync()
    mirror.sync()  # nothing new: nothing sent
    assert len(list(segments.iterdir())) == 2
    # a resumed driver's mirror continues the numbering from what the storage has
    with open(sweep_dir / JOURNAL_FILE, "a") as journal:
        journal.write(json.dumps({"trial_id": "b", "epoch": 1, "val_wf1": 0.5}) + "\n")
    SweepMirror(sweep_dir, target).sync()
    assert len(list(segments.iterdir())) == 3

    assert is_mirror(str(tmp_path / "nfs" / "n")) and not is_mirror(str(tmp_path / "nfs"))
    rebuilt = restore_sweep_folder(str(tmp_path / "nfs" / "n"), tmp_path / "elsewhere")
    assert rebuilt == tmp_path / "elsewhere" / "n"
    assert (rebuilt / TRIALS_FILE).read_bytes() == b"table v1"
    assert (rebuilt / JOURNAL_FILE).read_text() == (sweep_dir / JOURNAL_FILE).read_text()
    assert {k: len(v) for k, v in read_journal(rebuilt).items()} == {"a": 3, "b": 1}
    with pytest.raises(SweepError, match=r"already holds sweep 'n'; resume it with"):
        restore_sweep_folder(str(tmp_path / "nfs" / "n"), tmp_path / "elsewhere")
    with pytest.raises(SweepError, match=r"no sweep at .*cmath_sweep/sweep.json"):
        restore_sweep_folder(str(tmp_path / "nfs"), tmp_path / "third")


def test_a_resume_from_the_storage_refuses_a_tracking_store_without_the_sweeps_runs(tmp_path, tiny_path):
    """The first driver logged to a file store on its own disk, lost with it: a resume elsewhere
    says which store the sweep needs, before anything starts."""
    from hpo.provenance import provenance
    from hpo.resume import resume_sweep

    plan = plan_sweep(SweepOptions(space="search_spaces/quickstart.yaml", data=str(tiny_path), name="lost",
                                   results=str(tmp_path / "first"), storage=str(tmp_path / "nfs"), num_samples=2))
    record = provenance(plan)
    record["mlflow"]["parent_run_id"] = "0123456789abcdef"
    plan.sweep_dir.mkdir(parents=True)
    (plan.sweep_dir / SWEEP_FILE).write_text(json.dumps(record))
    SweepMirror(plan.sweep_dir, plan.shared_state).sync()
    with pytest.raises(SweepError) as error:
        resume_sweep(str(tmp_path / "nfs" / "lost"), results=tmp_path / "second", log=lambda line: None)
    assert str(error.value) == (
        f"sweep 'lost' logged to the MLflow store {plan.tracking_uri}, and sqlite:///"
        f"{(tmp_path / 'second' / 'mlflow.db').resolve()} does not have its parent run 0123456789abcdef; pass "
        f"--mlflow-uri where that store is served (a tracking server every host reaches: docs/cluster.md)")
    assert (tmp_path / "second" / "lost" / SWEEP_FILE).exists()  # rebuilt from the mirror: resume it once fixed


def test_a_journal_mirror_with_a_part_missing_is_refused(tmp_path):
    sweep_dir, target = tmp_path / "results" / "n", str(tmp_path / "nfs" / "n" / MIRROR_FOLDER)
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps({"name": "n"}))
    mirror = SweepMirror(sweep_dir, target)
    for epoch in (1, 2, 3):
        with open(sweep_dir / JOURNAL_FILE, "a") as journal:
            journal.write(json.dumps({"trial_id": "a", "epoch": epoch}) + "\n")
        mirror.sync()
    segments = sorted((tmp_path / "nfs" / "n" / MIRROR_FOLDER / JOURNAL_FOLDER).iterdir())
    assert len(segments) == 3
    segments[1].unlink()
    with pytest.raises(SweepError, match=r"has 0+\d+\.jsonl where byte \d+ should start: two drivers wrote it"):
        restore_sweep_folder(str(tmp_path / "nfs" / "n"), tmp_path / "elsewhere")
