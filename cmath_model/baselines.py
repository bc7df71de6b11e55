"""The baseline a user tries before CMATH: a per-utterance logistic regression on the same
features (the modalities concatenated), with no dialogue context and no speaker; its C, and
whether the features are standardised with the training split's statistics, picked on
validation W-F1.

`cmath-train --compare logreg` trains it beside a config to answer "does the model beat what I
would have tried first, on my data?" with the same metrics and a Welch t-test.
"""

from __future__ import annotations

import numpy as np

from .data import Dataset, Split
from .metrics import classification_metrics

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def utterance_table(split: Split, modalities: tuple[str, ...], stats: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of every real utterance: the flat rows without the padding row,
    standardised with `stats` when given."""
    columns = [(split.features[m][:-1] if stats is None else (split.features[m][:-1] - stats[m][0]) / stats[m][1])
               .numpy() for m in modalities]
    return np.concatenate(columns, axis=1), split.label[:-1].numpy()


def logistic_regression(data: Dataset, modalities: tuple[str, ...]) -> dict:
    """Validation-selected test scores in the keys of a training summary (`summarize`)."""
    from sklearn.linear_model import LogisticRegression

    standardised = {m: (mean, std + 1e-6) for m, (mean, std) in data.feature_stats(modalities).items()}
    best = None
    for stats in (None, standardised):
        x_train, y_train = utterance_table(data.splits["train"], modalities, stats)
        x_val, y_val = utterance_table(data.splits["valid"], modalities, stats)
        for c in C_GRID:
            model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
            val = classification_metrics(y_val, model.predict(x_val), data.num_classes)
            if best is None or val["wf1"] > best[0]["wf1"]:
                best = (val, c, stats, model)
    val, c, stats, model = best
    x_test, y_test = utterance_table(data.splits["test"], modalities, stats)
    test = classification_metrics(y_test, model.predict(x_test), data.num_classes)
    return {"best_val_wf1": val["wf1"], "best_val_acc": val["acc"], "test_wf1_at_best_val": test["wf1"],
            "test_acc_at_best_val": test["acc"], "C": c, "standardised": stats is not None}


def logistic_regression_seeds(data: Dataset, modalities: tuple[str, ...], seeds: int) -> dict:
    """The same baseline as a multi-seed summary. lbfgs is deterministic, so every seed scores the
    same: Welch's test against it is a one-sample t-test of the other side's seeds."""
    result = logistic_regression(data, modalities)
    summary = dict(result)
    scaled = "standardised " if result["standardised"] else ""
    summary.update({f"{key}_std": 0.0 for key in ("best_val_wf1", "test_wf1_at_best_val", "test_acc_at_best_val")},
                   best_test_wf1=result["test_wf1_at_best_val"], best_test_wf1_std=0.0,
                   per_seed=[dict(result) for _ in range(seeds)], seeds=seeds, deterministic=True,
                   model=f"logistic regression (C={result['C']:g}) on {scaled}{'+'.join(modalities)} features")
    return summary
