"""The sweep's MLflow writer on a real sqlite store."""

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
