"""A sweep logs to a real MLflow tracking server whose store is PostgreSQL (Debian's, started by
the tests as an unprivileged user in a temporary folder on 127.0.0.1, stopped by PID: conftest.py):
a child run per trial with every epoch, `best/` through the server's artifact proxy, the runs
listed by the server's REST API (what the UI shows), export-best naming the server, and the Optuna
study in the same PostgreSQL. A database URI given as the tracking store is refused: MLflow would
put its artifacts in ./mlruns of the current folder."""

import json
import os
import signal
import threading
import time
import urllib.request

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cmath_model.errors import ConfigError
from hpo.export import export_best
from hpo.study import open_storage
from hpo.sweep import SweepOptions, run_sweep

EPOCHS = 3
SPACE = {"dataset": "iemocap", "search": {"d": {"type": "categorical", "choices": [32, 48]}},
         "fixed": {"epochs": EPOCHS, "batch_size": 4}, "asha": {"grace_period": EPOCHS}}

pytestmark = pytest.mark.slow


def test_a_sweep_logs_every_trial_to_a_postgresql_backed_server(tracking_server, postgres, tiny_path, tmp_path,
                                                                 monkeypatch, shared_ray):
    """...and keeps its Optuna study in PostgreSQL too (--study-storage), copied into optuna.db at the end."""
    monkeypatch.chdir(tmp_path)  # where MLflow would put ./mlruns if it fell back to it
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    url = tracking_server["url"]
    outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=3, max_concurrent=2, num_cpus=2,
                                     results=tmp_path / "results", name="pg", mlflow_uri=url,
                                     study_storage=postgres["optuna"]), log=lambda line: None)
    assert (outcome.status, outcome.counts["completed"], outcome.mlflow_failures) == ("finished", 3, 0)

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("pg").experiment_id
    trials = client.search_runs([experiment], filter_string="tags.`cmath.kind` = 'trial'")
    parents = client.search_runs([experiment], filter_string="tags.`cmath.kind` = 'sweep'")
    assert len(trials) == 3 and len(parents) == 1 and parents[0].info.status == "FINISHED"
    for run in trials:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_wf1")] == list(range(1, EPOCHS + 1))
        assert "best/model.pt" in [a.path for a in client.list_artifacts(run.info.run_id, "best")]
    # The weights went through the server's proxy into its artifact folder, none into ./mlruns.
    assert len(list((tracking_server["artifacts"] / experiment).rglob("model.pt"))) == 3
    assert not (tmp_path / "mlruns").exists()

    # What the UI lists: the server's REST search.
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment], "filter": "tags.`cmath.kind` = 'trial'"}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        listed = {run["info"]["run_id"] for run in json.load(response)["runs"]}
    assert listed == {run.info.run_id for run in trials}

    for storage in (open_storage(postgres["optuna"]), f"sqlite:///{outcome.sweep_dir / 'optuna.db'}"):
        study = optuna.load_study(study_name="pg", storage=storage)
        assert sorted(t.state.name for t in study.get_trials()) == ["COMPLETE"] * 3

    exported = export_best(outcome.sweep_dir, tmp_path / "best.yaml")["provenance"]
    assert exported["mlflow_uri"] == url and exported["mlflow_run_id"] in listed


def test_a_server_that_stops_answering_does_not_stop_the_training(tracking_server, tiny_path, tmp_path,
                                                                    monkeypatch, shared_ray):
    """The tracking server hangs (SIGSTOP: it accepts connections and answers nothing) for 8 s
    early in a sweep. Training goes on meanwhile, logging waits, and once the server answers
    every run gets every epoch once: nothing is counted lost. Before, each call waited out MLflow's
    retries and then was lost, and with the writer's queue full Tune's loop waited with it."""
    import hpo.tracking
    from hpo.trials import read_journal

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(hpo.tracking, "PROBE_PERIOD_S", 2.0)
    monkeypatch.setattr(hpo.tracking, "MAX_QUEUED", 8)  # a full queue is where the loop would wait
    epochs = 40
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "fixed": {"epochs": epochs, "batch_size": 4},
                                     "asha": {"grace_period": epochs}}))
    sweep_dir, server = tmp_path / "results" / "hang", tracking_server["process"]
    window = {}

    def hang() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and sum(len(r) for r in read_journal(sweep_dir).values()) < 3:
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGSTOP)
        window["stopped"] = time.time()
        time.sleep(8)
        os.killpg(server.pid, signal.SIGCONT)
        window["continued"] = time.time()

    thread = threading.Thread(target=hang, daemon=True)
    thread.start()
    try:
        outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=4, max_concurrent=2,
                                         num_cpus=2, results=tmp_path / "results", name="hang",
                                         mlflow_uri=tracking_server["url"]), log=lambda line: None)
        thread.join(timeout=60)
    finally:
        os.killpg(server.pid, signal.SIGCONT)  # whatever happened, the server goes on for the other tests
    assert "continued" in window, "the sweep ended before the server was stopped"
    during = [row for rows in read_journal(sweep_dir).values() for row in rows
              if window["stopped"] + 1 < row["received_at"] < window["continued"]]
    assert len(during) >= 5, f"{len(during)} epochs arrived while the server hung"
    assert (outcome.status, outcome.counts["completed"], outcome.mlflow_failures) == ("finished", 4, 0), \
        outcome.mlflow_failure_notes
    client = MlflowClient(tracking_server["url"])
    runs = client.search_runs([client.get_experiment_by_name("hang").experiment_id],
                              filter_string="tags.`cmath.kind` = 'trial'")
    assert len(runs) == 4
    for run in runs:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_wf1"))
        assert steps == list(range(1, epochs + 1)), (run.data.tags["cmath.trial_id"], steps)
    print(f"{len(during)} epochs arrived in the 8 s the server hung")


def test_a_database_uri_without_a_server_is_refused(postgres, tiny_path, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    with pytest.raises(ConfigError, match=r"a postgresql store keeps no artifacts .* pass its http:// address"):
        run_sweep(SweepOptions(space=space, data=str(tiny_path), results=tmp_path / "results", name="db",
                               mlflow_uri=postgres["mlflow"]))
    assert not (tmp_path / "results" / "db").exists()
