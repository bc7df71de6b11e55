"""Each equation's module on hand-made inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from cmath_model.config import ABLATIONS, CMATHConfig
from cmath_model.model import (
    CMATH,
    Gate,
    Layout,
    ModalityReconstruction,
    MultiHeadAttention,
    SpeakerPositionEmbedding,
    VariationalFusion,
    attention_bias,
    attention_mask,
    cmath_loss,
    dropout,
    high_level_distillation,
    low_level_distillation,
    sinusoidal_positions,
)

DIMS = {"text": 20, "audio": 12, "visual": 8}


def small_config(**kw) -> CMATHConfig:
    return CMATHConfig(**{"d": 16, "dropout": 0.0, **kw})


def inputs(B=2, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, L, D, generator=g) for m, D in DIMS.items()}
    speaker = torch.randint(0, 2, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    return feats, speaker, mask


def reconstruction_case(kernel_size: int):
    """A reconstruction module, inputs with padding, and Eq. 1-4 computed through its nn.Conv1d layers."""
    torch.manual_seed(0)
    mr = ModalityReconstruction(20, 8, kernel_size=kernel_size, reduction="mean")
    x = torch.randn(2, 5, 20)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    xz = x * mask.unsqueeze(-1)
    u_conv = mr.down(xz.transpose(1, 2)) * mask.unsqueeze(1)
    x_rec = mr.up(u_conv).transpose(1, 2)
    layout = Layout.of(mask)  # the module takes and gives the real utterances packed
    return mr, layout.pack(x), layout, layout.pack(u_conv.transpose(1, 2)), F.mse_loss(x_rec[mask], xz[mask])


def test_modality_reconstruction_shapes_and_loss():
    mr, x, layout, u_conv, loss_conv = reconstruction_case(kernel_size=3)
    u, loss = mr(x, layout)
    assert u.shape == (7, 8)  # 5 + 2 real utterances
    assert torch.allclose(u, u_conv, atol=1e-6)  # a kernel of 3 sees only its own dialogue's utterances
    assert loss.item() == pytest.approx(loss_conv.item(), rel=1e-5)
    no_rec = ModalityReconstruction(20, 8, reconstruct=False)
    assert no_rec.up is None and no_rec(x, layout)[1].item() == 0.0


def test_kernel_one_reconstruction_is_the_conv1d_it_replaces():
    """Kernel 1 runs as a matrix product; it must give the Conv1D's own outputs and gradients."""
    mr, x, layout, u_conv, loss_conv = reconstruction_case(kernel_size=1)
    u, loss = mr(x, layout)
    assert torch.allclose(u, u_conv, atol=1e-6)
    assert torch.allclose(loss, loss_conv, atol=1e-6)
    grads = torch.autograd.grad(loss, [mr.down.weight, mr.up.weight, mr.up.bias])
    grads_conv = torch.autograd.grad(loss_conv, [mr.down.weight, mr.up.weight, mr.up.bias])
    for a, b in zip(grads, grads_conv):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("modalities", ["tav", "t"])
def test_a_dialogue_gives_the_same_outputs_alone_and_padded_in_a_batch(modalities):
    """Batching pads shorter dialogues; nothing of the padding or of the other dialogues may
    reach a dialogue's outputs (what makes the batched model the per-dialogue equations)."""
    torch.manual_seed(0)
    model = CMATH(small_config(modalities=modalities), DIMS, num_classes=6, max_speakers=2).eval()
    feats, speaker, mask = inputs(B=3, L=7)
    mask[1, 4:] = False
    mask[2, 2:] = False
    for m in feats:  # garbage in the padding must not matter either
        feats[m][~mask] = 1e3
    batched = model(feats, speaker, mask)
    lengths = mask.sum(1).tolist()
    assert batched.logits_x.shape == (sum(lengths), 6)  # one row per real utterance
    for b, n in enumerate(lengths):
        alone = model({m: x[b:b + 1, :n] for m, x in feats.items()}, speaker[b:b + 1, :n],
                      torch.ones(1, n, dtype=torch.bool))
        assert torch.allclose(batched.logits_x.split(lengths)[b], alone.logits_x, atol=1e-5)
        for m in alone.logits_m:
            assert torch.allclose(batched.logits_m[m].split(lengths)[b], alone.logits_m[m], atol=1e-5)


def test_sinusoidal_positions_follow_eq_6_7():
    d = 11  # odd widths work too
    p = sinusoidal_positions(7, d)
    assert p.shape == (7, d)
    for i in (0, 3, 6):
        for k in range(d // 2):
            assert p[i, 2 * k].item() == pytest.approx(math.sin(i / 10000 ** (2 * k / d)), abs=1e-5)
            assert p[i, 2 * k + 1].item() == pytest.approx(math.cos(i / 10000 ** (2 * k / d)), abs=1e-5)


def test_speaker_and_position_embedding():
    emb = SpeakerPositionEmbedding(8, max_speakers=3)
    speaker = torch.tensor([[0, 1, 0], [1, 0, 2]])
    layout = Layout.of(torch.tensor([[True, True, True], [True, True, False]]))
    out = emb(speaker, layout)  # (5, 8): the real utterances in a row
    table = sinusoidal_positions(3, 8)
    assert out.shape == (5, 8)
    assert torch.allclose(out[0] - out[2], table[0] - table[2], atol=1e-6)  # same speaker: P differs only
    assert torch.allclose(out[1], emb.speaker.weight[1] + table[1])
    assert torch.allclose(out[4], emb.speaker.weight[0] + table[1])  # the second dialogue's second turn
    assert torch.count_nonzero(SpeakerPositionEmbedding(8, 3, use_context=False)(speaker, layout)) == 0


def test_softmax_gate_weights_sum_to_one_and_mix_convexly():
    torch.manual_seed(0)
    gate = Gate(6, 3, "softmax")
    streams = [torch.randn(2, 4, 6) for _ in range(3)]
    w = gate.weights(streams)
    assert w.shape == (3, 2, 4, 6)
    assert torch.allclose(w.sum(0), torch.ones(2, 4, 6))
    assert (w > 0).all()
    assert torch.allclose(gate(streams), (w * torch.stack(streams)).sum(0))
    same = torch.randn(2, 4, 6)
    assert torch.allclose(gate([same, same, same]), same, atol=1e-6)  # a convex mix of equal streams


def test_sigmoid_gate_is_sdt_style():
    """Each stream passes through its own sigmoid gate, then one linear layer mixes them (SDT):
    a gate held open passes its stream whole, a closed one passes nothing."""
    gate = Gate(6, 2, "sigmoid")
    a, b = torch.randn(1, 3, 6), torch.randn(1, 3, 6)
    with torch.no_grad():
        for g in gate.gates:
            g.weight.zero_()
        gate.gates[0].bias.fill_(50.0)  # open
        gate.gates[1].bias.fill_(-50.0)  # closed
        only_a = gate.mix(torch.cat([a, torch.zeros_like(b)], -1))
        assert torch.allclose(gate([a, b]), only_a, atol=1e-6)
        assert torch.allclose(gate([a, torch.randn_like(b)]), only_a, atol=1e-6)  # b cannot get through


def test_variational_fusion_uses_the_mean_at_eval_and_samples_in_training():
    torch.manual_seed(0)
    fusion = VariationalFusion(8, ("text", "audio"))
    h = {"text": torch.randn(4, 50, 8), "audio": torch.randn(4, 50, 8)}
    mu = (fusion.mu["text"](h["text"]) + fusion.mu["audio"](h["audio"])) / 2
    sigma = (F.softplus(fusion.log_sigma["text"](h["text"])) + F.softplus(fusion.log_sigma["audio"](h["audio"]))) / 2
    fusion.eval()
    sample, mu_out, sigma_out = fusion(h)
    assert torch.allclose(sample, mu, atol=1e-6) and torch.allclose(mu_out, mu, atol=1e-6)
    assert torch.allclose(sigma_out, sigma + 1e-4, atol=1e-6)
    fusion.train()
    sample, _, sigma_out = fusion(h)
    eps = (sample - mu) / sigma_out
    assert not torch.allclose(sample, mu)
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05  # H'_x = mu + eps * sigma


def test_input_dropout_drops_raw_features_in_training_only():
    torch.manual_seed(0)
    model = CMATH(small_config(input_dropout=0.5), DIMS, num_classes=4, max_speakers=2)
    seen = {}
    for m, module in model.reconstruction.items():
        module.register_forward_pre_hook(lambda _, args, m=m: seen.__setitem__(m, args[0]))
    feats, speaker, mask = inputs(B=4, L=50)
    model.train()
    model(feats, speaker, mask)
    feats = {m: Layout.of(mask).pack(x) for m, x in feats.items()}  # the model drops on the real utterances
    for m, x in feats.items():
        kept = seen[m] != 0
        assert 0.4 < kept.float().mean().item() < 0.6  # each value dropped with p 0.5
        assert torch.allclose(seen[m][kept], 2 * x[kept])  # the rest scaled by 1 / (1 - p)
    model.eval()
    model(feats, speaker, mask)  # packed features go in as they are
    assert all(torch.equal(seen[m], x) for m, x in feats.items())


def test_distillation_terms_are_zero_when_fused_and_modal_agree():
    h = torch.randn(3, 4)  # (N, d): three real utterances
    logits = torch.randn(3, 5)
    assert low_level_distillation(h, {"text": h.clone(), "audio": h.clone()}).item() == 0.0
    assert high_level_distillation(logits, {"text": logits.clone()}).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.randn(3, 4)
    assert low_level_distillation(h, {"text": other}, reduction="mean").item() == pytest.approx(
        ((h - other) ** 2).mean().item())


def test_squared_norms_are_each_dialogues_frobenius_norm_averaged_over_dialogues():
    """Eq. 3 and 18 (`norm_reduction: sum`, the paper's reading) against the same norms computed
    dialogue by dialogue on the padded layout; `mean` is the per-element MSE."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    layout = Layout.of(mask)
    h_x, h_t = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    per_dialogue = [torch.linalg.matrix_norm(h_x[b][mask[b]] - h_t[b][mask[b]]) ** 2 for b in range(3)]
    packed = {"text": layout.pack(h_t)}
    got = low_level_distillation(layout.pack(h_x), packed, dialogues=3, reduction="sum")
    assert got.item() == pytest.approx(torch.stack(per_dialogue).mean().item(), rel=1e-5)
    mse = low_level_distillation(layout.pack(h_x), packed, dialogues=3, reduction="mean")
    assert mse.item() == pytest.approx((got * 3 / (9 * 6)).item(), rel=1e-5)  # 9 real utterances x 6 dims

    mr = ModalityReconstruction(6, 4, reduction="sum")
    x = layout.pack(torch.randn(3, 4, 6))
    _, loss_sum = mr(x, layout)
    mr.reduction = "mean"
    _, loss_mean = mr(x, layout)
    assert loss_sum.item() == pytest.approx(loss_mean.item() * 9 * 6 / 3, rel=1e-5)


def test_the_paper_reading_sums_the_squared_norms_and_the_recipe_averages_them():
    from cmath_model.config import from_dict, paper_defaults, recipe_defaults

    for dataset in ("iemocap", "meld"):
        assert paper_defaults(dataset).norm_reduction == "sum"
        assert recipe_defaults(dataset).norm_reduction == "mean"
    # A whole config written before the field existed trained with means; it still does.
    old = recipe_defaults("meld").to_dict()
    del old["norm_reduction"]
    old["defaults"] = "paper"
    assert from_dict(old).norm_reduction == "mean"
    assert from_dict({"d": 16}).norm_reduction == "sum"  # a partial config takes the field's default


def test_kl_term_matches_eq_23():
    zx, zm = torch.randn(2, 4), torch.randn(2, 4)
    px, pm = torch.softmax(zx, -1), torch.softmax(zm, -1)
    expected = (px * (px.log() - pm.log())).sum(-1).mean()
    assert high_level_distillation(zx, {"text": zm}).item() == pytest.approx(expected.item(), rel=1e-5)


def test_attention_mask_never_allows_padded_keys():
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    allowed = attention_mask(mask, use_context=True)
    assert allowed[0, :2, 2:].sum() == 0  # real queries never see padding
    assert allowed.diagonal(dim1=1, dim2=2).all()  # every row has at least itself
    alone = attention_mask(mask, use_context=False)
    assert torch.equal(alone[0], torch.eye(4, dtype=torch.bool))


@pytest.mark.parametrize("d", [100, 101, 127, 250, 333, 499, 500, 600])
def test_any_d_from_100_to_600_builds(d):
    cfg = CMATHConfig(d=d, dropout=0.0)
    model = CMATH(cfg, DIMS, num_classes=6, max_speakers=9)
    attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert attention and {m.n_heads for m in attention} == {cfg.heads}
    feats, speaker, mask = inputs()
    out = model(feats, speaker, mask)
    n = int(mask.sum())
    assert out.logits_x.shape == (n, 6) and out.h_x.shape == (n, d)


@pytest.mark.parametrize("d, heads", [(100, 5), (101, 1), (127, 1), (250, 5), (333, 3), (400, 8), (500, 5),
                                      (600, 8), (210, 7)])
def test_heads_are_the_largest_divisor_of_d_up_to_8(d, heads):
    assert CMATHConfig(d=d).heads == heads


@pytest.mark.parametrize("modalities", ["t", "a", "v", "ta", "tv", "av", "tav"])
def test_every_modality_subset_runs(modalities):
    cfg = small_config(modalities=modalities)
    model = CMATH(cfg, DIMS, num_classes=4, max_speakers=9)
    feats, speaker, mask = inputs()
    out = model(feats, speaker, mask)
    assert set(out.logits_m) == set(cfg.modality_names)
    terms = cmath_loss(out, torch.randint(0, 4, (2, 5)), mask, cfg)
    assert torch.isfinite(terms["loss"])


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablations_switch_off_their_part(ablation):
    cfg = small_config(ablation=ablation)
    model = CMATH(cfg, DIMS, num_classes=4, max_speakers=9)
    feats, speaker, mask = inputs()
    terms = cmath_loss(model(feats, speaker, mask), torch.randint(0, 4, (2, 5)), mask, cfg)
    assert (terms["loss_re"].item() == 0) == (ablation == "wo_mr")
    assert (terms["loss_mse"].item() == 0) == (ablation in ("wo_lld", "wo_hd"))
    assert (terms["loss_kl"].item() == 0) == (ablation in ("wo_hld", "wo_hd"))
    has_cross = any(len(layer.aux) for layer in model.cma["text"].layers)
    assert has_cross == (ablation != "wo_cmat")


def test_total_loss_is_eq_24():
    cfg = small_config(gamma1=0.7, gamma2=1.3)
    model = CMATH(cfg, DIMS, num_classes=4, max_speakers=9)
    feats, speaker, mask = inputs()
    t = cmath_loss(model(feats, speaker, mask), torch.randint(0, 4, (2, 5)), mask, cfg)
    expected = t["loss_ce"] + t["loss_re"] + 0.7 * t["loss_mse"] + 1.3 * t["loss_kl"]
    assert t["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_dropout_keeps_each_value_with_probability_1_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y != 0
    assert 0.69 < kept.float().mean().item() < 0.71
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the gradient flows through the kept values only
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x


def test_attention_with_dropout_is_sdpa_with_the_weights_dropped():
    """Training on the CPU computes attention step by step (for dropout's cheaper masks); with
    nothing dropped it must be what SDPA gives, padding and all."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 4, dropout=1e-12)  # drops nothing in practice, takes the training path
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    layout = Layout.of(mask)
    query, key_value = torch.randn(7, 16), torch.randn(7, 16)
    bias = attention_bias(mask, use_context=True)
    trained = attention.train()(query, key_value, layout, bias)
    assert torch.allclose(trained, attention.eval()(query, key_value, layout, bias), atol=1e-6)
