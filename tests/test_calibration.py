"""distmed.calibration (temperature scaling) and the before/after reliability diagram."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import softmax

from distmed import plots
from distmed.calibration import (
    MIN_SAMPLES,
    TemperatureFit,
    apply_temperature,
    fit_temperature,
    scale_logits,
)
from distmed.errors import UserError
from distmed.task import BinaryTask, MulticlassTask, Task


def task_of(probs: np.ndarray, positive: int | None = 1) -> Task:
    """The task of (N, K) probabilities: binary scoring `positive`, or multi-class."""
    names = tuple(f"class {k}" for k in range(np.asarray(probs).shape[1]))
    if len(names) != 2:
        return MulticlassTask(names)
    return BinaryTask(names, 1 if positive is None else positive)


def fitted(labels: np.ndarray, probs: np.ndarray, positive: int | None = 1) -> TemperatureFit:
    return fit_temperature(labels, probs, task_of(probs, positive))


def synthetic(num_classes: int, n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) with labels drawn from softmax(logits): softmax(logits) is calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, num_classes))
    cumulative = softmax(logits, axis=1).cumsum(axis=1)
    labels = (rng.random((n, 1)) > cumulative).sum(axis=1)
    return labels, logits


@pytest.mark.parametrize("num_classes", [2, 4])
def test_overconfident_model_gets_a_temperature_above_one(num_classes):
    labels, logits = synthetic(num_classes)
    probs = softmax(3 * logits, axis=1)  # three times too sharp
    fit = fitted(labels, probs)
    assert fit.temperature == pytest.approx(3.0, abs=0.4)
    assert fit.nll_after < fit.nll_before - 0.1
    assert fit.ece_after < fit.ece_before / 3
    calibrated = apply_temperature(probs, fit.temperature)
    assert calibrated.shape == probs.shape
    np.testing.assert_array_equal(calibrated.argmax(axis=1), probs.argmax(axis=1))
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)
    # The record describes what the returned temperature does to these predictions.
    task = task_of(probs)
    assert fit.ece_before == pytest.approx(task.metrics(labels, probs)["ece"])
    assert fit.ece_after == pytest.approx(task.calibration_error(labels, calibrated))
    assert fit.num_samples == len(labels)


def test_underconfident_model_gets_a_temperature_below_one():
    labels, logits = synthetic(3)
    fit = fitted(labels, softmax(logits / 2, axis=1))
    assert fit.temperature == pytest.approx(0.5, abs=0.1)
    assert fit.nll_after < fit.nll_before


@pytest.mark.parametrize("num_classes", [2, 3])
def test_calibrated_model_keeps_a_temperature_near_one(num_classes):
    labels, logits = synthetic(num_classes, seed=1)
    fit = fitted(labels, softmax(logits, axis=1))
    assert fit.temperature == pytest.approx(1.0, abs=0.1)
    assert fit.nll_after <= fit.nll_before + 1e-9


def test_probabilities_of_exactly_zero_are_fitted():
    labels, logits = synthetic(3, n=200)
    # Saved float32 probabilities of a very over-confident model underflow to exactly 0.
    probs = softmax(40 * logits, axis=1).astype(np.float32)
    assert (probs == 0).any()
    fit = fitted(labels, probs)
    assert math.isfinite(fit.nll_before) and fit.nll_after < fit.nll_before
    assert fit.temperature > 5


def test_scale_logits_matches_apply_temperature():
    _, logits = synthetic(3, n=50)
    scaled = torch.softmax(scale_logits(torch.from_numpy(logits), 2.5), dim=1).numpy()
    np.testing.assert_allclose(scaled, apply_temperature(softmax(logits, axis=1), 2.5), atol=1e-9)


def test_temperature_one_changes_nothing():
    _, logits = synthetic(4, n=50)
    probs = softmax(logits, axis=1)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)


def test_fit_survives_a_json_round_trip_and_is_frozen():
    labels, logits = synthetic(2, n=100)
    fit = fitted(labels, softmax(2 * logits, axis=1))
    assert TemperatureFit.model_validate_json(fit.model_dump_json()) == fit
    with pytest.raises(ValueError):
        fit.temperature = 1.0  # type: ignore[misc]


def test_single_class_is_refused():
    probs = softmax(np.random.default_rng(0).normal(size=(30, 2)), axis=1)
    with pytest.raises(UserError, match="at least two classes"):
        fitted(np.ones(30, dtype=int), probs)


def test_too_few_samples_are_refused():
    labels, logits = synthetic(2, n=MIN_SAMPLES - 1)
    with pytest.raises(UserError, match=f"at least {MIN_SAMPLES}.*got {MIN_SAMPLES - 1}"):
        fitted(labels, softmax(logits, axis=1))


@pytest.mark.parametrize(
    "labels, probs, message",
    [
        (np.zeros(25, dtype=int), np.full((30, 2), 0.5), "do not match"),
        (np.arange(30) % 3, np.full((30, 2), 0.5), r"labels must lie in 0\.\.1, got 0\.\.2"),
        (np.arange(30) % 2, np.full((30, 2), np.nan), "NaN"),
    ],
)
def test_malformed_input_is_refused(labels, probs, message):
    with pytest.raises(UserError, match=message):
        fitted(labels, probs)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_a_bad_temperature_is_refused(temperature):
    with pytest.raises(UserError, match="positive finite"):
        apply_temperature(np.full((3, 2), 0.5), temperature)
    with pytest.raises(UserError, match="positive finite"):
        scale_logits(torch.zeros(3, 2), temperature)


@pytest.mark.parametrize("num_classes, positive", [(2, 1), (3, None)])
def test_reliability_diagram_before_and_after_writes_its_files(tmp_path, num_classes, positive):
    labels, logits = synthetic(num_classes, n=300)
    probs = softmax(3 * logits, axis=1)
    after = apply_temperature(probs, fitted(labels, probs, positive).temperature)
    task = task_of(probs, positive)
    both = plots.plot_calibration(labels, probs, task, tmp_path / "both.png", after_probs=after)
    before = plots.plot_calibration(labels, probs, task, tmp_path / "before.png")
    for path in (both, before):
        assert path.stat().st_size > 0
        assert all(copy.stat().st_size > 0 for copy in plots.vector_copies(path))
    # The legend names each version with its ECE (SVG keeps text as text).
    svg = both.with_suffix(".svg").read_text()
    assert "uncalibrated (ECE" in svg and "temperature-scaled (ECE" in svg
    assert "ECE" not in before.with_suffix(".svg").read_text()  # the old call draws one version


# --------------------------------------------------------------------------- separable OOF


def separable_binary(n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) of a tiny search scored perfectly: every positive above every
    negative, every prediction on its true side of 0.5 (CV ROC-AUC 1.0)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    score = np.where(labels == 1, rng.uniform(0.6, 0.9, n), rng.uniform(0.1, 0.4, n))
    return labels, np.stack([1 - score, score], axis=1)


def test_separable_oof_keep_temperature_one_and_say_so(capsys):
    """The NLL of separable predictions falls as T -> 0: the old fit ran to the bound
    (0.05) and sharpened every probability to 0 or 1; it is kept at 1, with a warning."""
    from distmed.calibration import TEMPERATURE_BOUNDS, fit_oof_temperature, kept_note

    labels, probs = separable_binary()
    fit = fit_oof_temperature((labels, probs), task_of(probs))
    assert isinstance(fit, TemperatureFit)
    assert fit.temperature == 1.0 > TEMPERATURE_BOUNDS[0]
    assert fit.kept_at_one and "separable" in fit.kept_at_one
    assert fit.nll_after == pytest.approx(fit.nll_before)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: calibration: temperature kept at 1")
    assert kept_note(fit) == err[0].removeprefix("warning: calibration: ")
    assert TemperatureFit.model_validate_json(fit.model_dump_json()) == fit


def test_separable_multiclass_oof_keep_temperature_one():
    rng = np.random.default_rng(1)
    labels = np.arange(30) % 3
    logits = rng.normal(0, 0.3, (30, 3))
    logits[np.arange(30), labels] += 2.0  # the true class always the most probable
    fit = fitted(labels, softmax(logits, axis=1))
    assert fit.temperature == 1.0 and fit.kept_at_one


def test_nearly_separable_oof_whose_optimum_is_the_bound_keep_temperature_one():
    """One error by a hair among confident right answers: the optimum is still the bound."""
    labels = np.arange(30) % 2
    margin = np.where(labels == 1, 0.5, -0.5)
    margin[0] = 0.001  # a negative just on the wrong side
    score = 1 / (1 + np.exp(-margin))
    fit = fitted(labels, np.stack([1 - score, score], axis=1))
    assert fit.temperature == 1.0
    assert fit.kept_at_one and "search bound" in fit.kept_at_one


def test_separable_oof_threshold_lies_in_the_middle_of_the_gap():
    """Youden's J is the same anywhere between the highest negative and the lowest positive
    score; the threshold is the logit midpoint, not the lowest positive (the edge a refit
    model's probabilities may never reach)."""
    from scipy.special import expit, logit

    from distmed.calibration import oof_threshold

    labels, probs = separable_binary()
    fit = fitted(labels, probs)
    score = probs[:, 1]
    top_negative, low_positive = score[labels == 0].max(), score[labels == 1].min()
    for target in (None, 0.95):
        chosen = oof_threshold(labels, probs, task_of(probs), fit.temperature, target)
        assert top_negative < chosen.value < low_positive
        midpoint = expit((logit(top_negative) + logit(low_positive)) / 2)
        assert chosen.value == pytest.approx(midpoint)
        assert chosen.sensitivity == chosen.specificity == 1.0


def test_gap_centre_is_the_logit_midpoint_and_keeps_every_decision():
    from distmed.metrics import gap_centre, youden_threshold

    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, 200).astype(bool)
    score = np.clip(0.3 * truth + rng.uniform(0, 0.7, 200), 0.001, 0.999)
    edge = float(np.sort(score)[120])
    centre = gap_centre(score, edge)
    assert np.sort(score)[119] < centre < edge
    np.testing.assert_array_equal(score >= centre, score >= edge)
    assert gap_centre(score, float(score.min())) == float(score.min())  # nothing below
    chosen = youden_threshold(truth, score)
    assert chosen not in set(score.tolist())  # inside a gap, not on a score


def test_separable_finding_keeps_temperature_one_and_its_threshold_in_the_gap(capsys):
    """Multi-label: the same per finding; a finding that is not separable is still fitted."""
    from distmed.calibration import fit_oof_temperature, kept_note, oof_finding_thresholds
    from distmed.task import MultilabelTask

    task = MultilabelTask(("Effusion", "Mass"))
    labels_a, probs_a = separable_binary(60, seed=3)
    labels_b, logits_b = synthetic(2, n=60, seed=4)
    probs_b = softmax(3 * logits_b, axis=1)[:, 1]  # over-confident, not separable
    labels = np.stack([labels_a, labels_b], axis=1).astype(np.float64)
    probs = np.stack([probs_a[:, 1], probs_b], axis=1)
    fit = fit_oof_temperature((labels, probs), task)
    assert not isinstance(fit, TemperatureFit) and fit is not None
    effusion, mass = fit.findings
    assert effusion is not None and effusion.temperature == 1.0 and effusion.kept_at_one
    assert mass is not None and mass.kept_at_one is None and mass.temperature > 1.2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Effusion" in err[0] and "Mass" not in err[0]
    note = kept_note(fit, task)
    assert note is not None and "1 finding(s) (Effusion)" in note
    chosen = oof_finding_thresholds(labels, probs, task, fit.temperatures)
    score = probs[:, 0]
    assert score[labels_a == 0].max() < chosen.values[0] < score[labels_a == 1].min()


def test_the_report_says_why_the_temperature_was_kept_at_one(tmp_path):
    from types import SimpleNamespace

    from distmed.runreport import ensemble_section

    labels, probs = separable_binary()
    fit = fitted(labels, probs)
    run = SimpleNamespace(
        test={"labels": labels, "probs": probs}, run_dir=tmp_path, task=task_of(probs),
        calibration=fit,
    )  # fmt: skip
    page = ensemble_section(run, tmp_path, resamples=20)  # type: ignore[arg-type]
    assert "Temperature kept at 1" in page and "separable" in page
    assert "data-key='temperature'" not in page  # no fitted value shown
