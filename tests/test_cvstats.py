"""distmed.cvstats: the corrected resampled standard error and interval separability."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distmed.cvstats import Z95, corrected_standard_error, interval, separable


@pytest.mark.parametrize(
    ("scores", "k", "expected"),
    [
        # R=1, k=5: mean 0.8, s^2 = (0.01 + 0.0025 + 0 + 0.0025 + 0.01) / 4 = 0.00625,
        # (1/5 + 1/4) * 0.00625 = 0.0028125
        ([0.7, 0.75, 0.8, 0.85, 0.9], 5, math.sqrt(0.0028125)),
        # R=2, k=2: mean 0.75, s^2 = (2 * 0.05^2 + 2 * 0.15^2) / 3 = 0.05 / 3,
        # (1/4 + 1/1) * 0.05 / 3 = 0.0208333...
        ([0.8, 0.7, 0.9, 0.6], 2, math.sqrt(1.25 * 0.05 / 3)),
        # R=3, k=3: mean 0.8, deviations 0 and ±0.05 in each repeat, so
        # s^2 = 3 * 2 * 0.0025 / 8 = 0.001875; (1/9 + 1/2) * 0.001875
        ([0.8, 0.75, 0.85] * 3, 3, math.sqrt((1 / 9 + 1 / 2) * 0.001875)),
        ([0.9, 0.9, 0.9], 3, 0.0),  # identical folds: no spread
    ],
    ids=["k5", "2x2", "3x3", "constant"],
)
def test_corrected_standard_error_by_hand(scores, k, expected):
    assert corrected_standard_error(scores, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_corrected_standard_error_is_larger_than_the_naive_one():
    scores = np.random.default_rng(0).uniform(0.7, 0.9, 10)  # 2 x 5 folds
    naive = np.std(scores, ddof=1) / math.sqrt(scores.size)
    corrected = corrected_standard_error(scores, 5)
    # (1/J + 1/(k-1)) / (1/J) = 1 + J/(k-1) = 3.5: the variance ratio to the naive one
    assert corrected == pytest.approx(naive * math.sqrt(3.5))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_fold_without_a_score_leaves_no_standard_error(bad):
    assert math.isnan(corrected_standard_error([0.8, bad, 0.7], 3))


def test_corrected_standard_error_refuses_what_has_no_variance():
    with pytest.raises(ValueError, match="at least 2"):
        corrected_standard_error([0.8], 2)
    with pytest.raises(ValueError, match="k >= 2"):
        corrected_standard_error([0.8, 0.7], 1)


def test_interval_is_mean_plus_minus_1_96_se():
    low, high = interval(0.8, 0.01)
    assert (low, high) == pytest.approx((0.8 - 0.0196, 0.8 + 0.0196))
    assert Z95 == 1.96


@pytest.mark.parametrize(
    ("best", "other", "expected"),
    [
        ((0.90, 0.01), (0.80, 0.01), True),  # [0.8804, 0.9196] vs [0.7804, 0.8196]
        ((0.90, 0.01), (0.87, 0.01), False),  # 0.87 + 0.0196 = 0.8896 > 0.8804: overlap
        ((0.80, 0.01), (0.90, 0.01), True),  # symmetric
        ((0.90, 0.0), (0.90, 0.0), False),  # touching intervals are not separable
        ((0.90, math.nan), (0.80, 0.01), None),
        ((0.90, 0.01), (math.nan, 0.01), None),
    ],
)
def test_separable(best, other, expected):
    assert separable(best, other) is expected


def test_the_score_text_names_the_corrected_se_beside_the_fold_std():
    from distmed.cvstats import score_text

    text = score_text(0.91234, 0.01666, 0.0096, "; trial ab12")
    assert text == "0.9123 ± 0.0167 SE (Nadeau-Bengio corrected; fold std 0.0096; trial ab12)"
