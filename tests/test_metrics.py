"""distmed.metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from distmed.metrics import METRIC_NAMES, calibration_bins
from distmed.task import BinaryTask, MulticlassTask, Task


def task_of(probs: np.ndarray, positive: int = 1) -> Task:
    """The task whose outputs `probs` (N, K) are: binary scoring `positive` when K is 2."""
    names = tuple(f"class {k}" for k in range(np.asarray(probs).shape[1]))
    return BinaryTask(names, positive) if len(names) == 2 else MulticlassTask(names)


def classification_metrics(labels, probs, positive: int = 1) -> dict[str, float]:
    return task_of(probs, positive).metrics(labels, probs)


def binary_probs(p1) -> np.ndarray:
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=1)


# Each case: labels, P(class 1), and metrics worked out by hand for positive class 1.
# roc_auc = concordant (positive, negative) pairs / all pairs, a tie counting one half;
# the decision is argmax, i.e. P(class 1) > 0.5.
HAND_CASES = {
    # positives 0.9 0.7 0.4 | negatives 0.6 0.3 0.2 0.1
    # pairs 3*4 = 12; concordant 4 + 4 + 3 = 11
    # TP 2 (0.9, 0.7)  FN 1 (0.4)  FP 1 (0.6)  TN 3
    "separable_but_one": (
        [1, 1, 1, 0, 0, 0, 0],
        [0.9, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1],
        dict(
            roc_auc=11 / 12,
            accuracy=5 / 7,
            balanced_accuracy=(2 / 3 + 3 / 4) / 2,
            sensitivity=2 / 3,
            specificity=3 / 4,
            precision=2 / 3,
            f1=2 * 2 / (2 * 2 + 1 + 1),
        ),
    ),
    # positives 0.8 0.6 0.3 | negatives 0.6 0.45 0.2 0.05 (one tie: 0.6 vs 0.6)
    # pairs 12; concordant 4 + (3 + 0.5) + 2 = 9.5
    # TP 2 (0.8, 0.6)  FN 1 (0.3)  FP 1 (0.6)  TN 3
    "with_a_tie": (
        [0, 1, 0, 1, 0, 1, 0],
        [0.6, 0.8, 0.45, 0.6, 0.2, 0.3, 0.05],
        dict(
            roc_auc=9.5 / 12,
            accuracy=5 / 7,
            balanced_accuracy=(2 / 3 + 3 / 4) / 2,
            sensitivity=2 / 3,
            specificity=3 / 4,
            precision=2 / 3,
            f1=4 / 6,
        ),
    ),
    # positives 0.9 0.8 | negatives 0.7 0.95 0.6: concordant 2 + 2 = 4 of 6
    # everything predicted positive: TP 2  FP 3  TN 0  FN 0
    "all_predicted_positive": (
        [1, 1, 0, 0, 0],
        [0.9, 0.8, 0.7, 0.95, 0.6],
        dict(
            roc_auc=4 / 6,
            accuracy=2 / 5,
            balanced_accuracy=0.5,
            sensitivity=1.0,
            specificity=0.0,
            precision=2 / 5,
            f1=4 / 7,
        ),
    ),
    # positives 0.4 0.2 | negatives 0.1 0.3: concordant 2 + 1 = 3 of 4
    # nothing predicted positive: TP 0  FN 2  FP 0  TN 2; precision 0/0 reported as 0
    "none_predicted_positive": (
        [1, 0, 1, 0],
        [0.4, 0.1, 0.2, 0.3],
        dict(
            roc_auc=3 / 4,
            accuracy=2 / 4,
            balanced_accuracy=0.5,
            sensitivity=0.0,
            specificity=1.0,
            precision=0.0,
            f1=0.0,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_binary_metrics_by_hand(case):
    labels, p1, expected = HAND_CASES[case]
    result = classification_metrics(np.array(labels), binary_probs(p1))
    assert set(result) == set(METRIC_NAMES)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name
    assert all(isinstance(v, float) for v in result.values())


def test_positive_zero_swaps_sensitivity_and_specificity():
    labels, p1, expected = HAND_CASES["separable_but_one"]
    default = classification_metrics(np.array(labels), binary_probs(p1))
    explicit_one = classification_metrics(np.array(labels), binary_probs(p1), positive=1)
    flipped = classification_metrics(np.array(labels), binary_probs(p1), positive=0)
    assert explicit_one == default
    assert flipped["sensitivity"] == pytest.approx(default["specificity"])
    assert flipped["specificity"] == pytest.approx(default["sensitivity"])
    assert flipped["roc_auc"] == pytest.approx(default["roc_auc"])
    assert flipped["accuracy"] == pytest.approx(default["accuracy"])
    assert flipped["balanced_accuracy"] == pytest.approx(default["balanced_accuracy"])
    # class 0 as positive: TP 3 (true negatives before), FP 1 (missed 0.4), FN 1 (0.6)
    assert flipped["precision"] == pytest.approx(3 / 4)
    assert flipped["f1"] == pytest.approx(6 / 8)


def test_multiclass_macro_ovr_auc_matches_sklearn():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 2, 1, 0])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.2, 0.5, 0.3],
            [0.1, 0.3, 0.6],
            [0.3, 0.4, 0.3],
            [0.5, 0.3, 0.2],
            [0.2, 0.2, 0.6],
            [0.6, 0.1, 0.3],
            [0.4, 0.1, 0.5],
            [0.1, 0.8, 0.1],
            [0.2, 0.2, 0.6],
        ]
    )
    result = classification_metrics(labels, probs)
    expected_auc = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert result["roc_auc"] == pytest.approx(expected_auc)
    # hand: argmax = 0 1 2 1 0 2 0 2 1 2 -> correct at 0 1 2 5 6 7 8 = 7 of 10
    assert result["accuracy"] == pytest.approx(0.7)
    # per-class recall: class 0 2/4, class 1 2/3, class 2 3/3
    assert result["sensitivity"] == pytest.approx((2 / 4 + 2 / 3 + 1) / 3)
    assert result["balanced_accuracy"] == pytest.approx((2 / 4 + 2 / 3 + 1) / 3)
    # per-class specificity: class 0: FP 1 (sample 4) of 6 negatives -> 5/6;
    # class 1: FP 1 (sample 3) of 7 -> 6/7; class 2: FP 1 (sample 9) of 7 -> 6/7
    assert result["specificity"] == pytest.approx((5 / 6 + 6 / 7 + 6 / 7) / 3)
    # per-class precision: class 0 2/3, class 1 2/3, class 2 3/4
    assert result["precision"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)


def test_positive_is_ignored_for_multiclass():
    rng = np.random.default_rng(5)
    labels = np.arange(30) % 3
    probs = rng.dirichlet(np.ones(3), size=30)
    assert classification_metrics(labels, probs, positive=0) == classification_metrics(
        labels, probs
    )


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_single_class_labels_give_nan_auc():
    result = classification_metrics(np.array([1, 1, 1]), binary_probs([0.9, 0.2, 0.7]))
    assert math.isnan(result["roc_auc"])
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == 0.0  # no negatives: 0/0 reported as 0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_missing_class_gives_nan_auc():
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4]])
    result = classification_metrics(labels, probs)
    assert math.isnan(result["roc_auc"])
    assert result["accuracy"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("positive", [0, 1])
def test_binary_agrees_with_sklearn_on_random_data(seed, positive):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    p1 = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.25, 200), 0.01, 0.99)
    probs = binary_probs(p1)
    result = classification_metrics(labels, probs, positive=positive)
    truth = labels == positive
    decision = probs.argmax(axis=1) == positive
    assert result["roc_auc"] == pytest.approx(skm.roc_auc_score(truth, probs[:, positive]))
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(truth, decision))
    assert result["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(truth, decision)
    )
    assert result["sensitivity"] == pytest.approx(skm.recall_score(truth, decision))
    assert result["specificity"] == pytest.approx(skm.recall_score(~truth, ~decision))
    assert result["precision"] == pytest.approx(skm.precision_score(truth, decision))
    assert result["f1"] == pytest.approx(skm.f1_score(truth, decision))
    assert 0.5 < result["roc_auc"] < 1.0  # informative but imperfect scores


@pytest.mark.parametrize("num_classes", [3, 5])
def test_multiclass_agrees_with_sklearn_on_random_data(num_classes):
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, 300)
    logits = rng.normal(0, 1, (300, num_classes))
    logits[np.arange(300), labels] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    result = classification_metrics(labels, probs)
    predicted = probs.argmax(axis=1)
    assert result["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"))
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert result["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(labels, predicted)
    )
    assert result["sensitivity"] == pytest.approx(
        skm.recall_score(labels, predicted, average="macro")
    )
    assert result["precision"] == pytest.approx(
        skm.precision_score(labels, predicted, average="macro")
    )
    assert result["f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
    specificity = np.mean(
        [skm.recall_score(labels != c, predicted != c) for c in range(num_classes)]
    )
    assert result["specificity"] == pytest.approx(specificity)


# --------------------------------------------------------------------------- calibration

# P(class 1) and labels sharing three of the 15 equal-width bins [k/15, (k+1)/15):
#   bin 14: 0.94 0.96 0.98, labels 1 1 0 -> |2.88 - 2| = 0.88
#   bin 0:  0.02 0.05,      labels 0 1   -> |0.07 - 1| = 0.93
#   bin 8:  0.55 0.58,      labels 1 0   -> |1.13 - 1| = 0.13
# ECE = sum |sum(p - y)| / N; Brier = mean (p - y)^2.
CALIBRATION_LABELS = [1, 1, 0, 0, 1, 1, 0]
CALIBRATION_P1 = [0.94, 0.96, 0.98, 0.02, 0.05, 0.55, 0.58]
CALIBRATION_ECE = (0.88 + 0.93 + 0.13) / 7
CALIBRATION_BRIER = (0.06**2 + 0.04**2 + 0.98**2 + 0.02**2 + 0.95**2 + 0.45**2 + 0.58**2) / 7


@pytest.mark.parametrize("positive", [0, 1])
def test_binary_brier_and_ece_by_hand(positive):
    # Both are symmetric in the two classes: scoring class 0 gives the same values.
    labels, probs = np.array(CALIBRATION_LABELS), binary_probs(CALIBRATION_P1)
    result = classification_metrics(labels, probs, positive=positive)
    assert result["ece"] == pytest.approx(CALIBRATION_ECE, abs=1e-12)
    assert result["brier"] == pytest.approx(CALIBRATION_BRIER, abs=1e-12)
    task = task_of(probs, positive)
    assert task.brier(labels, probs) == result["brier"]
    assert task.calibration_error(labels, probs) == result["ece"]


def test_binary_calibration_ignores_the_threshold():
    labels, probs = np.array(CALIBRATION_LABELS), binary_probs(CALIBRATION_P1)
    at = BinaryTask(("a", "b"), 1).metrics_at(labels, probs, threshold=0.03)
    assert at["brier"] == pytest.approx(CALIBRATION_BRIER)
    assert at["ece"] == pytest.approx(CALIBRATION_ECE)


def test_multiclass_brier_and_ece_by_hand():
    # Top-label confidence (argmax right?): bin 11 .75 (yes) .77 (no) -> |1.52 - 1| = 0.52;
    # bin 6 .42 (yes) .45 (no) -> 0.13; bin 13 .90 (yes) -> 0.10; bin 9 .62 (yes) -> 0.38.
    labels = np.array([0, 2, 0, 2, 2, 1])
    probs = np.array(
        [
            [0.75, 0.15, 0.10],
            [0.10, 0.77, 0.13],
            [0.42, 0.33, 0.25],
            [0.30, 0.45, 0.25],
            [0.05, 0.05, 0.90],
            [0.20, 0.62, 0.18],
        ]
    )
    result = classification_metrics(labels, probs)
    assert result["ece"] == pytest.approx((0.52 + 0.13 + 0.10 + 0.38) / 6, abs=1e-12)
    # Sum over classes of (p - onehot)^2 per sample, then the mean (Brier 1950; in [0, 2]).
    per_sample = [0.095, 1.3598, 0.5078, 0.855, 0.015, 0.2168]
    assert result["brier"] == pytest.approx(np.mean(per_sample), abs=1e-12)


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_brier_agrees_with_its_definition_on_float32_softmax(num_classes, recwarn):
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, 300)
    logits = rng.normal(0, 2, (300, num_classes)).astype(np.float32)
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    squared = ((probs.astype(np.float64) - np.eye(num_classes)[labels]) ** 2).sum(axis=1)
    expected = squared.mean() / (2 if num_classes == 2 else 1)  # binary: positive class only
    assert classification_metrics(labels, probs)["brier"] == pytest.approx(expected, rel=1e-6)
    # float32 rows that miss 1 by ~1e-7 must not warn on every validation epoch.
    assert not [w for w in recwarn if "sum to one" in str(w.message)]


def test_ece_is_zero_when_confidence_matches_accuracy_per_bin():
    # bin 11: 0.75 on four samples, three positive; bin 3: 0.25 on eight, two positive.
    p1 = [0.75] * 4 + [0.25] * 8
    labels = [1, 1, 1, 0] + [1, 1] + [0] * 6
    result = classification_metrics(np.array(labels), binary_probs(p1))
    assert result["ece"] == pytest.approx(0.0, abs=1e-12)
    # Yet the Brier score still charges the spread: 3/4 * 1/16 + 1/4 * 9/16 in each bin.
    assert result["brier"] == pytest.approx(3 / 16)


def test_calibration_bins_are_half_open_with_one_in_the_last():
    bins = calibration_bins(np.array([0.0, 1 / 30, 0.5, 0.999, 1.0]))
    np.testing.assert_array_equal(bins, [0, 0, 7, 14, 14])
