"""A sweep refuses to join a Ray cluster that lets in a client without a token (token
authentication off), unless told to accept it; a cluster started as docs/cluster.md says, with
a token, is joined without a word (tests/test_cluster.py builds that one)."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from hpo.cluster import anonymous_join, is_loopback
from hpo.processes import pids_using, stop

RAY = str(Path(sys.executable).parent / "ray")
SPACE = {"dataset": "iemocap", "search": {"d": {"type": "categorical", "choices": [32]}},
         "fixed": {"epochs": 1, "batch_size": 4}, "asha": {"grace_period": 1}}


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
                                            ("localhost", True), ("192.0.2.2", False), ("10.1.2.3", False),
                                            ("head.example.org", False)])
def test_only_loopback_addresses_count_as_this_machine_alone(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("nodes, allow, mode, outcome", [
    (None, False, "token", ""),  # the cluster asked the anonymous client for a token
    (None, False, "", "error: asks for a token and this driver runs without RAY_AUTH_MODE=token"),
    (["127.0.0.1"], False, "", "warning"),  # open, but this machine alone reaches it
    (["127.0.0.1", "192.0.2.7"], False, "", "error: listen at 192.0.2.7: anyone who reaches them"),
    (["192.0.2.7"], True, "", "warning"),  # --allow-open-cluster
    (["192.0.2.7"], True, "token", "error: unset RAY_AUTH_MODE"),  # a token-mode driver's trials never start
])
def test_what_an_anonymous_join_comes_to(nodes, allow, mode, outcome):
    """The rule on what the probe found (the probe runs for real against real heads below)."""
    from hpo.cluster import open_cluster_warning
    from hpo.errors import SweepError

    if outcome.startswith("error: "):
        with pytest.raises(SweepError, match=outcome.removeprefix("error: ")):
            open_cluster_warning("head:6379", nodes, allow, mode)
        return
    warning = open_cluster_warning("head:6379", nodes, allow, mode)
    assert warning.startswith("warning: the Ray cluster at head:6379 runs without authentication") == (
        outcome == "warning") and (warning == "") == (outcome == "")


@pytest.fixture(scope="module")
def open_head(tmp_path_factory, free_port):
    """A head started as Ray 2.60 starts one on a fresh machine with no token: authentication off."""
    folder = tempfile.mkdtemp(prefix="ro", dir="/tmp")  # Ray's socket paths must stay short
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token here
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_MODE", None)
    port = free_port()
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "2", "--temp-dir", folder, "--include-dashboard=false",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        stop(pids_using(folder), timeout=5)  # this head only, by PID (never `ray stop`)
        shutil.rmtree(folder, ignore_errors=True)


def _sweep(open_head, tmp_path, tiny_path, *extra, env: dict) -> subprocess.CompletedProcess:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return subprocess.run([sys.executable, "-m", "hpo.cli", "sweep", "--space", str(space), "--data", str(tiny_path),
                           "--num-samples", "1", "--results", str(tmp_path / "results"), "--name", "s",
                           "--address", open_head["address"], *extra],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_an_open_cluster_reachable_from_the_network_is_refused(open_head, tmp_path, tiny_path):
    # Ray 2.60 binds the head to every interface and reports the machine's address, even when it
    # is started with --node-ip-address 127.0.0.1: what this test is about must hold.
    nodes = anonymous_join(open_head["address"])
    assert nodes and not all(is_loopback(node) for node in nodes), nodes
    # The driver holds a token and asks for token authentication, as the recipe's users do.
    env = {**open_head["env"], "RAY_AUTH_MODE": "token", "HOME": str(tmp_path)}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    done = _sweep(open_head, tmp_path, tiny_path, env=env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"the Ray cluster at {open_head['address']} runs without authentication" in errors[0]
    assert f"listen at {nodes[0]}" in errors[0] and "RAY_AUTH_MODE=token" in errors[0]
    assert "--allow-open-cluster" in errors[0]
    assert not (tmp_path / "results" / "s").exists()  # refused before anything was written or joined


@pytest.mark.slow
def test_an_open_cluster_is_joined_with_one_warning_when_the_user_accepts_it(open_head, tmp_path, tiny_path):
    # A driver in token mode (with a token) joins an open head, but its trials' actors die before
    # they start (Ray 2.60): refused, naming the setting.
    token = {**open_head["env"], "RAY_AUTH_MODE": "token", "HOME": str(tmp_path)}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=token, check=True, capture_output=True, timeout=60)
    done = _sweep(open_head, tmp_path, tiny_path, "--allow-open-cluster", env=token)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "unset RAY_AUTH_MODE" in errors[0], done.stderr[-3000:]
    # As a user of an open cluster runs it: no token, no RAY_AUTH_MODE.
    done = _sweep(open_head, tmp_path, tiny_path, "--allow-open-cluster", env=open_head["env"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "runs without authentication" in warnings[0], done.stdout[-3000:]
    assert "sweep s finished: 1 completed" in done.stdout
