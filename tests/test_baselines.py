"""The logistic-regression baseline and `cmath-train --compare logreg`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmath_model.baselines import logistic_regression
from cmath_model.cli import train_main
from cmath_model.data import Utterances, load_dataset, write_dataset

CLASSES = ["negative", "neutral", "positive"]


def _transcripts(path, informative: bool, scale: float = 1.0):
    """30 dialogues of 6 utterances; text features carry the label (one-hot plus noise) or not."""
    rng = np.random.default_rng(0)
    n = 30 * 6
    label = rng.integers(0, len(CLASSES), n)
    text = rng.normal(size=(n, 8))
    if informative:
        text[np.arange(n), label] += 3.0
    utts = Utterances(
        dialogue_id=np.repeat([f"d{k}" for k in range(30)], 6), position=np.tile(np.arange(6), 30),
        speaker=rng.integers(0, 2, n), label=label,
        split=np.repeat(np.array(["train"] * 20 + ["valid"] * 5 + ["test"] * 5), 6),
        features={"text": (scale * text).astype(np.float32)})
    return write_dataset(path, utts, dataset="custom", classes=CLASSES, source="test", source_sha256="0" * 64,
                         split_seed=None)


def test_the_baseline_learns_what_the_features_hold_and_no_more(tmp_path):
    learnable = logistic_regression(load_dataset(_transcripts(tmp_path / "a.parquet", True)), ("text",))
    noise = logistic_regression(load_dataset(_transcripts(tmp_path / "b.parquet", False)), ("text",))
    assert learnable["test_wf1_at_best_val"] > 0.85
    assert noise["test_wf1_at_best_val"] < 0.6  # 3 classes: chance is about a third
    assert learnable["C"] in (0.01, 0.1, 1.0, 10.0, 100.0)


def test_the_baseline_is_scale_free_where_validation_says_standardise(tmp_path):
    # Features 1e4 times too small: raw, every C in the grid underfits; standardised, it learns.
    tiny_scale = logistic_regression(load_dataset(_transcripts(tmp_path / "s.parquet", True, scale=1e-4)),
                                     ("text",))
    assert tiny_scale["standardised"] and tiny_scale["test_wf1_at_best_val"] > 0.85


def test_compare_logreg_tests_the_seeds_against_the_baseline(tmp_path, capsys):
    data = _transcripts(tmp_path / "t.parquet", True)
    out = tmp_path / "run"
    args = ["--data", str(data), "--seeds", "3", "--epochs", "2", "--set", "d=16", "num_threads=1",
            "--compare", "logreg", "--out", str(out), "--quiet"]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert "logistic regression (C=" in printed and "this config vs logistic regression, Welch t =" in printed
    summary = json.loads((out / "metrics.json").read_text())
    welch = summary["compare_logreg"]["welch"]["test_wf1_at_best_val"]
    ours = [r["test_wf1_at_best_val"] for r in summary["per_seed"]]
    baseline = summary["compare_logreg"]["logreg_summary"]["test_wf1_at_best_val"]
    assert welch["ours"] == ours and welch["logreg"] == [baseline] * 3
    # the baseline does not vary by seed, so Welch's t is the one-sample t of our seeds against it
    assert welch["t"] == pytest.approx((np.mean(ours) - baseline) / (np.std(ours, ddof=1) / np.sqrt(3)))
    assert 0 < welch["p"] <= 1
