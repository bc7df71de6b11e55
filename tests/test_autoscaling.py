"""--wait-for-resources: on a cluster that adds nodes on demand, a sweep asks for a node that fits
a trial and waits for it instead of refusing. Here the "autoscaler" is this test: it starts a
second node (`ray start --address`, on this machine) once the sweep says it is waiting."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from hpo.errors import SweepError
from hpo.processes import is_node_daemon, pids_using
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
