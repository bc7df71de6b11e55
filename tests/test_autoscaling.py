"""--wait-for-resources: on a cluster that adds nodes on demand, a sweep asks for a node that fits
a trial and waits for it instead of refusing. Here the "autoscaler" is this test: it starts a
second node (`ray start --address`, on this machine) once the sweep says it is waiting."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from hpo.errors import SweepError
from hpo.processes import is_node_daemon, pids_using, stop
from hpo.sweep import SweepOptions, run_sweep

RAY = str(Path(sys.executable).parent / "ray")
SPACE = {"dataset": "iemocap", "search": {"d": {"type": "categorical", "choices": [32]}},
         "fixed": {"epochs": 1, "batch_size": 4}, "asha": {"grace_period": 1}}

pytestmark = pytest.mark.slow


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


SITE = "/venv/lib/python3.11/site-packages/ray"


@pytest.mark.parametrize("cmdline, daemon", [
    # A node's own processes, as Ray 2.60 names them on this machine: they outlive the head.
    (f"{SITE}/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/session_x/sockets/raylet", True),
    (f"/venv/bin/python -u {SITE}/_private/log_monitor.py --session-dir=/tmp/ray/session_x", True),
    ("ray::DashboardAgent", True),
    ("ray::RuntimeEnvAgent", True),
    # Workers, which leave_ray keeps waiting for, and the head's own processes, which exit by themselves.
    ("ray::IDLE", False),
    ("ray::ImplicitFunc.train", False),
    (f"{SITE}/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray/session_x/logs", False),
    (f"/venv/bin/python {SITE}/dashboard/dashboard.py --host=127.0.0.1 --port=8265", False),
])
def test_a_joined_nodes_daemons_are_told_from_workers(cmdline, daemon):
    assert is_node_daemon(cmdline) is daemon


def test_without_a_node_that_fits_the_sweep_waits_then_refuses(space, tiny_path, tmp_path):
    lines = []
    started = time.monotonic()
    with pytest.raises(SweepError, match=r"no node has 2 CPU and 0 GPU for one trial after waiting 3s"):
        run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=1, num_cpus=1, cpus_per_trial=2,
                               wait_for_resources=3, results=tmp_path / "results", name="w"), log=lines.append)
    assert time.monotonic() - started >= 3
    assert any(line.startswith("waiting up to 3s for a node with 2 CPU") for line in lines)
    assert not ray.is_initialized() and not (tmp_path / "results" / "w").exists()


def test_a_node_that_joins_while_the_sweep_waits_runs_its_trials(space, tiny_path, tmp_path):
    waiting = threading.Event()
    joined = {}

    def log(line: str) -> None:
        if line.startswith("waiting up to"):
            waiting.set()

    def autoscaler() -> None:
        if not waiting.wait(timeout=180):
            return
        gcs = ray.get_runtime_context().gcs_address
        joined["run"] = subprocess.run([RAY, "start", "--address", gcs, "--num-cpus", "2", "--node-ip-address",
                                        "127.0.0.1"], capture_output=True, text=True, timeout=120,
                                       env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")})

    thread = threading.Thread(target=autoscaler, daemon=True)
    thread.start()
    outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=1, num_cpus=1, cpus_per_trial=2,
                                     wait_for_resources=120, results=tmp_path / "results", name="w"), log=log)
    thread.join(timeout=10)
    assert joined["run"].returncode == 0, joined["run"].stderr[-2000:]
    assert outcome.counts["completed"] == 1  # 2 CPUs: only the node that joined could run it
    session = outcome.sweep_dir.joinpath("sweep.json").read_text()
    assert not pids_using(yaml.safe_load(session)["driver"]["ray_session_dir"])  # the joined node is gone too


_REQUEST = """
import logging, sys, ray
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.experimental.internal_kv import _internal_kv_get
ray.init(address=sys.argv[1], logging_level=logging.ERROR)
print((_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"none").decode())
"""


def test_the_sweeps_request_to_the_autoscaler_ends_with_it(space, tiny_path, tmp_path, free_port):
    """A cluster outlives its sweeps, and a request to its autoscaler stays in force until another
    replaces it (Ray's v1 autoscaler, as here, reads it from the GCS): a node started for the sweep
    would keep running. The sweep withdraws its request when it ends."""
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    head, worker = tempfile.mkdtemp(prefix="ah", dir="/tmp"), tempfile.mkdtemp(prefix="aw", dir="/tmp")
    address = f"127.0.0.1:{free_port()}"
    start = [RAY, "start", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]

    def request() -> str:
        done = subprocess.run([sys.executable, "-c", _REQUEST, address], env=env, capture_output=True, text=True,
                              timeout=120)
        return (done.stdout.strip().splitlines() or [done.stderr[-2000:]])[-1]

    try:
        subprocess.run([*start, "--head", "--port", address.rsplit(":", 1)[1], "--num-cpus", "1", "--temp-dir", head,
                        "--include-dashboard=false"], env=env, check=True, capture_output=True, timeout=120)
        command = ["timeout", "300", sys.executable, "-m", "hpo.cli", "sweep", "--space", str(space), "--data",
                   str(tiny_path), "--num-samples", "1", "--cpus-per-trial", "2", "--address", address,
                   "--wait-for-resources", "120", "--results", str(tmp_path / "results"), "--name", "asked"]
        sweep = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, asked = [], None
        for line in sweep.stdout:  # the sweep prints its wait, then waits: the test is its autoscaler
            lines.append(line)
            if line.startswith("waiting up to"):
                asked = request()
                subprocess.run([*start, "--address", address, "--num-cpus", "2", "--temp-dir", worker], env=env,
                               check=True, capture_output=True, timeout=120)
        assert sweep.wait(timeout=300) == 0, "".join(lines)[-3000:]
        assert any(line.startswith("sweep asked finished: 1 completed") for line in lines), "".join(lines)[-3000:]
        assert asked == '[{"CPU": 2.0}]'  # what the sweep asked for while it waited
        assert request() == "[]"
    finally:
        stop(pids_using(worker), timeout=3)
        stop(pids_using(head), timeout=3)
        shutil.rmtree(head, ignore_errors=True)
        shutil.rmtree(worker, ignore_errors=True)
