import socket
from pathlib import Path

import pytest

from cmath_model import load_dataset
from cmath_model.synth import write_synthetic

REPO = Path(__file__).resolve().parents[1]

# Fixtures that start a Ray cluster (and usually a sweep on it): a test that uses one is `slow`,
# and the two-node cluster's are `cluster` too. `pytest -m "not slow"` is the quick loop.
RAY_FIXTURES = {"sweep": (), "failing_sweep": (), "launch": (), "cluster": ("cluster",)}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marks in RAY_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                for mark in ("slow", *marks):
                    item.add_marker(mark)
SHARED_MELD = REPO.parent / "shared" / "data" / "meld"


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
