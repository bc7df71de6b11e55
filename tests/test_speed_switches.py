"""The switches that make an epoch faster (docs/performance.md, "Epoch time"): each runs here on the
CPU, so none can rot, and each leaves the model computing what it computed without it."""

import shutil

import numpy as np
import pytest
import torch

from cmath_model import CMATHConfig, Trainer
from cmath_model.train import compiled, predict

BASE = dict(d=32, batch_size=4, epochs=0, num_threads=1, class_weights="none")


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_fused_adam_takes_the_steps_the_plain_one_takes(tiny):
    """`adam: fused` (the default) is the same update as torch's plain loop, in one kernel per tensor.
    (Compared on given gradients: after real training steps the attention's key biases, whose
    true gradient is zero, differ by how Adam scales their rounding noise.)"""
    generator = torch.Generator().manual_seed(0)
    stepped = {}
    for adam in ("fused", "plain"):
        trainer = Trainer(CMATHConfig(**BASE, adam=adam, weight_decay=1e-5), tiny)
        params = list(trainer.model.parameters())
        generator.manual_seed(0)
        for _ in range(5):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator)
            trainer.optimizer.step()
        stepped[adam] = _weights(trainer)
    for name, value in stepped["plain"].items():
        assert torch.allclose(stepped["fused"][name], value, atol=1e-6), name


def test_scoring_in_bigger_batches_gives_the_same_predictions(tiny):
    """`eval_batch_size` only groups dialogues: every utterance's probabilities stay the same."""
    trainer = Trainer(CMATHConfig(**BASE), tiny)
    trainer.train_epoch()
    split = tiny.splits["valid"]
    y1, pred1, prob1 = predict(trainer.eval_model, split, 1, trainer.device)
    y64, pred64, prob64 = predict(trainer.eval_model, split, 64, trainer.device)
    assert np.array_equal(y1, y64) and np.array_equal(pred1, pred64)
    assert np.allclose(prob1, prob64, atol=1e-5)


def test_bf16_trains_and_scores_close_to_fp32(tiny):
    """`precision: bf16` runs the matrix products in bfloat16; the same weights then predict
    (nearly) what they predict in fp32, and training stays finite."""
    trainer = Trainer(CMATHConfig(**BASE, precision="bf16"), tiny)
    record = trainer.step()
    assert np.isfinite(record["train_loss"]) and 0.0 <= record["val_wf1"] <= 1.0
    split = tiny.splits["test"]
    _, pred16, prob16 = trainer.predict(split)
    _, pred32, prob32 = predict(trainer.eval_model, split, 64, trainer.device)
    assert prob16.dtype == np.float32
    assert (pred16 == pred32).mean() >= 0.9
    assert np.abs(prob16 - prob32).max() < 0.05


def test_without_a_compiler_compile_falls_back_to_eager_with_one_warning(tiny, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    trainer = Trainer(CMATHConfig(**BASE, compile="default"), tiny)
    assert trainer.training_model is trainer.model
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "compile: default needs a C/C++ compiler" in warnings[0]
    assert "set compile: none" in warnings[0]
    assert np.isfinite(trainer.step()["train_loss"])


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="no C++ compiler for TorchInductor")
def test_a_compiled_model_computes_what_the_eager_one_does(tiny):
    """`compile: default` on the CPU (TorchInductor's C++ kernels): the same outputs as eager for
    the same weights and inputs, and checkpoints keep the eager model's keys. (The forward pass
    only: compiling the backward too took minutes on two cores.)"""
    trainer = Trainer(CMATHConfig(**BASE, dropout=0.0, compile="default"), tiny)
    assert trainer.training_model is not trainer.model
    batch = tiny.splits["train"].packed_batch(torch.arange(4), trainer.model.modalities)
    trainer.model.eval()  # no variational sample: the two runs see the same numbers
    eager = trainer.model(batch.features, batch.speaker, batch.mask, batch.positions)
    fast = trainer.training_model(batch.features, batch.speaker, batch.mask, batch.positions)
    assert torch.allclose(eager.logits_x, fast.logits_x, atol=1e-4)
    assert not any(key.startswith("_orig_mod") for key in trainer.model.state_dict())


def test_compile_none_is_the_model_itself():
    model = torch.nn.Linear(2, 2)
    assert compiled(model, "none", torch.device("cpu")) == (model, None)
