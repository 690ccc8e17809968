"""Classification metrics as pure functions of (labels, class probabilities).

Binary tasks score the positive class; multi-class tasks use macro one-vs-rest ROC-AUC and
macro averages (which applies is `distmed.task.Task`'s choice). AUC is computed once over a
whole set of predictions, never averaged over batches. Calibration (`brier`, `ece`) is
lower-is-better; every other metric is higher-is-better.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import expit, logit
from scipy.stats import rankdata
from sklearn import metrics as skm

METRIC_NAMES = (
    "roc_auc",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "brier",
    "ece",
)
LOWER_IS_BETTER = frozenset({"brier", "ece"})
ECE_BINS = 15  # Guo et al. 2017 use 15 equal-width confidence bins


def binary_metrics(truth: np.ndarray, score: np.ndarray, decision: np.ndarray) -> dict[str, float]:
    """Every metric in `METRIC_NAMES` of a binary task.

    Args:
        truth: (N,) booleans, is the sample positive.
        score: (N,) the positive class's probability (ranks samples; calibration).
        decision: (N,) booleans, was the sample called positive.
    """
    tn, fp, fn, tp = skm.confusion_matrix(truth, decision, labels=[False, True]).ravel()
    return {
        "roc_auc": _auc(truth, score),
        "accuracy": float(skm.accuracy_score(truth, decision)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(truth, decision)),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        # Calibration looks at the score alone, not at the decision (nor its threshold).
        "brier": binary_brier(truth, score),
        "ece": expected_calibration_error(score, truth),
    }


def multiclass_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Every metric in `METRIC_NAMES` of a K-class task deciding by argmax.

    Args:
        labels: (N,) true class index per sample.
        probs: (N, K) class probabilities; rows sum to 1.

    ROC-AUC is macro one-vs-rest (MedMNIST's `getAUC`); sensitivity, specificity, precision
    and F1 are macro averages over classes.
    """
    predicted = probs.argmax(axis=1)
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
        "brier": multiclass_brier(labels, probs),
        "ece": expected_calibration_error(probs.max(axis=1), predicted == labels),
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


# --------------------------------------------------------------------------- calibration


def binary_brier(truth: np.ndarray, score: np.ndarray) -> float:
    """Brier score of a binary task: mean (score - truth)^2, in [0, 1], lower is better
    (scikit-learn's `brier_score_loss`; Brier 1950, Monthly Weather Review 78(1))."""
    return float(skm.brier_score_loss(truth, score))


def multiclass_brier(labels: np.ndarray, probs: np.ndarray) -> float:
    """Brier score of `probs` (N, K) against `labels` (N,): mean over samples of the sum over
    classes of (p_k - onehot_k)^2, in [0, 2] (Brier 1950, "Verification of forecasts expressed
    in terms of probability", Monthly Weather Review 78(1)); a binary task scored that way
    gives twice the binary value."""
    # float32 softmax rows miss 1 by ~1e-7, past scikit-learn's sqrt(eps) check, which would
    # warn on every validation epoch; renormalising in float64 changes nothing else.
    rows = probs / probs.sum(axis=1, keepdims=True)
    classes = np.arange(probs.shape[1])  # a class missing from `labels` still has a column
    return float(skm.brier_score_loss(labels, rows, labels=classes, scale_by_half=False))


def calibration_bins(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """The equal-width bin (0..bins-1) of each confidence in [0, 1]; 1.0 joins the last."""
    return np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1])


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Expected calibration error, in [0, 1], of (N,) confidences against (N,) outcomes.

    ECE = sum over 15 equal-width bins b of |B_b| / N * |accuracy(B_b) - confidence(B_b)|
    (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural Networks").
    Binary tasks bin the positive-class probability against "label is positive"; multi-class
    tasks bin the top-label confidence against "argmax is right". The same definitions as
    torchmetrics' `binary_calibration_error` / `multiclass_calibration_error` with
    n_bins=15, norm="l1": bins are [lower, upper), the last one also holding 1.0.
    """
    # |B|/N * |mean(correct) - mean(confidence)| over B is |sum(confidence - correct)| / N.
    gaps = np.bincount(
        calibration_bins(confidence), weights=confidence - correct, minlength=ECE_BINS
    )
    return float(np.abs(gaps).sum() / len(confidence))


# --------------------------------------------------------------------------- operating point


def youden_threshold(truth: np.ndarray, score: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (Youden's J), placed
    in the middle of the gap that achieves it (`gap_centre`).

    Args:
        truth: (N,) bool, positive or not; score: (N,) positive-class probability in [0, 1].
    """
    fpr, tpr, thresholds = skm.roc_curve(truth, score)
    finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (nothing positive)
    best = np.argmax((tpr - fpr)[finite])
    return gap_centre(score, float(thresholds[finite][best]))


def sensitivity_threshold(truth: np.ndarray, score: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches `target` (best specificity there),
    placed in the middle of the gap that achieves it (`gap_centre`)."""
    _, tpr, thresholds = skm.roc_curve(truth, score)
    reaching = np.flatnonzero((tpr >= target) & np.isfinite(thresholds))
    if not len(reaching):
        return float(np.min(score))
    return gap_centre(score, float(thresholds[reaching[0]]))


THRESHOLD_EPSILON = 1e-12  # keeps logit(0) and logit(1) finite


def gap_centre(score: np.ndarray, threshold: float) -> float:
    """The midpoint, in logit space, between `threshold` (a score value; "positive" when
    score >= threshold) and the highest score below it; `threshold` when none is below.

    Every threshold in that gap decides the same on `score`, so the choice among them is
    free on these data. The ROC curve's own threshold is the gap's upper edge: the lowest
    positive score. On held-out predictions that separate the classes (a perfect fold
    ROC-AUC on a small data set) that edge can lie at 0.9999, where a model refitted on all
    data, scored on new images, rarely reaches: it then calls everything negative. The
    middle of the gap is the largest margin on both sides (the maximum-margin cut); taken
    in logit space, because that is the scale of the network's output, where a gap between
    0.99 and 0.9999 is as wide as one between 0.5 and 0.99, and where a temperature is a
    plain scaling, so the centre is the same whatever temperature is applied after.
    """
    score = np.asarray(score, dtype=np.float64)
    below = score[score < threshold]
    if not len(below):
        return threshold
    low, high = np.clip([below.max(), threshold], THRESHOLD_EPSILON, 1 - THRESHOLD_EPSILON)
    return float(expit((logit(low) + logit(high)) / 2))


# --------------------------------------------------------------------------- uncertainty

CI_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "f1")


def binary_bootstrap_ci(
    truth: np.ndarray,
    score: np.ndarray,
    argmax_positive: np.ndarray,
    threshold: float | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of `CI_METRICS` of a binary task.

    Resamples cases; decides at `threshold` when given, else by `argmax_positive` (N,).
    Resamples holding a single class have no ROC-AUC and are left out of its interval only.
    """
    picks = resample_indices(len(truth), resamples, seed)
    draws = _binary_draws(
        np.asarray(truth), np.asarray(score, dtype=np.float64), argmax_positive, threshold, picks
    )
    return _percentiles(draws, level)


def percentile_ci(
    metrics_of: Callable[[np.ndarray], dict[str, float]],
    n: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of `CI_METRICS`: `metrics_of(case indices)` per resample
    of `n` cases (NaN draws, such as an undefined AUC, are left out of that metric only)."""
    picks = resample_indices(n, resamples, seed)
    draws = np.array([[metrics_of(p)[m] for m in CI_METRICS] for p in picks])
    return _percentiles(draws, level)


def _percentiles(draws: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    tail = (1 - level) / 2 * 100
    low = np.nanpercentile(draws, tail, axis=0)
    high = np.nanpercentile(draws, 100 - tail, axis=0)
    return {name: (float(a), float(b)) for name, a, b in zip(CI_METRICS, low, high, strict=True)}


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) case indices drawn with replacement, reproducible from `seed`."""
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def _binary_draws(
    truth: np.ndarray,
    score: np.ndarray,
    argmax_positive: np.ndarray,
    threshold: float | None,
    picks: np.ndarray,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """`CI_METRICS` of every resample at once (numpy; a loop over sklearn calls is ~100x
    slower); the same definitions as `binary_metrics`. `valid` (N,) booleans: only those
    samples count (a multi-label finding's unmasked ones); None: all."""
    v = np.ones(picks.shape, dtype=bool) if valid is None else valid[picks]
    t, s = truth[picks] & v, score[picks]
    said = s >= threshold if threshold is not None else argmax_positive[picks]
    tp, fp = (t & said).sum(1), (~t & said & v).sum(1)
    fn, tn = (t & ~said).sum(1), (~t & ~said & v).sum(1)
    n_pos, n_neg = t.sum(1), (~t & v).sum(1)
    # Mann-Whitney U with average ranks for ties equals the ROC-AUC sklearn computes; left-out
    # samples rank above every counted one (+inf), so the counted ranks stay 1..n.
    ranks = rankdata(np.where(v, s, np.inf), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = ((ranks * t).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        columns = {
            "roc_auc": np.where((n_pos > 0) & (n_neg > 0), auc, np.nan),
            "accuracy": _safe_ratio(tp + tn, v.sum(1)),
            "sensitivity": _safe_ratio(tp, tp + fn),
            "specificity": _safe_ratio(tn, tn + fp),
            "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn),
        }
    return np.stack([columns[name] for name in CI_METRICS], axis=1)


def multilabel_bootstrap_ci(
    truth: np.ndarray,
    valid: np.ndarray,
    score: np.ndarray,
    thresholds: np.ndarray,
    scored: np.ndarray,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[dict[str, tuple[float, float]], list[dict[str, tuple[float, float]]]]:
    """Percentile bootstrap intervals of `CI_METRICS` of a multi-label task, resampling cases
    (an image with all its findings).

    Args:
        truth: (N, L) booleans, finding present; valid: (N, L) booleans, label known (not
            ignored); score: (N, L) probabilities; thresholds: (L,) decision thresholds;
        scored: column numbers whose mean is the task's score.

    Returns:
        The intervals of the mean over the `scored` findings (a resample where one of them
        is undefined is left out of that metric's interval), and each finding's own (L).
    """
    picks = resample_indices(len(truth), resamples, seed)
    draws = np.stack(
        [
            _binary_draws(truth[:, j], score[:, j], truth[:, j], thresholds[j], picks, valid[:, j])
            for j in range(truth.shape[1])
        ],
        axis=1,
    )  # (resamples, L, metrics)
    macro = _percentiles(draws[:, scored].mean(axis=1), level)
    return macro, [_percentiles(draws[:, j], level) for j in range(truth.shape[1])]


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)
