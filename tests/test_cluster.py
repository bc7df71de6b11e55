"""A real two-node Ray cluster on this machine over loopback (`ray start` head + worker, each with
its own temp dir), a sweep joining it with --address, and the worker node killed mid-sweep:
trials ran on both nodes, the worker's trials finish on the head from their checkpoints, and
MLflow and trials.parquet are complete. Only what this test started is stopped, by PID."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from hpo.processes import pids_using, stop
from hpo.table import TRIALS_FILE, read_trials
from hpo.tracking import default_tracking_uri

RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
EPOCHS = 10
SAMPLES = 6
SPACE = {
    "dataset": "iemocap",
    "search": {"lr": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3}},
    "fixed": {"d": 256, "epochs": EPOCHS, "batch_size": 4, "checkpoint_every": 2},
    "asha": {"grace_period": EPOCHS},
}



def _ray_start(*args: str) -> None:
    subprocess.run([RAY, "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
                    *args], env=ENV, check=True, capture_output=True, timeout=120)


@pytest.fixture
def cluster(free_port):
    # Short temp dirs: Ray's unix sockets live inside them and socket paths are limited to 107 bytes.
    head_dir, worker_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rw", dir="/tmp")
    port = free_port()
    try:
        _ray_start("--head", "--port", str(port), "--temp-dir", head_dir, "--include-dashboard=false")
        _ray_start("--address", f"127.0.0.1:{port}", "--temp-dir", worker_dir)
        list_nodes = (f"import json, ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
                      "print(json.dumps([[n['NodeID'], n['ObjectStoreSocketName']]"
                      " for n in ray.nodes() if n['Alive']]))")
        nodes = json.loads(subprocess.run([sys.executable, "-c", list_nodes], env=ENV, capture_output=True, text=True,
                                          check=True, timeout=120).stdout.strip().splitlines()[-1])
        assert len(nodes) == 2
        node_of = {("worker" if socket_name.startswith(worker_dir) else "head"): node_id[:12]
                   for node_id, socket_name in nodes}
        yield {"address": f"127.0.0.1:{port}", "head_dir": head_dir, "worker_dir": worker_dir, "nodes": node_of}
    finally:
        stop(pids_using(worker_dir))
        stop(pids_using(head_dir))
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def _worker_trial_running(ray_dir: Path, worker_node: str, running: set):
    """A running trial's folder whose latest result came from the worker node, past a checkpoint.
    (result.json is written with a buffer, so only the table says reliably which trials still run.)"""
    for path in ray_dir.glob("*/result.json"):
        if not any(trial_id in path.parent.name for trial_id in running):
            continue
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines and str(lines[-1].get("node_id", ""))[:12] == worker_node and lines[-1]["epoch"] >= 3 \
                and lines[-1]["epoch"] < EPOCHS - 1 and list(path.parent.glob("checkpoint_*")):
            return path.parent.name
    return None


def test_sweep_on_two_nodes_survives_losing_the_worker(cluster, tmp_path, tiny_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    results = tmp_path / "results"
    log = open(tmp_path / "sweep.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "hpo.cli", "sweep", "--space", str(space), "--data", str(tiny_path),
         "--num-samples", str(SAMPLES), "--address", cluster["address"], "--results", str(results),
         "--name", "two-nodes", "--max-retries", "2"],
        env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sweep_dir = results / "two-nodes"
    try:
        # Wait until a trial finished on the worker and another is running there, then kill that node.
        victim, deadline = None, time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            if (sweep_dir / TRIALS_FILE).exists():
                try:
                    trials = read_trials(sweep_dir)
                except Exception:  # noqa: BLE001 - replaced while read
                    continue
                ended_on_worker = trials[(trials["end_state"] == "completed")
                                         & (trials["nodes"] == cluster["nodes"]["worker"])]
                if len(ended_on_worker):
                    running = set(trials.loc[trials["end_state"] == "running", "trial_id"])
                    victim = _worker_trial_running(sweep_dir / "ray", cluster["nodes"]["worker"], running)
            time.sleep(0.1)
        assert victim, "never saw a finished and a running trial on the worker node"
        for pid in pids_using(cluster["worker_dir"]):
            os.kill(pid, signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)

    trials = read_trials(sweep_dir)
    assert len(trials) == SAMPLES and set(trials["end_state"]) == {"completed"}
    used = set(",".join(trials["nodes"]).split(","))
    assert used == {cluster["nodes"]["head"], cluster["nodes"]["worker"]}
    moved = trials[[t in victim for t in trials["trial_id"]]].iloc[0]
    assert moved["restarts"] == 1
    assert moved["nodes"].split(",") == [cluster["nodes"]["worker"], cluster["nodes"]["head"]]
    epochs = [json.loads(line)["epoch"] for line in (sweep_dir / "ray" / victim / "result.json")
              .read_text().splitlines() if '"epoch"' in line]
    assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, EPOCHS + 1))

    client = MlflowClient(default_tracking_uri(results))
    runs = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id],
                              filter_string="tags.`cmath.kind` = 'trial'")
    assert len(runs) == SAMPLES
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_wf1")]
        assert steps == list(range(1, EPOCHS + 1)) and run.info.status == "FINISHED"
        assert "best/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "best")}
    for path in trials["checkpoint"]:
        assert (Path(path) / "model.pt").exists()
    print(f"trial {moved['trial_id']} moved from the worker to the head; epochs redone {moved['epochs_redone']}")
