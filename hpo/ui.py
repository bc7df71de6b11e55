"""`cmath-hpo ui`: the MLflow UI on the sweep store, bound to 127.0.0.1 unless asked otherwise."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cmath_model.tracking import default_tracking_uri, sqlite_file

from .errors import SweepError


def start_ui(results: str | Path = "results", port: int = 5000, host: str = "127.0.0.1",
             mlflow_uri: str | None = None, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` (one worker, no job runner: 2 processes instead of 15) and wait
    until it answers. Returns the process (stop it by its PID) and the URL."""
    uri = mlflow_uri or default_tracking_uri(results)
    database = sqlite_file(uri)
    if database is not None and not database.exists():
        raise SweepError(f"no MLflow store at {uri}; run a sweep first or pass --results/--mlflow-uri")
    artifacts = Path(results) / "mlartifacts"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1", "--artifacts-destination", str(artifacts.resolve())]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = Path(results) / "mlflow-ui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://{host}:{port}"
    try:
        return process, _wait_until_up(process, url, port, log, timeout)
    except BaseException:  # Ctrl-C included: the server runs in its own session and would outlive us
        stop_ui(process)
        raise


def experiment_url(server: str, experiment_id: str) -> str:
    """A link that opens a sweep's experiment on its trials, best first. MLflow 3.17's UI opens
    every experiment in its GenAI view (a traces dashboard, "Traces 0") unless the link asks for
    the model-training one, whatever the experiment's kind; its runs list nests the trials under
    the sweep's parent run, collapsed, unless it is filtered or sorted by something other than
    the start time. So the link asks for the runs, the trial runs only, sorted by their best
    validation W-F1; each trial's name says its number, score and values, the best one marked
    (hpo.tracking.trial_run_name). Clearing the search box shows the parent run again.

    Args:
        server: the UI's address (`start_ui` returns it).
        experiment_id: the MLflow experiment (a sweep's is in its sweep.json).

    Returns:
        The URL.
    """
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "orderByKey": "metrics.`best_val_wf1`",
                                    "orderByAsc": "false", "searchFilter": "tags.`cmath.kind` = 'trial'"},
                                   quote_via=urllib.parse.quote)
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def sweep_links(server: str, results: str | Path = "results", most: int = 5) -> list[str]:
    """One line per sweep under `results` (the newest `most`): its name and `experiment_url`."""
    from .record import SWEEP_FILE, read_record

    lines = []
    for path in sorted(Path(results).glob(f"*/{SWEEP_FILE}"), key=lambda p: p.stat().st_mtime)[-most:]:
        try:
            record = read_record(path.parent)
            lines.append(f"  sweep {record['name']}: {experiment_url(server, record['mlflow']['experiment_id'])}")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a sweep refused before its record opened, or a foreign folder
    return lines


def _die_with_parent() -> None:
    """In the server, before exec: SIGTERM it when the process that started it dies, even by
    SIGKILL, which leaves no chance to stop it (it runs in a session of its own, so it would
    otherwise go on serving the port under PID 1)."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve_until_stopped(process: subprocess.Popen) -> None:
    """Wait for the server until this process is told to stop (Ctrl-C, SIGTERM, SIGHUP: a closed
    terminal), then stop the server and its workers."""
    def stop_waiting(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop_waiting) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_until_up(process: subprocess.Popen, url: str, port: int, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise SweepError(f"the MLflow UI exited at start ({tail[0]}); is port {port} taken? try --port; "
                             f"log: {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return url
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise SweepError(f"the MLflow UI did not answer on {url} within {timeout:.0f}s; log: {log}")


def stop_ui(process: subprocess.Popen) -> None:
    """Stop the server and its workers: it runs in a session of its own, so signal that group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
