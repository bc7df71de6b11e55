"""The sweep's MLflow writer on a real sqlite store."""

import json
import threading
import time

WAIT_S = 30  # the bound on every wait here: a regression fails the test instead of hanging it


def _hold(writer, gate: threading.Event) -> None:
    """Hand the writer a call that blocks until `gate` is set (at most WAIT_S), and return once the
    writer is in it: whatever is handed over next waits in its queue."""
    holding = threading.Event()
    writer.call(lambda: (holding.set(), gate.wait(WAIT_S)))
    assert holding.wait(WAIT_S), f"the MLflow writer did not take its first call within {WAIT_S}s"


def _opens_when_joined(gate: threading.Event, owner) -> None:
    """`owner.join` (a queue's or a thread's) sets `gate` first: the gate opens once the code under
    test waits for the writer, not after a guessed delay."""
    join = owner.join

    def joined(*args, **kwargs):
        gate.set()
        return join(*args, **kwargs)

    owner.join = joined


def test_mlflow_writer_keeps_order_and_batches_waiting_metrics(tmp_path):
    """Metrics queued together leave in one log_batch per run, before the calls queued after them;
    a failing call warns and the rest still arrive."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from hpo.tracking import MlflowWriter

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("w")).info.run_id
    batches = []
    log_batch = client.log_batch
    client.log_batch = lambda *a, **k: (batches.append(k.get("metrics")), log_batch(*a, **k))
    writer = MlflowWriter(client)
    gate = threading.Event()
    _hold(writer, gate)  # so the next items queue up together
    for epoch in range(1, 6):
        writer.metrics(run_id, [Metric("val_wf1", epoch / 10, 0, epoch), Metric("loss", 1 / epoch, 0, epoch)])
    writer.call(client.set_tag, run_id, "after", "metrics")
    writer.call(client.get_run, "no-such-run")  # fails: a warning, not the end of logging
    writer.metrics(run_id, [Metric("val_wf1", 0.9, 0, 6)])
    gate.set()
    writer.flush()
    assert [len(b) for b in batches if b] == [10, 1]
    assert [m.step for m in client.get_metric_history(run_id, "val_wf1")] == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run_id).data.tags["after"] == "metrics" and writer.failures == 1


def test_the_end_of_a_sweep_waits_for_every_queued_call_and_ends_the_writer(tmp_path):
    """What the writer still holds when the sweep ends (uploads, run ends) is done before the
    driver goes on, and the thread is gone: a daemon thread left running dies with the process."""
    from mlflow.tracking import MlflowClient

    from hpo.record import FAILURES_FILE
    from hpo.tracking import MlflowTrials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("end")
    parent = client.create_run(experiment).info.run_id
    run_id = client.create_run(experiment).info.run_id
    tracker = MlflowTrials(uri, experiment, parent, "end", {}, [], sweep_dir=tmp_path)
    gate = threading.Event()
    thread = tracker.writer.thread
    _hold(tracker.writer, gate)  # the writer is busy when the sweep ends...
    tracker.writer.call(client.set_terminated, run_id, "KILLED")
    for owner in (tracker.writer.queue, thread):  # ...until the end of the sweep waits for it
        _opens_when_joined(gate, owner)
    tracker.on_experiment_end(trials=[])
    assert gate.is_set(), "the end of the sweep never waited for the writer"
    assert client.get_run(run_id).info.status == "KILLED"
    assert not thread.is_alive()
    assert json.loads((tmp_path / FAILURES_FILE).read_text())["failures"] == 0


def test_failed_calls_are_counted_with_what_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    from hpo.record import FAILURES_FILE
    from hpo.tracking import MlflowTrials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("fail")
    tracker = MlflowTrials(uri, experiment, "no-parent", "fail", {}, [], sweep_dir=tmp_path)
    tracker.writer.call(client.set_tag, "no-such-run", "k", "v")
    tracker.on_experiment_end(trials=[])
    written = json.loads((tmp_path / FAILURES_FILE).read_text())
    assert written["failures"] == 1 and written["notes"][0].startswith("set_tag: ")


def test_a_trials_run_is_opened_by_the_writer_not_on_tunes_loop(tmp_path):
    """Opening a run (search_runs, create_run, log_params) is no longer made in Tune's callback:
    with the writer held, the trial's start and results return, and once the writer goes on the
    run exists with the trial's params and each epoch once (a replayed one is not logged twice)."""
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    from hpo.tracking import MlflowTrials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("start")
    tracker = MlflowTrials(uri, experiment, client.create_run(experiment).info.run_id, "start", {"d": 64}, ["lr"])
    gate = threading.Event()
    _hold(tracker.writer, gate)  # a slow tracking store
    trial = Trial("CMATHTrial", config={"lr": 1e-3}, trial_id="t1", stub=True)
    tracker.on_trial_start(0, [trial], trial)
    for epoch in (1, 2, 2):
        tracker.on_trial_result(0, [trial], trial, {"epoch": epoch, "val_wf1": epoch / 10})
    assert "t1" not in tracker.run_ids  # nothing was made on the loop
    gate.set()
    tracker.flush()
    run = client.get_run(tracker.run_ids["t1"])
    assert run.data.params == {"d": "64", "lr": "0.001"} and run.data.tags["cmath.trial_id"] == "t1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_wf1")] == [1, 2]
    tracker.close()


def test_a_continued_run_gets_the_epochs_a_stopped_driver_did_not_send_once(tmp_path):
    """`ray job stop` kills the driver 3 s after its SIGTERM, maybe before the writer sent every
    epoch; the journal has them. The resumed driver sends the run what it lacks, once, and an
    epoch the trial then reports again is not logged twice."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    from hpo.tracking import MlflowTrials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("stopped")
    run = client.create_run(experiment, tags={"cmath.sweep": "stopped", "cmath.trial_id": "t1"}).info.run_id
    client.log_batch(run, metrics=[Metric("val_wf1", e / 10, 0, e) for e in (1, 2)])  # sent before the stop
    with open(tmp_path / "history.jsonl", "w") as journal:  # every epoch the driver received
        for epoch in (1, 2, 3, 4):
            journal.write(json.dumps({"trial_id": "t1", "epoch": epoch, "val_wf1": epoch / 10, "train_loss": 1.0,
                                      "node": "n", "pid": 1, "received_at": time.time() - 60}) + "\n")
    tracker = MlflowTrials(uri, experiment, "parent", "stopped", {}, ["lr"], sweep_dir=tmp_path)
    trial = Trial("CMATHTrial", config={"lr": 1e-3}, trial_id="t1", stub=True)
    tracker.on_trial_start(0, [trial], trial)
    for epoch in (4, 5):  # resumed from its epoch-3 checkpoint: epoch 4 again, then 5
        tracker.on_trial_result(0, [trial], trial, {"epoch": epoch, "val_wf1": epoch / 10})
    tracker.flush()
    assert tracker.run_ids["t1"] == run
    assert sorted(m.step for m in client.get_metric_history(run, "val_wf1")) == [1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(run, "train_loss")] == [3, 4]  # from the journal only
    tracker.close()


def test_the_writers_queue_is_bounded(tmp_path, monkeypatch):
    """A store that cannot keep up makes the loop wait, not the driver's memory grow."""
    import queue

    import pytest
    from mlflow.tracking import MlflowClient

    from hpo import tracking

    monkeypatch.setattr(tracking, "MAX_QUEUED", 2)
    writer = tracking.MlflowWriter(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    gate, done = threading.Event(), []
    _hold(writer, gate)  # the queue is empty: the writer has taken the call
    writer.call(done.append, 1)
    writer.call(done.append, 2)
    with pytest.raises(queue.Full):
        writer.queue.put(("call", done.append, ((3,), {})), timeout=0.2)
    gate.set()
    writer.close()
    assert done == [1, 2]


def test_a_new_sqlite_store_is_a_copy_of_an_empty_one_made_once(tmp_path, monkeypatch):
    """The first store builds the empty template (MLflow's migrations, once per version); every
    later new store is a copy of it, with no migration run, and each store keeps its own runs."""
    import logging

    import mlflow

    from cmath_model.tracking import tracking_client

    built = []  # MLflow's own line each time it builds a store's tables
    handler = logging.Handler()
    handler.emit = lambda record: built.append(record.getMessage())
    store_log = logging.getLogger("mlflow.store.db.utils")
    monkeypatch.setattr(store_log, "level", logging.INFO)  # the CLI quiets MLflow's loggers to WARNING
    monkeypatch.setattr(logging.getLogger("mlflow"), "level", logging.INFO)
    store_log.addHandler(handler)
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        first = tracking_client(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
        first.create_run(first.create_experiment("a"))
        template = tmp_path / "cache" / "cmath-hpo" / f"mlflow-{mlflow.__version__}-empty.db"
        assert template.exists() and (tmp_path / "a" / "mlflow.db").exists()
        assert sum("Creating initial MLflow database tables" in line for line in built) == 1  # the template
        second = tracking_client(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
        second.create_run(second.create_experiment("b"))
        assert sum("Creating initial MLflow database tables" in line for line in built) == 1  # a copy, not built
    finally:
        store_log.removeHandler(handler)
    assert [e.name for e in second.search_experiments() if e.name != "Default"] == ["b"]
    assert [e.name for e in first.search_experiments() if e.name != "Default"] == ["a"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["mlflow.db"]  # no partial copy left
    empty = tracking_client(f"sqlite:///{template}")
    assert [e.name for e in empty.search_experiments()] == ["Default"]  # the template stays empty


def test_without_a_cache_folder_mlflow_builds_the_store_itself(tmp_path, monkeypatch):
    from cmath_model.tracking import tracking_client

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    client = tracking_client(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}")
    client.create_experiment("c")
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["c"]


def test_trial_runs_are_named_by_number_score_and_values_and_the_best_is_marked_once(tmp_path):
    """A resumed sweep whose best trial changed moves the mark: one marked run per sweep."""
    from cmath_model.tracking import tracking_client
    from hpo.provenance import mark_best_run
    from hpo.tracking import trial_run_name

    config = {"d": 256, "lr": 0.00123456, "gamma1": 1.0}
    assert trial_run_name(3, config, ["d", "lr"]) == "#3  d=256 lr=0.00123"
    assert trial_run_name(3, config, ["d", "lr"], "completed", 0.84031) == "#3  W-F1 84.03%  d=256 lr=0.00123"
    assert trial_run_name(0, config, ["lr"], "failed") == "#0  failed  lr=0.00123"
    assert trial_run_name(1, config, ["lr"], "stopped_by_asha", 0.5) == "#1  W-F1 50.00%  stopped by ASHA  lr=0.00123"

    client = tracking_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("s")
    ids = {}
    for trial, sweep in (("a", "s"), ("b", "s"), ("c", "other")):
        run = client.create_run(experiment, run_name=f"#{trial}", tags={
            "cmath.sweep": sweep, "cmath.kind": "trial", "cmath.trial_id": trial})
        ids[trial] = run.info.run_id
    names = lambda: {t: client.get_run(i).info.run_name for t, i in ids.items()}  # noqa: E731
    mark_best_run(client, experiment, "s", "a")
    assert names() == {"a": "★ #a", "b": "#b", "c": "#c"}
    mark_best_run(client, experiment, "s", "b")
    assert names() == {"a": "#a", "b": "★ #b", "c": "#c"}
    mark_best_run(client, experiment, "other", "c")  # another sweep's mark is its own
    assert names() == {"a": "#a", "b": "★ #b", "c": "★ #c"}


def test_only_a_resumed_sweep_or_a_retried_open_looks_for_a_trials_run(tmp_path):
    """A new sweep's trials have no run yet: searching the store for one at every trial start
    scans every run's tags. A resumed sweep's may have one from the driver before; and a retried
    open may find the run a failed one made before its call went wrong: neither makes a second."""
    from mlflow.tracking import MlflowClient

    from hpo.tracking import MlflowTrials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("look")
    earlier = client.create_run(experiment, tags={"cmath.sweep": "look", "cmath.trial_id": "t1"}).info.run_id

    def searches(tracker) -> list:
        calls = []
        search = tracker.client.search_runs
        tracker.client.search_runs = lambda *a, **k: calls.append(a) or search(*a, **k)
        return calls

    new = MlflowTrials(uri, experiment, "parent", "look", {}, ["lr"], resumed=False)
    calls = searches(new)
    assert new.open_run("t2", {"lr": 1e-3}) != earlier and calls == []
    # MLflow refuses the parameter name after the run is made: the retry finds that run
    try:
        new.open_run("t3", {"lr!": 1e-3})
    except Exception as exc:  # noqa: BLE001 - MLflow's own refusal
        assert "lr!" in str(exc)
    else:
        raise AssertionError("MLflow took a parameter named lr!")
    [half_made] = [r.info.run_id for r in client.search_runs([experiment], "tags.`cmath.trial_id` = 't3'")]
    assert new.open_run("t3", {"lr": 1e-3}) == half_made and len(calls) == 1

    resumed = MlflowTrials(uri, experiment, "parent", "look", {}, ["lr"], resumed=True)
    assert resumed.open_run("t1", {"lr": 1e-3}) == earlier
    assert len(client.search_runs([experiment])) == 3  # t1 (the earlier driver's), t2, t3
