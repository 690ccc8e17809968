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
