"""Classification metrics in numpy: accuracy, per-class and weighted F1, confusion matrix.

The same definitions as scikit-learn's (weighted F1 weights each class by its support; a
class with no true or predicted utterances scores 0), written out because every trial worker
imports this module and scikit-learn's import costs more than a second there.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are true classes, columns predictions."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_f1(matrix: np.ndarray) -> np.ndarray:
    true_positive = np.diag(matrix).astype(float)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # predicted + true, i.e. 2TP + FP + FN
    return np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)


def weighted_f1(matrix: np.ndarray) -> float:
    support = matrix.sum(axis=1)
    return float((per_class_f1(matrix) * support).sum() / support.sum()) if support.sum() else 0.0


def accuracy(matrix: np.ndarray) -> float:
    return float(np.trace(matrix) / matrix.sum()) if matrix.sum() else 0.0


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    return {"acc": accuracy(matrix), "wf1": weighted_f1(matrix),
            "per_class_f1": per_class_f1(matrix).tolist(), "confusion": matrix.tolist()}
