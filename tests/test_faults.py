"""Faults injected for real against a real Ray runtime and a real MLflow store: trials that raise
or go NaN, bad inputs that must stop a sweep before it starts."""

import json
import sys

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from cmath_model.errors import DataError
from cmath_model.tracking import default_tracking_uri
from hpo.cli import main as hpo_main
from hpo.errors import SweepError
from hpo.sweep import SweepOptions, run_sweep
from hpo.trainable import CMATHTrial
from hpo.trials import read_trials

SPACE = {
    "dataset": "iemocap",
    # lr 1e6 makes the loss NaN in the first epoch (a real NaN, nothing mocked);
    # RaisingTrial raises in the second epoch of every d=48 trial.
    "search": {"d": {"type": "categorical", "choices": [32, 48]},
               "lr": {"type": "categorical", "choices": [1.0e-3, 1.0e6]}},
    "fixed": {"epochs": 3, "batch_size": 4},
    "warm_start": [{"d": 32, "lr": 1.0e6}, {"d": 48, "lr": 1.0e-3}, {"d": 32, "lr": 1.0e-3}],
    "asha": {"grace_period": 3, "reduction_factor": 2},
}


class RaisingTrial(CMATHTrial):
    def _epoch(self) -> dict:
        if self.cmath_config.d == 48 and self.trainer.epoch == 1:
            raise RuntimeError("injected fault in epoch 2")
        return super()._epoch()


# Ray's workers cannot import the tests folder: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _write_space(path, **changes):
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


# ------------------------------------------------------------------ bad input: nothing starts
def _bad_data(tmp_path, kind, tiny_path):
    path = tmp_path / f"{kind}.parquet"
    if kind == "missing":
        return path
    if kind == "truncated":
        path.write_bytes(tiny_path.read_bytes()[:5000])
    elif kind == "wrong-schema":
        table = pq.read_table(tiny_path).drop(["label"])
        pq.write_table(table.replace_schema_metadata(pq.read_schema(tiny_path).metadata), path)
    elif kind == "nan-features":
        table = pq.read_table(tiny_path)
        rows = table.to_pylist()
        rows[3]["text"] = [float("nan")] * len(rows[3]["text"])
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such dataset file"),
    ("truncated", "not a readable Parquet file"),
    ("wrong-schema", "missing column 'label'"),
    ("nan-features", "NaN"),
])
def test_bad_dataset_stops_before_anything_starts(tmp_path, tiny_path, kind, message):
    data = _bad_data(tmp_path, kind, tiny_path)
    space = _write_space(tmp_path / "space.yaml")
    with pytest.raises(DataError) as caught:
        run_sweep(SweepOptions(space=space, data=str(data), num_samples=2, results=tmp_path / "results", name="bad"))
    assert message in str(caught.value) and str(data.name) in str(caught.value)
    assert not ray.is_initialized() and not (tmp_path / "results" / "bad").exists()


def test_grace_period_beyond_the_epochs_set_on_the_command_line(tmp_path, tiny_path):
    space = _write_space(tmp_path / "space.yaml")
    with pytest.raises(SweepError, match="grace_period 3 exceeds the 2 epochs"):
        run_sweep(SweepOptions(space=space, data=str(tiny_path), results=tmp_path, name="x", overrides={"epochs": 2}))
    assert not (tmp_path / "x").exists()


def test_without_early_stopping_asha_settings_are_not_checked(tmp_path, tiny_path):
    """--no-early-stopping: no ASHA, so its grace period and max_t cannot be at odds with the epochs."""
    from hpo.sweep import plan_sweep

    space = _write_space(tmp_path / "space.yaml", asha={"grace_period": 3, "max_t": 2})
    plan = plan_sweep(SweepOptions(space=space, data=str(tiny_path), results=tmp_path, name="x", early_stopping=False,
                                   overrides={"epochs": 2}))
    assert plan.base.epochs == 2


def test_asha_max_t_below_the_epochs_is_refused_and_categorical_epochs_plan(tmp_path, tiny_path):
    from hpo.sweep import plan_sweep

    space = _write_space(tmp_path / "space.yaml", asha={"grace_period": 1, "max_t": 2})
    with pytest.raises(SweepError, match="asha.max_t 2 is below the 3 epochs"):
        plan_sweep(SweepOptions(space=space, data=str(tiny_path), results=tmp_path, name="x"))
    space = _write_space(tmp_path / "epochs.yaml", warm_start=[], asha={"grace_period": 1},
                         fixed={"batch_size": 4}, search={"epochs": {"type": "categorical", "choices": [2, 4]}})
    assert plan_sweep(SweepOptions(space=space, data=str(tiny_path), results=tmp_path, name="x")).max_t == 4


@pytest.mark.parametrize("option, where, message", [
    ("mlflow_uri", "http://127.0.0.1:{port}", "MLflow tracking server {where} is unreachable"),
    ("address", "127.0.0.1:{port}", "Ray cluster at {where} is unreachable"),
])
def test_an_unreachable_server_fails_fast(tmp_path, tiny_path, free_port, option, where, message):
    """An unreachable --mlflow-uri or --address: one line, before Ray starts or anything is written."""
    where = where.format(port=free_port())
    space = _write_space(tmp_path / "space.yaml")
    with pytest.raises(SweepError, match=message.format(where=where)):
        run_sweep(SweepOptions(space=space, data=str(tiny_path), results=tmp_path, name="x", **{option: where}))
    assert not ray.is_initialized() and not (tmp_path / "x").exists()


def test_pickle_import_without_trust_is_refused_end_to_end(tmp_path, capsys):
    import pickle

    from cmath_model.cli import data_main

    path = tmp_path / "features.pkl"
    path.write_bytes(pickle.dumps({"not": "checked"}))
    assert data_main(["import", str(path), "-o", str(tmp_path / "out.parquet")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()


# ------------------------------------------------------------------ sweeps on this process's Ray
@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, tiny_path, shared_ray):
    root = tmp_path_factory.mktemp("faults")
    space = _write_space(root / "faults.yaml")
    lines = []
    outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=3, max_concurrent=2,
                                     num_cpus=2, results=root, name="faults"),
                        log=lines.append, trainable=RaisingTrial)
    return {"outcome": outcome, "root": root, "trials": read_trials(root / "faults"), "lines": lines}


def test_a_failing_trial_is_one_failed_trial(failing_sweep):
    trials = failing_sweep["trials"].set_index("number")
    assert failing_sweep["outcome"].status == "finished"
    assert failing_sweep["outcome"].counts == {"completed": 1, "stopped_by_asha": 0, "failed": 2, "interrupted": 0}
    assert trials.loc[0, "end_state"] == "failed" and "NonFiniteLossError" in trials.loc[0, "error"]
    assert "lower lr" in trials.loc[0, "error"]
    assert trials.loc[1, "end_state"] == "failed"
    assert "RuntimeError: injected fault in epoch 2" in trials.loc[1, "error"]
    assert trials.loc[1, "epochs"] == 1  # its first epoch is kept
    assert trials.loc[2, "end_state"] == "completed" and trials.loc[2, "epochs"] == 3
    assert list(trials["optuna_state"]) == ["FAIL", "FAIL", "COMPLETE"]
    text = "\n".join(failing_sweep["lines"])
    assert text.count("] failed: ") == 2 and "1 completed, 0 stopped by ASHA, 2 failed" in text


def test_failed_trials_are_ray_errors_and_never_retried(failing_sweep):
    analysis = ExperimentAnalysis(str(failing_sweep["root"] / "faults" / "ray"))
    by_id = {t.trial_id: t for t in analysis.trials}
    for row in failing_sweep["trials"].itertuples():
        trial = by_id[row.trial_id]
        assert trial.status == ("ERROR" if row.end_state == "failed" else "TERMINATED")
        # retries stay for lost workers: a trial that raised ran once and failed once
        assert trial.run_metadata.num_failures == (1 if row.end_state == "failed" else 0)
    # (that lost workers are retried is test_recovery's: killed workers resume from checkpoints)


def test_failed_trials_are_failed_mlflow_runs_with_the_error(failing_sweep, tmp_path):
    client = MlflowClient(default_tracking_uri(failing_sweep["root"]))
    for row in failing_sweep["trials"].itertuples():
        run = client.get_run(row.mlflow_run_id)
        assert run.data.tags["cmath.end_state"] == row.end_state
        if row.end_state == "failed":
            assert run.info.status == "FAILED" and run.data.tags["cmath.error"] == row.error
            error_file = client.download_artifacts(row.mlflow_run_id, "error.txt", str(tmp_path))
            assert row.error.split(":")[0].split(".")[-1] in open(error_file).read()
        else:
            assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_sweep_exits_nonzero_only_when_every_trial_failed(tmp_path, tiny_path, capsys, shared_ray):
    space = _write_space(tmp_path / "all-nan.yaml", warm_start=[],
                         search={"lr": {"type": "categorical", "choices": [1.0e6, 2.0e6]}})
    args = ["sweep", "--space", str(space), "--data", str(tiny_path), "--num-samples", "2", "--num-cpus", "2",
            "--results", str(tmp_path), "--name", "all-nan"]
    assert hpo_main(args) == 1
    out = capsys.readouterr().out
    assert "0 completed, 0 stopped by ASHA, 2 failed" in out and "no trial produced a result" in out
    assert len(read_trials(tmp_path / "all-nan")) == 2


class KillsTheTrackingServer(CMATHTrial):
    """The first trial to reach epoch 2 kills the sweep's MLflow server (its process group), for real."""

    server_pid = 0  # set by the test; shipped with the class (by value) to the trial workers

    def _epoch(self) -> dict:
        import os
        import signal

        if self.trainer.epoch == 1:
            try:
                os.killpg(self.server_pid, signal.SIGKILL)
            except ProcessLookupError:  # another trial got there first
                pass
        return super()._epoch()


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_sweep_is_reported_and_exits_1(tmp_path, tiny_path, free_port, monkeypatch,
                                                                        shared_ray):
    """The trials go on and the tables keep everything; the summary and sweep.json say how many
    MLflow calls failed, and the exit code says the record is incomplete."""
    from hpo.ui import start_ui, stop_ui

    MlflowClient(default_tracking_uri(tmp_path / "store")).search_experiments()  # an empty store to serve
    server, url = start_ui(tmp_path / "store", free_port())
    monkeypatch.setattr(KillsTheTrackingServer, "server_pid", server.pid)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not after minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    space = _write_space(tmp_path / "ok.yaml", warm_start=[], search={"d": {"type": "categorical", "choices": [32]}})
    lines = []
    try:
        outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=3, max_concurrent=2,
                                         num_cpus=2, results=tmp_path / "results", name="no-store", mlflow_uri=url),
                            log=lines.append, trainable=KillsTheTrackingServer)
    finally:
        stop_ui(server)
    assert server.poll() is not None
    assert outcome.mlflow_failures > 0 and outcome.exit_code == 1
    assert outcome.counts["completed"] == 3  # the trials did not notice
    summary = "\n".join(lines)
    assert f"MLflow: {outcome.mlflow_failures} calls failed" in summary
    record = json.loads((tmp_path / "results" / "no-store" / "sweep.json").read_text())
    assert record["mlflow_failures"] == outcome.mlflow_failures and record["mlflow_failure_notes"]
    history = pq.read_table(tmp_path / "results" / "no-store" / "history.parquet").to_pandas()
    assert len(history) == 3 * SPACE["fixed"]["epochs"]  # every epoch of every trial is in the tables


@pytest.mark.slow
def test_sweep_writes_only_under_results(tmp_path, tiny_path, monkeypatch, shared_ray):
    """Nothing lands in the working directory: MLflow's store, its artifacts and Optuna's
    study all live under --results; Ray's own files under its temp dir."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    space = _write_space(tmp_path / "space.yaml", warm_start=[], search={"d": {"type": "int", "low": 32, "high": 64}},
                         asha={"grace_period": 1})
    run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=1, num_cpus=1, results=tmp_path / "res",
                           name="w", overrides={"epochs": 1}), log=lambda line: None)
    assert list(work.iterdir()) == []
    record = json.loads((tmp_path / "res" / "w" / "sweep.json").read_text())
    assert record["mlflow"]["uri"].startswith(f"sqlite:///{tmp_path / 'res'}")
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"res", "space.yaml"}
    assert (tmp_path / "res" / "mlartifacts").is_dir()



class SlowToStopTrial(CMATHTrial):
    """Leaves behind a process of its Ray session that takes seconds to end, as a trial worker
    tearing down on a busy machine does (5 s seen): here a child that names the session folder."""

    def setup(self, *args, **kwargs) -> None:
        import os
        import subprocess

        context = ray.get_runtime_context()  # a session's folder is <temp dir>/<session name>
        session = os.path.join(context.get_temp_dir(), context.get_session_name())
        outlive_the_worker_by_3s = ("import os, time\nparent = os.getppid()\n"
                                    "while os.getppid() == parent: time.sleep(0.1)\ntime.sleep(3)")
        subprocess.Popen([sys.executable, "-c", outlive_the_worker_by_3s, session], start_new_session=True)
        with open(os.environ["CMATH_TEST_CHILD_SESSION"], "w") as out:  # which folder the child names
            out.write(session)
        super().setup(*args, **kwargs)


@pytest.mark.slow
def test_a_sweep_returns_only_once_its_private_ray_is_gone(tmp_path, tiny_path, monkeypatch, without_ray):
    """Nothing the sweep started outlives it, even a process slow to tear down. Ray itself kills
    a dead worker's children; that is turned off here so that one outlives its worker for sure."""
    from hpo.processes import pids_using

    monkeypatch.setenv("RAY_kill_child_processes_on_worker_exit", "false")
    monkeypatch.setenv("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "false")
    monkeypatch.setenv("CMATH_TEST_CHILD_SESSION", str(tmp_path / "child-session.txt"))

    space = _write_space(tmp_path / "one.yaml", warm_start=[],
                         search={"d": {"type": "categorical", "choices": [32]}}, fixed={"epochs": 1},
                         asha={"grace_period": 1})
    outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=1, num_cpus=2,
                                     results=tmp_path, name="one"), log=lambda line: None, trainable=SlowToStopTrial)
    session = json.loads((outcome.sweep_dir / "sweep.json").read_text())["driver"]["ray_session_dir"]
    assert outcome.counts["completed"] == 1
    assert (tmp_path / "child-session.txt").read_text() == session  # else pids_using looks for nothing
    assert not pids_using(session)


@pytest.mark.slow
def test_the_parent_run_is_failed_when_the_tuner_cannot_be_built(tmp_path, tiny_path, without_ray):
    """Whatever raises once the sweep's record is open (building the Tuner here, or its fit) ends
    the MLflow parent run FAILED, leaves sweep.json resumable and leaves Ray."""
    space = _write_space(tmp_path / "space.yaml")
    with pytest.raises(ValueError, match="with_parameters"):
        run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=1, num_cpus=2, results=tmp_path,
                               name="broken"), log=lambda line: None, trainable=int)
    record = json.loads((tmp_path / "broken" / "sweep.json").read_text())
    parent = MlflowClient(record["mlflow"]["uri"]).get_run(record["mlflow"]["parent_run_id"])
    assert (parent.info.status, record["status"]) == ("FAILED", "running")
    assert not ray.is_initialized()
