"""Padding dialogues and padded utterances change no output and no loss."""

import pytest
import torch

from cmath_model.config import CMATHConfig
from cmath_model.model import CMATH, cmath_loss

DIMS = {"text": 20, "audio": 12, "visual": 8}


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("context", ["dialogue", "none"])
def test_padding_changes_no_output_and_no_loss(kernel_size, context):
    torch.manual_seed(0)
    cfg = CMATHConfig(d=16, dropout=0.0, kernel_size=kernel_size, context=context, class_weights="none")
    model = CMATH(cfg, DIMS, num_classes=4, max_speakers=9).eval()
    L = 5
    feats = {m: torch.randn(1, L, D) for m, D in DIMS.items()}
    speaker = torch.tensor([[0, 1, 0, 1, 1]])
    label = torch.tensor([[0, 1, 2, 3, 1]])
    mask = torch.ones(1, L, dtype=torch.bool)

    # Same dialogue, padded to 9 utterances with garbage, next to a longer dialogue and an empty one.
    P = 9
    padded_feats = {m: torch.randn(3, P, D) * 50 for m, D in DIMS.items()}
    for m in DIMS:
        padded_feats[m][0, :L] = feats[m][0]
    padded_speaker = torch.randint(0, 5, (3, P))
    padded_speaker[0, :L] = speaker[0]
    padded_label = torch.randint(0, 4, (3, P))
    padded_label[0, :L] = label[0]
    padded_mask = torch.zeros(3, P, dtype=torch.bool)
    padded_mask[0, :L] = True
    padded_mask[1, :] = True  # a longer real dialogue
    # row 2 is a padding dialogue: all False

    with torch.no_grad():
        alone = model(feats, speaker, mask)
        batched = model(padded_feats, padded_speaker, padded_mask)
        assert batched.logits_x.shape[0] == int(padded_mask.sum()) and torch.isfinite(batched.logits_x).all()
        assert torch.allclose(alone.logits_x, batched.logits_x[:L], atol=1e-5)  # dialogue 0 comes first
        for m in cfg.modality_names:
            assert torch.allclose(alone.logits_m[m], batched.logits_m[m][:L], atol=1e-5)

        only_first = padded_mask.clone()
        only_first[1] = False  # now dialogue 1 is padding too: the loss covers dialogue 0 alone
        loss_alone = cmath_loss(alone, label, mask, cfg)
        loss_padded = cmath_loss(model(padded_feats, padded_speaker, only_first), padded_label, only_first, cfg)
    for key, value in loss_alone.items():
        assert value.item() == pytest.approx(loss_padded[key].item(), rel=1e-4, abs=1e-6), key
