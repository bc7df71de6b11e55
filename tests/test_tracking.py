"""The sweep's MLflow writer on a real sqlite store."""

import json
import threading


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
    writer.call(gate.wait)  # hold the thread so the next items queue up together
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

    from hpo.tracking import FAILURES_FILE, MlflowTrials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("end")
    parent = client.create_run(experiment).info.run_id
    run_id = client.create_run(experiment).info.run_id
    tracker = MlflowTrials(uri, experiment, parent, "end", {}, [], sweep_dir=tmp_path)
    gate = threading.Event()
    thread = tracker.writer.thread
    tracker.writer.call(gate.wait)  # the writer is busy when the sweep ends
    tracker.writer.call(client.set_terminated, run_id, "KILLED")
    threading.Timer(0.5, gate.set).start()
    tracker.on_experiment_end(trials=[])
    assert client.get_run(run_id).info.status == "KILLED"
    assert not thread.is_alive()
    assert json.loads((tmp_path / FAILURES_FILE).read_text())["failures"] == 0


def test_failed_calls_are_counted_with_what_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    from hpo.tracking import FAILURES_FILE, MlflowTrials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("fail")
    tracker = MlflowTrials(uri, experiment, "no-parent", "fail", {}, [], sweep_dir=tmp_path)
    tracker.writer.call(client.set_tag, "no-such-run", "k", "v")
    tracker.on_experiment_end(trials=[])
    written = json.loads((tmp_path / FAILURES_FILE).read_text())
    assert written["failures"] == 1 and written["notes"][0].startswith("set_tag: ")
