"""The switches that make an epoch faster (docs/performance.md, "Epoch time"): each runs here on the
CPU, so none can rot, and each leaves the model computing what it computed without it."""

import numpy as np
import torch

from cmath_model import CMATHConfig, Trainer
from cmath_model.train import predict

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
