"""Classification metrics as pure functions of (labels, class probabilities).

Binary tasks score the configured positive class; multi-class tasks use macro one-vs-rest
ROC-AUC and macro averages. AUC is computed once over a whole set of predictions, never
averaged over batches.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

METRIC_NAMES = (
    "roc_auc",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
)


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, positive: int | None = None
) -> dict[str, float]:
    """All metrics in `METRIC_NAMES` for `labels` (N,) and class probabilities `probs` (N, K).

    Args:
        labels: true class index per sample.
        probs: predicted class probabilities; rows sum to 1.
        positive: binary tasks only, the class whose score ranks samples (default 1).
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    if num_classes == 2:
        pos = 1 if positive is None else positive
        return _binary_metrics(labels == pos, probs[:, pos], predicted == pos)
    return _multiclass_metrics(labels, probs, predicted)


def _binary_metrics(truth: np.ndarray, score: np.ndarray, decision: np.ndarray) -> dict[str, float]:
    tn, fp, fn, tp = skm.confusion_matrix(truth, decision, labels=[False, True]).ravel()
    return {
        "roc_auc": _auc(truth, score),
        "accuracy": float(skm.accuracy_score(truth, decision)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(truth, decision)),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _multiclass_metrics(
    labels: np.ndarray, probs: np.ndarray, predicted: np.ndarray
) -> dict[str, float]:
    classes = np.arange(probs.shape[1])
    matrix = skm.confusion_matrix(labels, predicted, labels=classes)
    tp = np.diag(matrix)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    tn = matrix.sum() - tp - fp - fn
    return {
        "roc_auc": _auc(labels, probs),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predicted)),
        "sensitivity": float(np.mean([_ratio(a, a + b) for a, b in zip(tp, fn, strict=True)])),
        "specificity": float(np.mean([_ratio(a, a + b) for a, b in zip(tn, fp, strict=True)])),
        "precision": float(
            skm.precision_score(labels, predicted, average="macro", zero_division=0)
        ),
        "f1": float(skm.f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC, or NaN when the set holds a single class (AUC is undefined there)."""
    present = np.unique(truth)
    if len(present) < 2:
        return float("nan")
    if score.ndim == 2:
        if len(present) < score.shape[1]:
            return float("nan")
        return float(skm.roc_auc_score(truth, score, multi_class="ovr", average="macro"))
    return float(skm.roc_auc_score(truth, score))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0
