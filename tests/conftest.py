import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cmath_model import load_dataset
from cmath_model.synth import write_synthetic
from hpo.ui import start_ui, stop_ui

REPO = Path(__file__).resolve().parents[1]

# Fixtures that start a Ray cluster (and usually a sweep on it): a test that uses one is `slow`,
# and the two-node cluster's are `cluster` too. `pytest -m "not slow"` is the quick loop.
RAY_FIXTURES = {"sweep": (), "failing_sweep": (), "launch": (), "shared_ray": (), "cluster": ("cluster",)}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marks in RAY_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                for mark in ("slow", *marks):
                    item.add_marker(mark)
SHARED_MELD = REPO.parent / "shared" / "data" / "meld"


@pytest.fixture(scope="module")
def shared_ray():
    """This process's Ray for a module's sweeps (2 CPUs, started as a notebook's ray.init()): each
    sweep runs on it and leaves it running (hpo.cluster.joined_cluster), which saves every sweep
    after the first a Ray start and stop, about 5 s. A test that checks what a sweep starts and
    stops on its own asks for `without_ray`. Stopped, with what it started (by PID), at the
    module's end."""
    import logging

    import ray

    context = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                       log_to_driver=False)
    yield context
    _leave_ray(context.address_info["session_dir"])


@pytest.fixture
def without_ray():
    """No Ray in this process before the test (a module's `shared_ray` is stopped): the sweep
    under test starts and stops its own."""
    import ray

    if ray.is_initialized():
        context = ray.get_runtime_context()  # a session's folder is <temp dir>/<session name>
        _leave_ray(os.path.join(context.get_temp_dir(), context.get_session_name()))


def _leave_ray(session_dir: str) -> None:
    import ray

    from hpo.processes import pids_using, stop

    if ray.is_initialized():
        ray.shutdown()
    stop(pids_using(session_dir), timeout=10)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("data") / "iemocap-tiny.parquet", "iemocap", "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_path):
    return load_dataset(tiny_path)


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    return load_dataset(write_synthetic(tmp_path_factory.mktemp("data") / "iemocap-small.parquet", "iemocap", "small"))


@pytest.fixture(scope="session")
def meld_dir() -> Path:
    """The real MELD transcripts beside the checkout; a clone without them skips these tests, saying why
    (pytest -ra lists each skip with its reason)."""
    if not (SHARED_MELD / "train_sent_emo.csv").exists():
        pytest.skip(f"needs the MELD transcripts at {SHARED_MELD} (../shared beside the repository), "
                    "which a clone does not have")
    return SHARED_MELD


@pytest.fixture(scope="session")
def free_port():
    """A function giving a 127.0.0.1 port nothing listens on (for servers, or as an unreachable address)."""
    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


@pytest.fixture(scope="session")
def postgres(tmp_path_factory, free_port):
    """A PostgreSQL server of the tests' own, on 127.0.0.1, with empty databases `mlflow` and `optuna`
    (their URLs, by name)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        pytest.fail("the tracking-server tests need Debian's PostgreSQL: apt-get install postgresql (.ci/run does)")
    bin_dir = found[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # its socket path must stay short
    # PostgreSQL refuses to run as root: as root, the server runs as `nobody`.
    as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "nobody", "nogroup")
    port = free_port()
    subprocess.run([*as_user, bin_dir / "initdb", "-D", folder / "data", "--auth=trust", "-U", "cmath", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    log = open(tmp_path_factory.mktemp("pglog") / "postgres.log", "w")
    server = subprocess.Popen([*as_user, bin_dir / "postgres", "-D", folder / "data", "-h", "127.0.0.1", "-p",
                               str(port), "-k", folder], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([bin_dir / "pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True,
                             timeout=10).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-2000:]
            time.sleep(0.2)
        for database in ("mlflow", "optuna"):
            subprocess.run([*as_user, bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "cmath",
                            database], check=True, capture_output=True, timeout=60)
        yield {database: f"postgresql://cmath@127.0.0.1:{port}/{database}" for database in ("mlflow", "optuna")}
    finally:
        server.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory, free_port):
    """`mlflow server` on the PostgreSQL store, artifacts through its proxy (as `cmath-hpo ui` starts it)."""
    folder = tmp_path_factory.mktemp("server")
    process, url = start_ui(folder, port=free_port(), mlflow_uri=postgres["mlflow"])
    try:
        yield {"url": url, "artifacts": folder / "mlartifacts", "process": process}
    finally:
        stop_ui(process)
