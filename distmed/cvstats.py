"""Statistics over cross-validation fold scores: the standard error of a CV mean, its interval.

Pure functions of fold scores (ROC-AUC per fold), shared by everything that shows a trial's
uncertainty: the epoch metrics, `trials.csv` and the results table, `summary.json`, the
report, and `distmed.train`'s `cv_result.json`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two-sided 95% normal quantile: the intervals are mean ± Z95 * SE.
Z95 = 1.96


def corrected_standard_error(scores: Sequence[float], folds_per_repeat: int) -> float:
    """The corrected resampled standard error of the mean of (repeated) k-fold CV scores.

    SE = sqrt((1/J + n_val/n_train) * s^2), where J = len(scores) is the number of fold
    scores (R repeats x k folds, R >= 1), s^2 their sample variance (ddof=1), and
    n_val/n_train = 1/(k-1) for k-fold CV. The naive s/sqrt(J) treats the folds as
    independent; they are not (any two training sets share most of their images, and a
    repeat reuses every image), so it is too small and makes close trials look separable.
    The n_val/n_train term is the correction for that correlation.

    Source: C. Nadeau and Y. Bengio, "Inference for the Generalization Error", Machine
    Learning 52(3):239-281, 2003 (the corrected resampled t-test variance); its use for
    repeated k-fold: R. Bouckaert and E. Frank, "Evaluating the Replicability of
    Significance Tests for Comparing Learning Algorithms", PAKDD 2004.

    Args:
        scores: the J fold scores (any unit; the SE has the same unit).
        folds_per_repeat: k, the folds of one repeat.

    Returns:
        The SE; NaN when a score is NaN or infinite (a diverged fold has no score, so the
        trial has no mean and no SE).

    Raises:
        ValueError: fewer than 2 scores, or k < 2.
    """
    if folds_per_repeat < 2:
        raise ValueError(f"k-fold CV needs k >= 2 folds, got {folds_per_repeat}")
    values = np.asarray(scores, dtype=np.float64)
    if values.size < 2:
        raise ValueError(f"a standard error needs at least 2 fold scores, got {values.size}")
    if not np.isfinite(values).all():
        return math.nan
    variance = float(np.var(values, ddof=1))
    return math.sqrt((1.0 / values.size + 1.0 / (folds_per_repeat - 1)) * variance)


def score_text(mean: float, se: float, std: float, detail: str) -> str:
    """A CV score as the final lines print it: `mean ± SE`, the SE named as corrected, beside
    the folds' (population) std and `detail`, e.g. "; trial ab12" or ", 5 folds"."""
    return f"{mean:.4f} ± {se:.4f} SE (Nadeau-Bengio corrected; fold std {std:.4f}{detail})"


def interval(mean: float, se: float) -> tuple[float, float]:
    """The approximate 95% interval mean ± 1.96 SE (normal quantile, not Student's t)."""
    return mean - Z95 * se, mean + Z95 * se


def separable(best: tuple[float, float], other: tuple[float, float]) -> bool | None:
    """Whether two (mean, SE) scores have non-overlapping 95% intervals (`interval`).

    Overlapping intervals mean the data cannot tell the two apart; disjoint ones are a
    conservative sign that they differ. None when any number is NaN or infinite.
    """
    if not all(math.isfinite(x) for x in (*best, *other)):
        return None
    low_a, high_a = interval(*best)
    low_b, high_b = interval(*other)
    return high_a < low_b or high_b < low_a
