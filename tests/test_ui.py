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

from hpo.processes import is_running
from hpo.tracking import default_tracking_uri


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
@pytest.mark.slow
def test_a_stopped_ui_command_stops_its_server(signum, tmp_path, free_port):
    MlflowClient(default_tracking_uri(tmp_path)).search_experiments()  # an empty store to serve
    port = free_port()
    command = subprocess.Popen([sys.executable, "-m", "hpo.cli", "ui", "--results", str(tmp_path), "--port",
                                str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server_pid = None
    try:
        line = command.stdout.readline()  # printed once the server answers
        assert line.startswith("MLflow UI: "), line + command.stdout.read()[-2000:]
        server_pid = int(line.split("(pid ")[1].split(";")[0])
        url = f"http://127.0.0.1:{port}"
        assert _answers(url)
        command.send_signal(signum)
        command.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (is_running(server_pid) or _answers(url)):
            time.sleep(0.2)
        assert not is_running(server_pid), f"the server (pid {server_pid}) outlived `cmath-hpo ui`"
        assert not _answers(url)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
        if server_pid and is_running(server_pid):  # what this test started, by PID
            os.killpg(server_pid, signal.SIGKILL)
