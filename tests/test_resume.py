"""A sweep's driver is stopped (SIGTERM, as Ctrl-C) or killed (SIGKILL, with Ray's saved state
lagging it) mid-sweep, for real, and `cmath-hpo resume` finishes it: nothing finished is rerun,
unfinished trials continue from their checkpoints, what the killed driver's Ray left running is
stopped by PID, MLflow keeps one run per trial and one parent, the Optuna study is complete. (A
kill with two trials running, resumed from another host: tests/test_cluster.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cmath_model.tracking import default_tracking_uri
from hpo.cli import main as hpo_main
from hpo.errors import SweepError
from hpo.processes import pids_using, stop
from hpo.recovery import read_ended
from hpo.resume import resume_sweep
from hpo.trials import read_journal, read_trials

EPOCHS = 8
SAMPLES = 4
SPACE = {
    "dataset": "iemocap",
    "search": {"d": {"type": "categorical", "choices": [128, 256]},
               "gamma1": {"type": "float", "low": 0.0, "high": 3.0},
               "lr": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3}},
    "fixed": {"epochs": EPOCHS, "batch_size": 4, "checkpoint_every": 2},
    "asha": {"grace_period": EPOCHS},  # no early stops: every trial must reach its last epoch
}


def _trial_results(sweep_dir):
    """The sweep's journal: {trial id: [epochs in the order the driver received them]}."""
    return {trial_id: [row["epoch"] for row in rows] for trial_id, rows in read_journal(sweep_dir).items()}


def _wait_mid_sweep(sweep_dir, process, timeout=180):
    """Until one trial has ended and another is running past a checkpoint, from the journal
    (no trial stops early here: a trial has ended once its last epoch is in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the sweep ended before it could be interrupted"
        journal = _trial_results(sweep_dir)
        ended = {name for name, epochs in journal.items() if max(epochs) == EPOCHS}
        running = [name for name, epochs in journal.items()
                   if 3 <= max(epochs) < EPOCHS and list((sweep_dir / "ray").glob(f"*{name}*/checkpoint_*"))]
        if ended and running:
            return ended
        time.sleep(0.1)
    raise AssertionError("the sweep never reached the middle")


@pytest.fixture
def launch(tmp_path, tiny_path):
    started = []

    def start(name):
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(SPACE))
        log = open(tmp_path / f"{name}.log", "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "hpo.cli", "sweep", "--space", str(space), "--data", str(tiny_path),
             "--num-samples", str(SAMPLES), "--max-concurrent", "2", "--num-cpus", "2",
             "--results", str(tmp_path / "results"), "--name", name],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        return process, tmp_path / "results" / name

    yield start
    for process in started:  # whatever happened, stop what this test started, by PID
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)


def _check_resumed(sweep_dir, results, finished_before, journal_before):
    trials = read_trials(sweep_dir)
    # A trial started after Ray's last saved state is unknown to it: the resume carries it on
    # under its own id, from its newest checkpoint (from epoch 1 if it had none): no trial is
    # lost and none is added.
    assert len(trials) == SAMPLES and set(trials["end_state"]) == {"completed"}, trials[["trial_id", "end_state"]]
    after = trials.set_index("trial_id")
    for trial_id, finished_at in finished_before.items():  # finished trials were not rerun
        assert after.loc[trial_id, "finished_at"] == finished_at

    redone = {}
    for name, epochs in _trial_results(sweep_dir).items():
        # The journal has every result the driver received, in order: no trial went back to
        # epoch 1 (but one carried on with no checkpoint to start from), and every one reached
        # its last epoch.
        assert max(epochs) == EPOCHS, f"{name} did not reach its last epoch: {epochs}"
        if "from epoch 1" in str(after.loc[name, "restore_notes"]) or max(journal_before.get(name, [0])) < 2:
            continue  # carried on with nothing to start from, or stopped before its first checkpoint (epoch 2)
        assert epochs.count(1) == 1, f"{name} restarted from epoch 1: {epochs}"
        redone[name] = int(after.loc[name, "epochs_redone"])
    # A checkpoint every 2 epochs bounds what is redone: a trial resumes from its newest usable
    # checkpoint, whichever older one Ray's lagging snapshot names (3 epochs were redone in a
    # fresh-clone run before it did so). Going back to epoch 1 is caught above.
    assert max(redone.values()) <= 2
    print(f"epochs redone per trial: {redone}")
    history = pd.read_parquet(sweep_dir / "history.parquet")
    for trial_id in trials.loc[trials["end_state"] == "completed", "trial_id"]:
        assert sorted(history.loc[history["trial_id"] == trial_id, "epoch"]) == list(range(1, EPOCHS + 1))

    client = MlflowClient(default_tracking_uri(results))
    experiment = client.get_experiment_by_name(sweep_dir.name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags["cmath.kind"] == "sweep"]
    children = [r for r in runs if r.data.tags["cmath.kind"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == len(trials) and {r.data.tags["cmath.trial_id"] for r in children} == set(trials["trial_id"])
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_wf1")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.data.tags["cmath.trial_id"], steps)
        assert run.info.status == "FINISHED" and run.data.tags["cmath.end_state"] == "completed"

    study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * SAMPLES
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["status"] == "finished" and len(record["resumes"]) == 1
    return record


def test_resume_after_ctrl_c(launch, tmp_path, free_port, capsys):
    """Stopped by SIGTERM (`ray job stop`'s first signal, a shutdown's), which the sweep turns into
    Ctrl-C: Tune's own SIGINT handler then stops it. (ray.init's SIGTERM handler had made the
    driver abort with -6.)"""
    process, sweep_dir = launch("interrupted")
    _wait_mid_sweep(sweep_dir, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    trials = read_trials(sweep_dir)
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["status"] == "incomplete"
    # Cut short: no trial left "running" in the table, and not every trial done (no ASHA stops here).
    assert set(trials["end_state"]) <= {"completed", "interrupted"}
    assert (trials["end_state"] == "completed").sum() < SAMPLES
    finished_before = trials.set_index("trial_id")["finished_at"].dropna().to_dict()
    journal_before = _trial_results(sweep_dir)
    # A clean exit waits until its private Ray is gone (a trial worker takes seconds to tear down
    # after SIGTERM, 5 s seen on a busy machine): nothing the sweep started outlives it.
    assert not pids_using(record["driver"]["ray_session_dir"])
    # resume --address joins the cluster it names, not the sweep's own Ray: one that is not there
    # is refused with one line, and nothing of the sweep changes.
    address = f"127.0.0.1:{free_port()}"
    assert hpo_main(["resume", "interrupted", "--results", str(tmp_path / "results"), "--address", address]) == 2
    assert f"error: Ray cluster at {address} is unreachable" in capsys.readouterr().err
    assert json.loads((sweep_dir / "sweep.json").read_text()) == record
    resume_sweep("interrupted", tmp_path / "results", log=lambda line: None)
    _check_resumed(sweep_dir, tmp_path / "results", finished_before, journal_before)


@pytest.mark.parametrize("stop_signal", [signal.SIGHUP, signal.SIGTERM])
def test_a_closed_terminal_or_a_shutdown_is_taken_as_ctrl_c(stop_signal):
    """What the sweep's driver sets up once it has joined Ray: SIGHUP and SIGTERM raise Ctrl-C's
    KeyboardInterrupt (Tune's own SIGINT handler, in a sweep: see test_resume_after_ctrl_c), where
    Python's defaults would end the process at once. Its own process: signal handlers are global."""
    code = ("import os, signal, sys, time\n"
            "from hpo.cluster import stop_signals_as_ctrl_c\n"
            "stop_signals_as_ctrl_c()\n"
            f"os.kill(os.getpid(), {int(stop_signal)})\n"
            "time.sleep(30)\n"
            "print('not stopped')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "KeyboardInterrupt" in done.stderr and "not stopped" not in done.stdout, done.stderr[-2000:]


def test_resume_refuses_a_finished_or_running_sweep(tmp_path):
    sweep_dir = tmp_path / "done"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "done", "status": "finished"}))
    with pytest.raises(SweepError, match="already finished"):
        resume_sweep("done", tmp_path)
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "name": "done", "status": "running",
        "driver": {"pid": os.getpid(), "cmdline": open(f"/proc/{os.getpid()}/cmdline", "rb").read()
                   .replace(b"\0", b" ").decode().strip()}}))
    from hpo.resume import stop_leftovers

    with pytest.raises(SweepError, match=f"still running \\(driver pid {os.getpid()}\\)"):
        stop_leftovers(json.loads((sweep_dir / "sweep.json").read_text()), print)
    # The same process, once it closed the record (Ctrl-C in a notebook), may resume what it stopped.
    assert stop_leftovers({**json.loads((sweep_dir / "sweep.json").read_text()), "status": "incomplete"}, print) == []


def test_a_sweep_killed_before_rays_first_snapshot_is_refused_in_one_line(tmp_path, tiny_path):
    """Killed after its Tuner was built (tuner.pkl written) but before Ray saved the experiment's
    state: Ray would restart every trial while the study keeps the first ones running. Before this
    was checked, `Tuner.can_restore` (tuner.pkl only) let it through to Ray's restore."""
    from hpo.plan import SweepOptions, plan_sweep
    from hpo.provenance import provenance

    plan = plan_sweep(SweepOptions(space="search_spaces/quickstart.yaml", data=str(tiny_path), name="early",
                                   results=str(tmp_path / "results"), num_samples=2))
    plan.sweep_dir.mkdir(parents=True)
    (plan.sweep_dir / "sweep.json").write_text(json.dumps({**provenance(plan), "driver": {"pid": 2 ** 22 + 1}}))
    experiment = plan.sweep_dir / "ray"
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(b"what the Tuner writes when it is built")
    with pytest.raises(SweepError) as error:
        resume_sweep("early", tmp_path / "results", log=lambda line: None)
    assert str(error.value) == (
        f"sweep 'early' was stopped before Ray first saved its state (no experiment_state-*.json in {experiment}), "
        f"so Ray cannot resume it; start it again with a new --name (its first trials' runs stay in MLflow)")


def test_asha_after_a_resume_stops_a_trial_below_the_rung_it_recorded_before():
    """Ray saves no scheduler state: a resumed sweep's ASHA started with empty rungs and stopped
    nothing. Rebuilt from the journal, its rung at epoch 2 holds 0.8 and 0.9, and a new trial
    at 0.1 there is stopped, as it would have been without the resume."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from hpo.tuner import rebuild_rungs

    journal = {"a": [{"epoch": e, "val_wf1": 0.8} for e in (1, 2, 3)],
               "b": [{"epoch": 1, "val_wf1": 0.7}, {"epoch": 2, "val_wf1": 0.9}, {"epoch": 2, "val_wf1": 0.9}]}
    late = Trial("CMATHTrial", config={}, trial_id="c", stub=True)

    def decision(scheduler) -> str:
        scheduler.set_search_properties("val_wf1", "max")  # as Tune does when the fit starts
        scheduler.on_trial_add(None, late)
        return scheduler.on_trial_result(None, late, {"training_iteration": 2, "val_wf1": 0.1})

    def asha():  # as hpo.tuner builds it: metric and mode come from the TuneConfig
        return ASHAScheduler(time_attr="training_iteration", max_t=8, grace_period=2, reduction_factor=2)

    assert decision(asha()) == TrialScheduler.CONTINUE  # what a resumed sweep did: nobody to compare with
    resumed = asha()
    rebuild_rungs(resumed, journal)
    assert decision(resumed) == TrialScheduler.STOP


def test_a_carried_on_trial_counts_once_at_each_rung():
    """A trial a resume carries on is a new Ray trial for a lost one, whose rungs the journal
    replay recorded under the lost id. It resumes from the lost one's last checkpoint, which can
    be older than its journal: passing a rung again, it was recorded a second time under the new
    id, and one trial counted twice in that rung's cut."""
    from ray.tune.experiment import Trial

    from hpo._compat import asha_brackets, bracket_rungs
    from hpo.placement import SweepASHA
    from hpo.recovery import CONTINUES
    from hpo.tuner import rebuild_rungs

    scheduler = SweepASHA(time_attr="training_iteration", max_t=8, grace_period=2, reduction_factor=2)
    scheduler.set_search_properties("val_wf1", "max")
    rebuild_rungs(scheduler, {"lost": [{"epoch": e, "val_wf1": 0.5} for e in (1, 2, 3, 4)],
                              "other": [{"epoch": e, "val_wf1": 0.6} for e in (1, 2, 3, 4)]})
    carried = Trial("CMATHTrial", config={CONTINUES: "lost"}, trial_id="new", stub=True)
    scheduler.on_trial_add(None, carried)
    for epoch in (3, 4):  # from its checkpoint at epoch 2, past the rung at 4 again
        scheduler.on_trial_result(None, carried, {"training_iteration": epoch, "val_wf1": 0.7})
    rungs = {milestone: dict(recorded) for milestone, recorded in bracket_rungs(asha_brackets(scheduler)[0])}
    assert rungs[4] == {"new": 0.5, "other": 0.6}  # once, as it was first recorded
    assert rungs[2] == {"new": 0.5, "other": 0.6}


def test_a_trial_is_recorded_ended_before_the_table_says_so(tmp_path, monkeypatch):
    """A driver killed while writing the table must not leave a trial that the table calls
    finished but a resume would train again: the ended record is written first."""
    from ray.tune.experiment import Trial

    from hpo.recovery import read_ended
    from hpo.table import TrialTable

    table = TrialTable(tmp_path / "sweep", base={"epochs": 2}, searched=["lr"], ended_dir=str(tmp_path / "ended"))
    trial = Trial("CMATHTrial", config={"lr": 1e-3}, trial_id="abc123", stub=True)
    table.row(trial)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(table, "write", killed)
    trial.run_metadata.last_result = {"epoch": 2, "epochs_planned": 2, "done": True}
    with pytest.raises(KeyboardInterrupt):
        table.on_trial_complete(0, [trial], trial)
    assert read_ended(str(tmp_path / "ended"), "abc123")["end_state"] == "completed"


def test_the_tables_are_written_at_most_once_a_period_and_at_the_end(tmp_path, monkeypatch):
    """Rewriting both tables at every trial's start and end cost the driver time that grew with
    the sweep; the journal takes every result at once, the tables follow within the period."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    import hpo.table
    from hpo.table import HISTORY_FILE, TrialTable

    now = [0.0]
    monkeypatch.setattr(hpo.table, "time", SimpleNamespace(monotonic=lambda: now[0], time=lambda: 1e9 + now[0]))
    table = TrialTable(tmp_path, base={"epochs": 2}, searched=["lr"], period=3600)
    trials = [Trial("CMATHTrial", config={"lr": 1e-3}, trial_id=f"t{i}", stub=True) for i in range(3)]
    scores = {"val_wf1": 0.5, "val_acc": 0.5, "test_wf1": 0.4, "test_acc": 0.4, "epoch_seconds": 1.0}
    table.on_trial_start(0, trials, trials[0])  # the first change is written at once
    assert list(read_trials(tmp_path)["trial_id"]) == ["t0"]
    table.on_trial_start(0, trials, trials[1])
    table.on_trial_result(0, trials, trials[1], {"epoch": 1, **scores})
    table.on_step_end(0, trials)
    assert list(read_trials(tmp_path)["trial_id"]) == ["t0"]  # within the period: not yet
    assert [row["epoch"] for row in read_journal(tmp_path)["t1"]] == [1]  # the journal has it at once
    now[0] = 3600.0  # the period has passed
    table.on_step_end(0, trials)
    assert list(read_trials(tmp_path)["trial_id"]) == ["t0", "t1"]
    assert list(pd.read_parquet(tmp_path / HISTORY_FILE)["trial_id"]) == ["t1"]
    table.on_trial_start(0, trials, trials[2])
    table.on_experiment_end(trials)  # and always at the end
    assert list(read_trials(tmp_path)["trial_id"]) == ["t0", "t1", "t2"]


def test_the_tables_wait_longer_as_they_grow(tmp_path, monkeypatch):
    """At a fixed period what the tables cost grows as the square of the trials: after a write,
    the next waits at least the tables' size over TABLE_BYTES_PER_S (here 100 bytes a second)."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    import hpo.table
    from hpo.table import HISTORY_FILE, TRIALS_FILE, TrialTable

    now = [0.0]
    monkeypatch.setattr(hpo.table, "time", SimpleNamespace(monotonic=lambda: now[0], time=lambda: 1e9 + now[0]))
    monkeypatch.setattr(hpo.table, "TABLE_BYTES_PER_S", 100)
    table = TrialTable(tmp_path, base={"epochs": 2}, searched=["lr"], period=10)
    trials = [Trial("CMATHTrial", config={"lr": 1e-3}, trial_id=f"t{i}", stub=True) for i in range(3)]
    table.on_trial_start(0, trials, trials[0])
    size = sum((tmp_path / name).stat().st_size for name in (TRIALS_FILE, HISTORY_FILE))
    assert size / 100 > 20, size  # so that the wait is the size's, not the period's
    now[0] = 11.0  # past the period
    table.on_trial_start(0, trials, trials[1])
    assert list(read_trials(tmp_path)["trial_id"]) == ["t0"]
    now[0] = size / 100 + 0.1
    table.on_step_end(0, trials)
    assert list(read_trials(tmp_path)["trial_id"]) == ["t0", "t1"]


def test_a_trial_ray_restores_as_ended_gets_its_row_from_ray_and_the_journal(tmp_path):
    """Seen in the killed-driver test: a trial that ended shortly before the kill was in Ray's
    restored state as ended (so it gets no event in the resumed driver) but not yet in the tables,
    which are written on a timer. Its row must come back completed, with its epochs."""
    import json as json_

    from ray.tune.experiment import Trial

    from hpo.table import JOURNAL_FILE, TrialTable

    scores = {"val_wf1": 0.5, "val_acc": 0.5, "test_wf1": 0.4, "test_acc": 0.4, "epoch_seconds": 1.0}
    (tmp_path / JOURNAL_FILE).write_text("".join(json_.dumps({"trial_id": "t0", "epoch": e, **scores}) + "\n"
                                                 for e in (1, 2)))
    from hpo.recovery import read_ended, write_ended

    # its ended record, written when it ended in the killed driver, says when
    write_ended(str(tmp_path / "ended"), "t0", {"end_state": "completed", "finished_at": 1234.5, "result": {}})
    table = TrialTable(tmp_path, base={"epochs": 2}, searched=["lr"], ended_dir=str(tmp_path / "ended"))
    table.setup()
    ended, cut = (Trial("CMATHTrial", config={"lr": 1e-3}, trial_id=t, stub=True) for t in ("t0", "t1"))
    ended.status = cut.status = Trial.TERMINATED
    ended.run_metadata.last_result = {"epoch": 2, "epochs_planned": 2, "done": True, **scores}
    cut.run_metadata.last_result = {"epoch": 1, "epochs_planned": 2, **scores}  # Ctrl-C: not done
    writes, write = [], table.write
    table.write = lambda: (writes.append(1), write())
    table.on_experiment_end([ended, cut])
    assert len(writes) == 1  # the rows it adds are written with the end's write, not each on its own
    rows = read_trials(tmp_path).set_index("trial_id")
    assert (rows.loc["t0", "end_state"], rows.loc["t0", "epochs"], rows.loc["t0", "param_lr"],
            rows.loc["t0", "best_val_wf1"]) == ("completed", 2, 1e-3, 0.5)
    assert rows.loc["t0", "finished_at"] == 1234.5  # when it ended, not when the resume saw it
    # one cut short is not over: no ended record, or a resume would replay it instead of going on
    assert rows.loc["t1", "end_state"] == "interrupted" and read_ended(str(tmp_path / "ended"), "t1") is None


def test_a_replayed_trial_the_tables_missed_keeps_when_it_ended(tmp_path):
    """A trial that ended after the tables' last write before a kill is replayed by the resumed
    driver: its row gets the end time its ended record kept, not the replay's."""
    from ray.tune.experiment import Trial

    from hpo.recovery import ENDED_AT, REPLAYED
    from hpo.table import TrialTable

    table = TrialTable(tmp_path, base={"epochs": 2}, searched=["lr"], ended_dir=str(tmp_path / "ended"))
    trial = Trial("CMATHTrial", config={"lr": 1e-3}, trial_id="t0", stub=True)
    trial.run_metadata.last_result = {"epoch": 2, "epochs_planned": 2, "done": True, REPLAYED: True, ENDED_AT: 99.0}
    table.on_trial_start(0, [trial], trial)
    table.on_trial_complete(0, [trial], trial)
    table.write()
    assert read_trials(tmp_path).set_index("trial_id").loc["t0", "finished_at"] == 99.0


def _killed_with_one_snapshot(tmp_path, tiny_path, name: str, fixed: dict, samples: int, until, what: str):
    """A sweep of `samples` trials, one at a time, with no Ray snapshot but its first (a period of
    100,000 s; a trial's checkpoints force none), whose driver is killed (SIGKILL) as soon as
    `until(sweep folder)` holds; returns the sweep's folder and its Ray session folder."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "fixed": fixed, "asha": {"grace_period": fixed["epochs"]}}))
    sweep_dir = tmp_path / "results" / name
    process = subprocess.Popen(
        [sys.executable, "-m", "hpo.cli", "sweep", "--space", str(space), "--data", str(tiny_path),
         "--num-samples", str(samples), "--max-concurrent", "1", "--num-cpus", "2",
         "--results", str(tmp_path / "results"), "--name", name],
        env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "100000"},
        stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            if until(sweep_dir):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the sweep never reached {what}")
        session = json.loads((sweep_dir / "sweep.json").read_text())["driver"]["ray_session_dir"]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    return sweep_dir, session


@pytest.mark.slow
def test_a_stale_ray_state_loses_no_trial_and_no_checkpoint(tmp_path, tiny_path):
    """Ray's saved state lags a killed driver in two ways, made deterministic here: with no
    snapshot but the first (a period of 100,000 s; a trial's checkpoints force none), a trial
    checkpointing at epochs 3, 6 and 9 ends with none of it in Ray's state but that it was
    started, and the next trial, killed between its checkpoints at 3 and 6, is missing from it
    altogether.

    The first must replay its end and keep the checkpoint it really ended with, whatever Ray's
    state names (none here; an older one, which the pruner deleted, when a snapshot came between
    its checkpoints). The second must be carried on from its epoch-3
    checkpoint under its own id (one table row, one MLflow run, one Optuna trial), not recorded
    lost while Ray runs a third trial in its place."""
    def second_trial_checkpointed(sweep_dir) -> bool:
        trial_ids = list(_trial_results(sweep_dir))
        return len(trial_ids) == 2 and any((sweep_dir / "ray").glob(f"*{trial_ids[1]}*/checkpoint_*/checkpoint.json"))

    sweep_dir, session = _killed_with_one_snapshot(
        tmp_path, tiny_path, "stale", {"epochs": 9, "batch_size": 4, "checkpoint_every": 3}, samples=2,
        until=second_trial_checkpointed, what="the second trial's epoch-3 checkpoint")
    trial_ids = list(_trial_results(sweep_dir))
    first, second = trial_ids
    before = _trial_results(sweep_dir)[second]
    assert before[-1] < 6, f"killed too late to show it: {before}"
    ray_state = "".join(p.read_text() for p in (sweep_dir / "ray").glob("experiment_state-*.json"))
    assert first in ray_state and second not in ray_state, "the second trial must be unknown to Ray's state"
    assert read_ended(str(sweep_dir / "ray" / "cmath_ended"), first)["end_state"] == "completed"
    try:
        assert pids_using(session), "expected the killed driver's Ray to leave processes behind"
        lines = []
        resume_sweep("stale", tmp_path / "results", log=lines.append)
        assert not pids_using(session)  # the resume stopped them, by PID, before it started its own Ray
        assert any("stopping" in line and "left behind" in line for line in lines)
    finally:
        stop(pids_using(session))

    trials = read_trials(sweep_dir).set_index("trial_id")
    assert sorted(trials.index) == sorted([first, second]) and set(trials["end_state"]) == {"completed"}
    assert "carries on trial" in trials.loc[second, "restore_notes"]
    epochs = _trial_results(sweep_dir)[second]  # went on from epoch 4, after its epoch-3 checkpoint
    assert epochs == before + list(range(4, 10)), epochs
    # Of each trial only the checkpoint it ended with is left, the lost trial's folder included.
    kept = sorted(str(p) for p in (sweep_dir / "ray").glob("*/checkpoint_*"))
    assert kept == sorted(row["checkpoint"].rstrip("/").rsplit("/", 1)[0] for _, row in trials.iterrows())
    for trial_id, row in trials.iterrows():
        assert os.path.exists(f"{row['checkpoint']}/model.pt"), (trial_id, row["checkpoint"])
        info = json.loads(open(f"{row['checkpoint'].rsplit('/', 1)[0]}/checkpoint.json").read())
        assert (info["epoch"], info["final"]) == (9, True), info  # not overwritten by the replay
    client = MlflowClient(default_tracking_uri(tmp_path / "results"))
    runs = client.search_runs([client.get_experiment_by_name("stale").experiment_id],
                              filter_string="tags.`cmath.kind` = 'trial'")
    assert sorted(r.data.tags["cmath.trial_id"] for r in runs) == sorted([first, second])
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(run.info.run_id, "best")} >= {"best/model.pt"}
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_wf1"))
        assert steps == list(range(1, 10)), (run.data.tags["cmath.trial_id"], steps)
    study = optuna.load_study(study_name="stale", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert [t.user_attrs["ray_trial_id"] for t in study.trials] == [first, second]


@pytest.mark.slow
def test_a_trial_rays_state_knows_without_its_checkpoint_resumes_from_it(tmp_path, tiny_path):
    """Ray's first snapshot, taken when the trial was created, knows the trial; with no snapshot
    after it (a period of 100,000 s; a trial's checkpoints force none), its epoch-2 checkpoint is
    in no snapshot when the driver is killed before epoch 4. The resume must go on from that
    checkpoint, not train from epoch 1 (Ray starts such a trial with no checkpoint), and number
    the trial's next checkpoint after it."""
    sweep_dir, session = _killed_with_one_snapshot(
        tmp_path, tiny_path, "unseen", {"epochs": 5, "batch_size": 4, "checkpoint_every": 2}, samples=1,
        until=lambda sweep_dir: any((sweep_dir / "ray").glob("*/checkpoint_000000/checkpoint.json")),
        what="the trial's epoch-2 checkpoint")
    [(trial_id, before)] = _trial_results(sweep_dir).items()
    assert before[-1] < 4, f"killed too late to show it: {before}"
    ray_state = "".join(p.read_text() for p in (sweep_dir / "ray").glob("experiment_state-*.json"))
    assert trial_id in ray_state and "checkpoint_000000" not in ray_state, "Ray's state must know the trial only"
    try:
        resume_sweep("unseen", tmp_path / "results", log=lambda line: None)
    finally:
        stop(pids_using(session))

    epochs = _trial_results(sweep_dir)[trial_id]
    assert epochs == before + [3, 4, 5], epochs  # went on after its epoch-2 checkpoint
    [row] = read_trials(sweep_dir).to_dict("records")
    assert row["end_state"] == "completed"
    assert "Ray's saved state knew none of its checkpoints; resumed from checkpoint_000000 (epoch 2)" in \
        row["restore_notes"]
    # its epoch-4 and final checkpoints came after the one it resumed from; only the last is kept
    assert row["checkpoint"].rstrip("/").rsplit("/", 2)[-2] == "checkpoint_000002", row["checkpoint"]
    info = json.loads(open(f"{row['checkpoint'].rsplit('/', 1)[0]}/checkpoint.json").read())
    assert (info["epoch"], info["final"]) == (5, True), info


def test_the_journal_is_read_by_trial_in_order_without_a_cut_line(tmp_path):
    """What a resume rebuilds the tables from: a driver killed mid-write leaves half a line."""
    from hpo.table import JOURNAL_FILE

    rows = [{"trial_id": "a", "epoch": 1}, {"trial_id": "b", "epoch": 1}, {"trial_id": "a", "epoch": 2},
            {"trial_id": "a", "epoch": 2}]  # a's epoch 2 redone after a restart: both kept, in order
    text = "".join(json.dumps(row) + "\n" for row in rows) + '{"trial_id": "b", "ep'
    (tmp_path / JOURNAL_FILE).write_text(text)
    assert read_journal(tmp_path) == {"a": [rows[0], rows[2], rows[3]], "b": [rows[1]]}
    assert read_journal(tmp_path / "missing") == {}
