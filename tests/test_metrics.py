"""The numpy metrics give scikit-learn's numbers, absent classes and empty inputs included."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from cmath_model.metrics import classification_metrics


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    y_true = rng.integers(0, num_classes - 1, 200)  # the last class never occurs
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, num_classes, 200))
    y_pred[y_pred == 2] = 3  # class 2 is never predicted
    labels = list(range(num_classes))
    ours = classification_metrics(y_true, y_pred, num_classes)
    assert ours["acc"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert ours["wf1"] == pytest.approx(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0))
    assert ours["per_class_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0).tolist())
    assert ours["confusion"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()


def test_metrics_of_nothing_are_zero():
    ours = classification_metrics(np.array([], dtype=int), np.array([], dtype=int), 3)
    assert ours["acc"] == 0.0 and ours["wf1"] == 0.0 and ours["confusion"] == [[0] * 3] * 3
