"""Checkpoints load with torch.load(weights_only=True): a tampered one is refused, not run.

Checkpoints come from shared storage and MLflow artifacts; whoever can write there must not
be able to run code on every node that loads them. Also: a Trainer on any device uses the
configured number of CPU threads.
"""

import importlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmath_model import CMATHConfig, Trainer
from cmath_model.errors import DataError
from cmath_model.train import load_model

train_module = importlib.import_module("cmath_model.train")  # the package's `train` is the function
CONFIG = CMATHConfig(d=16, batch_size=8, epochs=0, dropout=0.2)


class CreatesAFile:
    """Unpickling this opens (so creates) `path`: a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def with_payload(monkeypatch, tmp_path):
    """Checkpoints written from here on carry a payload next to their real contents; returns the
    file that unpickling the payload would create."""
    target = tmp_path / "payload-ran"
    real_save = train_module._atomic_torch_save
    monkeypatch.setattr(train_module, "_atomic_torch_save",
                        lambda obj, path: real_save({**obj, "payload": CreatesAFile(target)}, path))
    return target


def _trained(tiny) -> Trainer:
    trainer = Trainer(CONFIG, tiny)
    trainer.step()
    return trainer


def test_tampered_model_pt_is_refused(tiny, tmp_path, with_payload):
    best = _trained(tiny).save_best(tmp_path / "best")
    needle = rf"{best / 'model.pt'}: refusing to load: it holds pickled code .*not only weights"
    with pytest.raises(DataError, match=needle):
        load_model(best)
    with pytest.raises(DataError, match=needle):
        Trainer(CONFIG, tiny, keep_best=True).load_best(best)
    assert not with_payload.exists()

    proc = subprocess.run([sys.executable, "-c", "import sys; from cmath_model.cli import eval_main; "
                           "sys.exit(eval_main(sys.argv[1:]))", "--checkpoint", str(best)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {best / 'model.pt'}: refusing to load"), proc.stderr
    assert "pickled code" in lines[0] and "weights_only" in lines[0]
    assert not with_payload.exists()


def test_tampered_trainer_pt_is_refused(tiny, tmp_path, with_payload):
    ckpt = _trained(tiny).save(tmp_path / "ckpt")
    with pytest.raises(DataError, match=rf"{ckpt / 'trainer.pt'}: refusing to load: it holds pickled code"):
        Trainer(CONFIG, tiny).load(ckpt)
    assert not with_payload.exists()


def test_corrupt_trainer_pt_is_a_clear_error(tiny, tmp_path):
    ckpt = _trained(tiny).save(tmp_path / "ckpt")
    (ckpt / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"trainer.pt: refusing to load: not a weights-only torch checkpoint"):
        Trainer(CONFIG, tiny).load(ckpt)


def test_trainer_checkpoint_is_weights_only_and_restores_every_rng(tiny, tmp_path):
    """Exact resume itself is test_training's test_checkpoint_round_trip_equals_straight_training;
    here: the file needs no unpickling beyond weights, and numpy's and Python's RNG states (which
    an epoch does not use, so that test cannot see them) come back exactly."""
    trainer = _trained(tiny)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    random.random()
    numpy_state, python_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    ckpt = trainer.save(tmp_path / "ckpt")

    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["epoch"] == 1 and state["history"] == trainer.history and state["best"] == trainer.best

    resumed = Trainer(CONFIG, tiny)  # reseeds every RNG
    np.random.seed(123)
    resumed.load(ckpt)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    assert (name, pos, has_gauss, cached) == (numpy_state[0], *numpy_state[2:]) and has_gauss == 1
    assert keys.dtype == numpy_state[1].dtype and np.array_equal(keys, numpy_state[1])
    assert random.getstate() == python_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert resumed.epoch == 1 and resumed.history == trainer.history


def test_threads_are_set_on_every_device(tiny):
    """A GPU trial batches and scores on the CPU too; packed trials must not each take every core.
    The meta device stands in for a GPU here: not the CPU, and a model and Adam can live on it."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        trainer = Trainer(CONFIG.replace(num_threads=1), tiny, device="meta")
        assert next(trainer.model.parameters()).device.type == "meta"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
