"""Synthetic IEMOCAP- and MELD-shaped datasets with a signal a context-aware, multimodal model can find.

The labels follow a per-speaker mood chain: a speaker mostly keeps their emotion, sometimes
catches the previous speaker's, sometimes draws a fresh one from the class prior. Each
modality carries a noisy class prototype: text the strongest, visual the weakest. So one
utterance alone is ambiguous; pooling the same speaker's neighbouring utterances (context
plus speaker identity) and all three modalities is what recovers the label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Utterances, split_dialogues, write_dataset


@dataclass(frozen=True)
class Shape:
    classes: tuple[str, ...]
    class_prior: tuple[float, ...]
    dims: dict[str, int]
    max_speakers: int


SHAPES = {
    "iemocap": Shape(
        classes=("happy", "sad", "neutral", "angry", "excited", "frustrated"),
        class_prior=(0.0867, 0.1444, 0.2279, 0.1606, 0.1277, 0.2527),
        dims={"text": 1024, "audio": 1582, "visual": 342},
        max_speakers=2,
    ),
    "meld": Shape(
        classes=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
        class_prior=(0.471, 0.120, 0.027, 0.068, 0.170, 0.026, 0.118),
        dims={"text": 1024, "audio": 300, "visual": 342},
        max_speakers=9,
    ),
}

# (train+valid dialogues, test dialogues, mean utterances per dialogue)
SCALES = {
    "iemocap": {"tiny": (24, 8, 16), "small": (48, 20, 30), "full": (120, 31, 48)},
    "meld": {"tiny": (40, 12, 6), "small": (240, 60, 9), "full": (1153, 280, 9)},
}

# Prototype length per modality, in units of the per-dimension noise, and the share of
# utterances whose modality carries it at all (a flat "yeah" carries no emotion in its text).
SIGNAL = {"text": 2.5, "audio": 2.0, "visual": 1.5}
LATENT = 32  # real features have low intrinsic dimension: signal and noise live in a subspace
FEATURE_NOISE = 0.3  # isotropic noise on top, in every feature dimension
PRESENT = {"text": 0.5, "audio": 0.5, "visual": 0.5}
KEEP_MOOD = 0.9  # a speaker repeats their previous emotion
CATCH_MOOD = 0.5  # otherwise: probability of taking the previous utterance's emotion


def generate(dataset: str, scale: str = "small", seed: int = 0,
             valid_fraction: float = 0.2) -> tuple[Utterances, Shape]:
    if dataset not in SHAPES:
        raise ValueError(f"unknown synthetic dataset '{dataset}': use {', '.join(SHAPES)}")
    if scale not in SCALES[dataset]:
        raise ValueError(f"unknown scale '{scale}': use {', '.join(SCALES[dataset])}")
    shape = SHAPES[dataset]
    n_trainval, n_test, mean_len = SCALES[dataset][scale]
    rng = np.random.default_rng([seed, 7919])
    prior = np.asarray(shape.class_prior) / sum(shape.class_prior)

    # Class prototypes in a latent space, mixed into the feature space by a random linear map;
    # the same for every scale of one seed.
    proto_rng = np.random.default_rng([seed, 104729])
    prototypes = {m: _unit_rows(proto_rng.standard_normal((len(prior), LATENT))) * SIGNAL[m] for m in shape.dims}
    mixing = {m: proto_rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT) for m, dim in shape.dims.items()}
    offsets = {m: proto_rng.normal(0.0, 0.5, dim) for m, dim in shape.dims.items()}

    ids, positions, speakers, labels, splits = [], [], [], [], []
    for k in range(n_trainval + n_test):
        length = _dialogue_length(rng, dataset, mean_len)
        spk, lab = _dialogue_labels(rng, length, prior, shape.max_speakers, dataset)
        ids += [f"{dataset}_{k:05d}"] * length
        positions.append(np.arange(length))
        speakers.append(spk)
        labels.append(lab)
        splits += ["train" if k < n_trainval else "test"] * length
    label = np.concatenate(labels)
    dialogue_id = np.asarray(ids)
    split = np.asarray(splits, dtype=object)
    train_ids = [d for d, s in zip(dialogue_id, split) if s == "train"]
    valid = split_dialogues(train_ids, valid_fraction, seed)
    split[np.isin(dialogue_id, list(valid))] = "valid"

    features = {}
    for m, dim in shape.dims.items():
        present = rng.random(len(label)) < PRESENT[m]
        latent = rng.standard_normal((len(label), LATENT)) + prototypes[m][label] * present[:, None]
        noise = rng.standard_normal((len(label), dim), dtype=np.float32) * FEATURE_NOISE
        features[m] = (latent @ mixing[m] + noise + offsets[m]).astype(np.float32)
    utts = Utterances(dialogue_id=dialogue_id, position=np.concatenate(positions),
                      speaker=np.concatenate(speakers), label=label, split=split.astype(str),
                      features=features)
    return utts, shape


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dialogue_length(rng: np.random.Generator, dataset: str, mean_len: int) -> int:
    if dataset == "meld":  # MELD: 1-24 utterances, skewed short
        return int(np.clip(rng.geometric(1.0 / mean_len), 1, 24))
    return int(np.clip(round(rng.normal(mean_len, mean_len / 4)), max(4, mean_len // 3), 2 * mean_len))


def _dialogue_labels(rng: np.random.Generator, length: int, prior: np.ndarray, max_speakers: int,
                     dataset: str) -> tuple[np.ndarray, np.ndarray]:
    n_speakers = 2 if dataset == "iemocap" else int(rng.integers(1, min(max_speakers, length) + 1))
    mood = rng.choice(len(prior), size=n_speakers, p=prior)
    speakers = np.empty(length, dtype=np.int64)
    labels = np.empty(length, dtype=np.int64)
    current = 0
    for i in range(length):
        if i > 0 and rng.random() < 0.7:  # turn taking: usually the other speaker answers
            current = (current + 1 + int(rng.integers(0, max(1, n_speakers - 1)))) % n_speakers
        if i > 0 and rng.random() >= KEEP_MOOD:
            mood[current] = labels[i - 1] if rng.random() < CATCH_MOOD else rng.choice(len(prior), p=prior)
        speakers[i] = current
        labels[i] = mood[current]
    # Speakers are indexed by first appearance within the dialogue, as importers do.
    _, first = np.unique(speakers, return_index=True)
    remap = {s: r for r, s in enumerate(speakers[np.sort(first)])}
    return np.asarray([remap[s] for s in speakers]), labels


def write_synthetic(path: str | Path, dataset: str, scale: str = "small", seed: int = 0,
                    valid_fraction: float = 0.2) -> Path:
    utts, shape = generate(dataset, scale, seed, valid_fraction)
    return write_dataset(path, utts, dataset=dataset, classes=list(shape.classes),
                         source=f"synthetic:{dataset}:{scale}:seed={seed}", source_sha256="",
                         split_seed=seed)


def default_dataset_path(results_dir: str | Path, dataset: str = "iemocap", scale: str = "small",
                         seed: int = 0) -> Path:
    """The embedded default dataset, generated once into the results folder and reused."""
    path = Path(results_dir) / "data" / f"synthetic-{dataset}-{scale}-seed{seed}.parquet"
    if not path.exists():
        write_synthetic(path, dataset, scale, seed)
    return path
