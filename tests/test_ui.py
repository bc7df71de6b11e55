"""`cmath-hpo ui` stops its MLflow server however the command itself is stopped."""

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from cmath_model.tracking import default_tracking_uri
from hpo.processes import is_running


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
def test_a_stopped_ui_command_stops_its_server(tmp_path, free_port):
    """SIGTERM, SIGHUP (a closed terminal) and SIGKILL, one `cmath-hpo ui` each, side by side:
    an MLflow server takes most of the test's time to start, and they start together."""
    MlflowClient(default_tracking_uri(tmp_path)).search_experiments()  # an empty store to serve
    signals = [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]
    ports = [free_port() for _ in signals]
    commands = [subprocess.Popen([sys.executable, "-m", "hpo.cli", "ui", "--results", str(tmp_path), "--port",
                                  str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for port in ports]
    server_pids = []
    try:
        for command in commands:
            line = command.stdout.readline()  # printed once the server answers
            assert line.startswith("MLflow UI: "), line + command.stdout.read()[-2000:]
            server_pids.append(int(line.split("(pid ")[1].split(";")[0]))
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        assert all(_answers(url) for url in urls)
        for command, signum in zip(commands, signals):
            command.send_signal(signum)
        for command in commands:
            command.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(is_running(pid) or _answers(url)
                                                  for pid, url in zip(server_pids, urls)):
            time.sleep(0.2)
        for pid, url, signum in zip(server_pids, urls, signals):
            assert not is_running(pid), f"the server (pid {pid}) outlived `cmath-hpo ui` stopped by {signum.name}"
            assert not _answers(url), f"{url} still answers after {signum.name}"
    finally:
        for command in commands:
            if command.poll() is None:
                command.kill()
                command.wait(timeout=30)
        for pid in server_pids:
            if is_running(pid):  # what this test started, by PID
                os.killpg(pid, signal.SIGKILL)
