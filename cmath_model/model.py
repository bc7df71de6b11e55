"""CMATH (Cross-Modality Augmented Transformer with Hierarchical Variational Distillation).

One module per idea, named after the paper's equations. Shapes: B dialogues, L utterances
(padded), N real utterances of the batch, D_m input width of modality m, d common width, C classes.
`mask` is (B, L) and True for real utterances. Everything that works utterance by utterance
(projections, FFNs, norms, gate, fusion, heads: nearly all the arithmetic) runs on the N real
utterances packed in a row (`Layout.pack`, the order of `x[mask]`); only attention, which needs
a dialogue's utterances side by side, sees the padded (B, L) layout, and padding never reaches its
keys. So padding costs no arithmetic outside attention and reaches no output, loss or metric.

Choices the paper leaves open (reference-notes.md), each a CMATHConfig field:
- Conv1D kernel 1, no bias on the down-projection (SDT); zero-padded so padding cannot leak
  into real positions whatever the kernel.
- Attention heads: the largest divisor of d up to 8, so every d in 100..600 builds.
- Norm = LayerNorm, FFN = Linear(d, ffn) -> GELU -> Dropout -> Linear(ffn, d) (SDT: ffn = d).
- Gate (Eq. 12): `softmax` (default) mixes the streams with per-dimension weights that sum
  to one: a convex combination, so the fused stream stays on the streams' scale; `sigmoid`
  is SDT's sigmoid gate per stream followed by Linear(k*d -> d).
- sigma (Eq. 15) = softplus(MLP) + 1e-4 (or exp); MLPs are Linear -> ReLU -> Linear.
- Eval uses the mean mu_x, not a sample (Eq. 17 only holds for training).
- Squared Frobenius norms (Eq. 3, 18) are taken as means over real utterances and feature
  dimensions, so no term's scale depends on D_m or dialogue length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CMATHConfig


# ---------------------------------------------------------------- packed and padded layouts
@dataclass
class Layout:
    """Where a batch's N real utterances sit in its padded (B, L) layout."""

    mask: torch.Tensor  # (B, L) bool
    positions: torch.Tensor  # (N,) long: flat indices b * L + i of the real utterances, ascending

    @classmethod
    def of(cls, mask: torch.Tensor, positions: torch.Tensor | None = None) -> Layout:
        """`positions` may come precomputed (from the data loader, on the host), which saves a
        device-to-host sync on a GPU."""
        if positions is None:
            positions = mask.reshape(-1).nonzero().squeeze(1)
        return cls(mask, positions)

    @property
    def dialogues(self) -> torch.Tensor:
        """() the number of dialogues with a real utterance (a batch may carry empty padding rows)."""
        return real_dialogues(self.mask)

    @property
    def turn(self) -> torch.Tensor:
        """(N,) each real utterance's position within its dialogue."""
        return self.positions % self.mask.shape[1]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (N, ...): the real utterances, in order."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.positions)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, L, C), zeros at padding."""
        B, L = self.mask.shape
        return x.new_zeros(B * L, x.shape[-1]).index_copy(0, self.positions, x).view(B, L, -1)


# ---------------------------------------------------------------- Eq. 1-4: Modality Reconstruction
class ModalityReconstruction(nn.Module):
    """U'_m = Conv1D'(U_m) down to d; U''_m = Conv1D''(U'_m) back up; L_re = ||U_m - U''_m||^2.

    U_m is first standardised with the training split's per-dimension mean and std when
    `input_norm: standardize` (`set_input_stats`); the buffers are the identity otherwise. Why:
    sentence embeddings such as MiniLM's have unit norm, so each dimension is about 0.05 and the
    projected text starts 40 times smaller than the speaker and position embeddings it is added
    to (Eq. 8); at MELD's lr the model then predicts the majority class for epochs."""

    def __init__(self, dim_in: int, d: int, kernel_size: int = 1, reconstruct: bool = True,
                 reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction
        self.register_buffer("input_mean", torch.zeros(dim_in))
        self.register_buffer("input_std", torch.ones(dim_in))
        self.down = nn.Conv1d(dim_in, d, kernel_size, padding=kernel_size // 2, bias=False)
        self.up = nn.Conv1d(d, dim_in, kernel_size, padding=kernel_size // 2) if reconstruct else None

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.input_mean) / self.input_std  # (N, D_m)
        u = conv(self.down, x, layout)  # (N, d)
        if self.up is None:
            return u, x.new_zeros(())
        x_rec = conv(self.up, u, layout)  # (N, D_m)
        return u, squared_error(x_rec, x, layout.dialogues, self.reduction)


def real_dialogues(mask: torch.Tensor) -> torch.Tensor:
    """() how many rows of a (B, L) mask hold a real utterance; a tensor, so no host sync."""
    return mask.any(1).sum().clamp_min(1)


def squared_error(x: torch.Tensor, target: torch.Tensor, dialogues: torch.Tensor | int, reduction: str
                  ) -> torch.Tensor:
    """Eq. 3 and 18's ||target - x||_F^2 for a batch of packed (N, C) utterances.

    `sum` is the paper's reading: each dialogue's squared Frobenius norm (its n x C matrix, summed
    over utterances and dimensions), averaged over the batch's `dialogues` as the CE's per-dialogue
    means are. `mean` averages over every element (MSE), which divides the term by about
    C x utterances per dialogue (`norm_reduction`, docs/model.md)."""
    if reduction == "mean":
        return F.mse_loss(x, target)
    return F.mse_loss(x, target, reduction="sum") / dialogues


def conv(layer: nn.Conv1d, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Conv1D over each dialogue's utterances, (N, C_in) -> (N, C_out). A kernel of 1 (the default)
    is the same weights applied as one matrix product on the packed utterances; a wider kernel
    runs on the padded layout, whose zeros are the convolution's own zero padding."""
    if layer.kernel_size[0] == 1:
        return F.linear(x, layer.weight[:, :, 0], layer.bias)
    return layout.pack(layer(layout.pad(x).transpose(1, 2)).transpose(1, 2))


# ---------------------------------------------------------------- Eq. 5-8: speaker + position
def sinusoidal_positions(length: int, d: int, device: torch.device | None = None) -> torch.Tensor:
    """p_i^{2k} = sin(i / 10000^{2k/d}), p_i^{2k+1} = cos(...); (L, d), works for odd d."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d, device=device)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: d // 2])
    return table


class SpeakerPositionEmbedding(nn.Module):
    """S + P of Eq. 8; s_j = V_s o(s_j) (Eq. 5) is an embedding lookup of the speaker index."""

    def __init__(self, d: int, max_speakers: int, use_context: bool = True):
        super().__init__()
        self.speaker = nn.Embedding(max_speakers, d)
        self.use_context = use_context
        # P for the longest dialogue so far, made once (not saved: it is a function of d alone).
        self.register_buffer("positions", sinusoidal_positions(128, d), persistent=False)

    def forward(self, speaker: torch.Tensor, layout: Layout) -> torch.Tensor:
        """(B, L) speaker indices -> (N, d)."""
        d = self.speaker.embedding_dim
        if not self.use_context:  # each utterance alone: neither its turn nor its speaker
            return torch.zeros(layout.positions.shape[0], d, device=speaker.device)
        if layout.mask.shape[1] > self.positions.shape[0]:
            self.positions = sinusoidal_positions(2 * layout.mask.shape[1], d, self.positions.device)
        return self.speaker(layout.pack(speaker)) + self.positions.index_select(0, layout.turn)


# ---------------------------------------------------------------- dropout
def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: each value kept with probability 1 - p and scaled by 1 / (1 - p).

    On the CPU the mask is drawn as uniform numbers compared with p: the same Bernoulli masks as
    F.dropout's, drawn about four times faster (F.dropout's bernoulli_ on 800 x 500 values took
    longer than a d-500 matrix product over the same rows, 11 % of an IEMOCAP-size epoch). On a
    GPU, F.dropout's fused kernel is the faster one."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep = (torch.rand_like(x) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))  # the mask, scaled: one product to undo
    return x * keep


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# ---------------------------------------------------------------- attention building blocks
class MultiHeadAttention(nn.Module):
    """CA(Q, K, V) / SA(H, H, H): scaled dot-product attention over the utterances of a dialogue."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.dropout = dropout

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, layout: Layout, bias: torch.Tensor
                ) -> torch.Tensor:
        """(N, d) packed queries and keys -> (N, d); the projections run packed, the attention padded."""
        B, L = layout.mask.shape
        d = query.shape[-1]

        def heads(x: torch.Tensor) -> torch.Tensor:  # (N, d) -> (B, h, L, d/h)
            return layout.pad(x).view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q(query)), heads(self.k(key_value)), heads(self.v(key_value))
        if self.training and self.dropout and q.device.type == "cpu":
            # SDPA runs its plain kernel when it drops attention weights, drawing the mask with
            # bernoulli_; the same steps here draw it with `dropout`'s cheaper masks.
            scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, h, L, L)
            weights = torch.softmax(scores + bias, dim=-1)
            out = dropout(weights, self.dropout) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.o(layout.pack(out.transpose(1, 2)).reshape(-1, d))


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, ffn_dim), nn.GELU(), Dropout(dropout), nn.Linear(ffn_dim, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def attention_mask(mask: torch.Tensor, use_context: bool) -> torch.Tensor:
    """(B, L, L) True where query i may attend key j: real keys only (or only itself).

    Every row allows its own position, so a padding row is never all-False (which would
    give NaN); padding rows' outputs are then discarded by the losses and metrics.
    """
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    if not use_context:
        return eye.expand(mask.shape[0], -1, -1)
    return (mask.unsqueeze(1) & mask.unsqueeze(2)) | eye


def attention_bias(mask: torch.Tensor, use_context: bool) -> torch.Tensor:
    """(B, 1, L, L) added to every head's attention scores: 0 where `attention_mask` allows,
    -inf elsewhere. Made once per batch and shared by every attention of the model."""
    allowed = attention_mask(mask, use_context).unsqueeze(1)
    return torch.zeros(allowed.shape, device=mask.device).masked_fill_(~allowed, float("-inf"))


# ---------------------------------------------------------------- Eq. 9-14: CMA-Transformer
class Stream(nn.Module):
    """One attention stream of a CMA layer: attention, then Eq. 9-10's tail,
    H- = Norm(H~ + H_c); H = Norm(FFN(H-) + H-)."""

    def __init__(self, d: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = MultiHeadAttention(d, n_heads, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = FeedForward(d, ffn_dim, dropout)
        self.drop = Dropout(dropout)

    def add_norm_ffn(self, attended: torch.Tensor, central: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.drop(attended) + central)
        return self.norm2(self.drop(self.ffn(h)) + h)


class AuxiliaryStream(Stream):
    """Eq. 9/10: H~_{a->c} = CA(H_c, H_a, H_a), then the shared tail."""

    def forward(self, central: torch.Tensor, auxiliary: torch.Tensor, layout: Layout, bias: torch.Tensor):
        attended = self.attn(central, auxiliary, layout, bias)  # H~_{a->c}, injected into Eq. 11
        return attended, self.add_norm_ffn(attended, central)


class CentralStream(Stream):
    """Eq. 11: H~_{c->c} = SA(H_c) + sum_a H~_{a->c}, then the shared tail."""

    def forward(self, central: torch.Tensor, injected: list[torch.Tensor], layout: Layout, bias: torch.Tensor):
        attended = self.attn(central, central, layout, bias)
        for h in injected:
            attended = attended + h
        return self.add_norm_ffn(attended, central)


class Gate(nn.Module):
    """Eq. 12: H'_c = Gate(H_{c->c}, H_{a1->c}, H_{a2->c}).

    softmax: alpha_s = softmax over streams s of (W h_s + b), per dimension; H' = sum_s alpha_s * h_s.
    sigmoid: g_s = sigmoid(W_s h_s) * h_s per stream, then Linear(k*d -> d) (SDT).
    """

    def __init__(self, d: int, n_streams: int, kind: str = "softmax"):
        super().__init__()
        self.kind = kind
        if kind == "softmax":
            self.score = nn.Linear(d, d)
        else:
            self.gates = nn.ModuleList(nn.Linear(d, d) for _ in range(n_streams))
            self.mix = nn.Linear(n_streams * d, d)

    def weights(self, streams: list[torch.Tensor]) -> torch.Tensor:
        """softmax gate only: (S, B, L, d) weights that sum to 1 over the S streams."""
        return torch.softmax(torch.stack([self.score(h) for h in streams]), dim=0)

    def forward(self, streams: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "softmax":
            return (self.weights(streams) * torch.stack(streams)).sum(0)
        gated = [torch.sigmoid(gate(h)) * h for gate, h in zip(self.gates, streams)]
        return self.mix(torch.cat(gated, dim=-1))


class CMALayer(nn.Module):
    """One CMA-Transformer layer centred on one modality (Eq. 9-12)."""

    def __init__(self, d: int, n_aux: int, n_heads: int, ffn_dim: int, dropout: float, gate: str):
        super().__init__()
        self.aux = nn.ModuleList(AuxiliaryStream(d, n_heads, ffn_dim, dropout) for _ in range(n_aux))
        self.central = CentralStream(d, n_heads, ffn_dim, dropout)
        self.gate = Gate(d, n_aux + 1, gate) if n_aux else None

    def forward(self, central: torch.Tensor, auxiliaries: list[torch.Tensor], layout: Layout,
                bias: torch.Tensor):
        attended, aux_out = [], []
        for stream, h_aux in zip(self.aux, auxiliaries):
            a, out = stream(central, h_aux, layout, bias)
            attended.append(a)
            aux_out.append(out)
        h_cc = self.central(central, attended, layout, bias)
        return self.gate([h_cc] + aux_out) if self.gate is not None else h_cc


class CMATransformer(nn.Module):
    """Eq. 13/14: H'_c = CMA-Transformer_theta_c(H_c, H_aux1, H_aux2). Without cross-modal
    attention (a single modality, or the w/o CMA-T ablation with `wo_cmat: self_attention`) it is
    a plain self-attention layer; with `wo_cmat: discard` the ablation has no layers (H'_c = H_c),
    the paper's reading ("the CMA Transformer is discarded")."""

    def __init__(self, d: int, n_aux: int, cfg: CMATHConfig):
        super().__init__()
        ffn_dim = cfg.ffn_dim or d
        n_layers = 0 if cfg.ablation == "wo_cmat" and cfg.wo_cmat == "discard" else cfg.n_layers
        self.layers = nn.ModuleList(CMALayer(d, n_aux, cfg.heads, ffn_dim, cfg.dropout, cfg.gate)
                                    for _ in range(n_layers))

    def forward(self, central: torch.Tensor, auxiliaries: list[torch.Tensor], layout: Layout,
                bias: torch.Tensor):
        for layer in self.layers:
            central = layer(central, auxiliaries, layout, bias)
        return central


# ---------------------------------------------------------------- Eq. 15-17: variational fusion
def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The elementwise mean; a single modality's tensor is its own mean (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(0)


def total(terms: list[torch.Tensor]) -> torch.Tensor:
    """The sum of a non-empty list of tensors, without a zero to start from."""
    result = terms[0]
    for term in terms[1:]:
        result = result + term
    return result


def mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))


class VariationalFusion(nn.Module):
    """mu_m, sigma_m = MLP(H'_m); mu_x, sigma_x = their means over modalities;
    H'_x = mu_x + eps * sigma_x while training (reparameterisation), mu_x at eval."""

    def __init__(self, d: int, modalities: tuple[str, ...], sigma: str = "softplus", sigma_init: float = 0.0):
        super().__init__()
        self.mu = nn.ModuleDict({m: mlp(d) for m in modalities})
        self.log_sigma = nn.ModuleDict({m: mlp(d) for m in modalities})
        self.sigma_kind = sigma
        if sigma_init > 0:
            # PyTorch's own init starts sigma near positive(0) (softplus: 0.69), which can swamp a
            # small mu, so the sample that feeds the fused head and both teachers starts as noise.
            # Setting the output bias starts sigma near sigma_init; the MLP still learns it.
            for net in self.log_sigma.values():
                nn.init.constant_(net[-1].bias, self.inverse_positive(sigma_init))

    def inverse_positive(self, sigma: float) -> float:
        value = max(sigma - 1e-4, 1e-6)
        return math.log(math.expm1(value)) if self.sigma_kind == "softplus" else math.log(value)

    def positive(self, x: torch.Tensor) -> torch.Tensor:
        return (F.softplus(x) if self.sigma_kind == "softplus" else torch.exp(x)) + 1e-4

    def forward(self, h: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu = mean([self.mu[m](x) for m, x in h.items()])  # (N, d)
        sigma = mean([self.positive(self.log_sigma[m](x)) for m, x in h.items()])
        if not self.training:
            return mu, mu, sigma
        return mu + torch.randn_like(sigma) * sigma, mu, sigma


# ---------------------------------------------------------------- Eq. 18-23: hierarchical distillation
def low_level_distillation(h_x: torch.Tensor, h_m: dict[str, torch.Tensor], detach_teacher: bool = False,
                           dialogues: torch.Tensor | int = 1, reduction: str = "sum") -> torch.Tensor:
    """L_mse = sum_m ||H'_x - H'_m||^2 over the (N, d) real utterances of a batch of `dialogues`
    (teacher: the fused H'_x; `reduction` as in `squared_error`)."""
    teacher = h_x.detach() if detach_teacher else h_x
    return total([squared_error(x, teacher, dialogues, reduction) for x in h_m.values()])


def high_level_distillation(logits_x: torch.Tensor, logits_m: dict[str, torch.Tensor], temperature: float = 1.0,
                            detach_teacher: bool = False) -> torch.Tensor:
    """L_kl = sum_m KL(y_x || y_m), averaged over the N real utterances (teacher: the fused head)."""
    teacher = (logits_x.detach() if detach_teacher else logits_x) / temperature
    log_p_teacher = F.log_softmax(teacher, dim=-1)
    return total([F.kl_div(F.log_softmax(logits / temperature, dim=-1), log_p_teacher, log_target=True,
                           reduction="batchmean") for logits in logits_m.values()])


# ---------------------------------------------------------------- Eq. 19: classifiers
def modality_head(d: int, num_classes: int, cfg: CMATHConfig) -> nn.Module:
    """y_m = softmax(W_m H'_m + b_m) (the softmax is inside the losses). `modality_head: linear` is
    the paper's fully connected layer; `sdt` is SDT's ReLU -> Dropout -> Linear."""
    if cfg.modality_head == "linear":
        return nn.Linear(d, num_classes)
    return nn.Sequential(nn.ReLU(), Dropout(cfg.dropout), nn.Linear(d, num_classes))


# ---------------------------------------------------------------- the whole model
@dataclass
class Output:
    """Per real utterance, packed: row n is the n-th True of the batch's mask (`x[mask]`'s order)."""

    logits_x: torch.Tensor  # (N, C) fused head: the model's prediction
    logits_m: dict[str, torch.Tensor]  # (N, C) per-modality heads
    h_x: torch.Tensor  # (N, d) fused representation H'_x
    h_m: dict[str, torch.Tensor]  # (N, d) CMA-Transformer outputs H'_m
    loss_re: torch.Tensor  # Eq. 4
    mu_x: torch.Tensor  # (N, d) Eq. 16's mean, logged beside sigma: their ratio is the sample's noise
    sigma_x: torch.Tensor  # (N, d)


class CMATH(nn.Module):
    def __init__(self, cfg: CMATHConfig, modality_dims: dict[str, int], num_classes: int, max_speakers: int):
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modality_names
        d = cfg.d
        use_context = cfg.context == "dialogue"
        n_aux = len(self.modalities) - 1 if cfg.use_cross_modal else 0
        self.reconstruction = nn.ModuleDict({
            m: ModalityReconstruction(modality_dims[m], d, cfg.kernel_size, cfg.use_reconstruction,
                                      cfg.norm_reduction)
            for m in self.modalities})
        self.embedding = SpeakerPositionEmbedding(d, max_speakers, use_context)
        self.cma = nn.ModuleDict({m: CMATransformer(d, n_aux, cfg) for m in self.modalities})
        self.fusion = VariationalFusion(d, self.modalities, cfg.sigma, cfg.sigma_init)
        self.heads = nn.ModuleDict({m: modality_head(d, num_classes, cfg) for m in self.modalities})
        self.head_x = nn.Linear(d, num_classes)
        self.use_context = use_context

    def set_input_stats(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per-modality (mean, std) of the training features; saved with the weights."""
        for m, (mean, std) in stats.items():
            self.reconstruction[m].set_input_stats(mean, std)

    def forward(self, features: dict[str, torch.Tensor], speaker: torch.Tensor, mask: torch.Tensor,
                positions: torch.Tensor | None = None) -> Output:
        """features: modality -> (N, D_m) packed real utterances, or (B, L, D_m) padded (packed
        here); speaker and mask: (B, L); positions: `Layout.positions`, computed from mask if None."""
        layout = Layout.of(mask, positions)
        features = {m: layout.pack(features[m]) if features[m].dim() == 3 else features[m] for m in self.modalities}
        if self.cfg.input_dropout and self.training:
            # Before standardisation, so a dropped dimension reads as the raw value 0.
            features = {m: dropout(features[m], self.cfg.input_dropout) for m in self.modalities}
        extra = self.embedding(speaker, layout)  # (N, d)
        h, losses_re = {}, []
        for m in self.modalities:
            u, loss = self.reconstruction[m](features[m], layout)
            h[m] = u + extra  # Eq. 8
            losses_re.append(loss)
        loss_re = total(losses_re)
        bias = attention_bias(mask, self.use_context)
        h_prime = {}
        for m in self.modalities:
            aux = [h[a] for a in self.modalities if a != m] if self.cfg.use_cross_modal else []
            h_prime[m] = self.cma[m](h[m], aux, layout, bias)
        h_x, mu_x, sigma_x = self.fusion(h_prime)
        return Output(logits_x=self.head_x(h_x), logits_m={m: self.heads[m](x) for m, x in h_prime.items()},
                      h_x=h_x, h_m=h_prime, loss_re=loss_re, mu_x=mu_x, sigma_x=sigma_x)


def cmath_loss(out: Output, label: torch.Tensor, mask: torch.Tensor, cfg: CMATHConfig,
               class_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 24: L = L_ce + L_re + gamma1 * L_mse + gamma2 * L_kl; CE and KL are means over the real
    utterances, L_re and L_mse as `cfg.norm_reduction` says (`squared_error`).
    `label` is (N,) packed, or (B, L) padded and packed here with `mask`."""
    y = label if label.dim() == 1 else label[mask]
    loss_ce = F.cross_entropy(out.logits_x, y, weight=class_weight)  # Eq. 21
    for logits in out.logits_m.values():  # Eq. 20, 22
        loss_ce = loss_ce + F.cross_entropy(logits, y, weight=class_weight)
    zero = loss_ce.new_zeros(())
    loss_mse = (low_level_distillation(out.h_x, out.h_m, cfg.detach_teacher, real_dialogues(mask),
                                       cfg.norm_reduction)
                if cfg.use_low_level_distillation else zero)
    loss_kl = (high_level_distillation(out.logits_x, out.logits_m, cfg.kl_temperature, cfg.detach_teacher)
               if cfg.use_high_level_distillation else zero)
    total = loss_ce + out.loss_re + cfg.gamma1 * loss_mse + cfg.gamma2 * loss_kl
    return {"loss": total, "loss_ce": loss_ce, "loss_re": out.loss_re, "loss_mse": loss_mse, "loss_kl": loss_kl}
