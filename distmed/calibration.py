"""Post-hoc calibration by temperature scaling (Guo et al. 2017, "On Calibration of Modern
Neural Networks", ICML): fit one temperature on held-out predictions, apply it to new ones;
and the binary operating threshold chosen on the same held-out (out-of-fold) predictions.
Both stay honest on separable held-out predictions: the temperature is kept at 1, the
threshold sits mid-gap (`metrics.gap_centre`).
A multi-label task gets both per finding (`fit_finding_temperatures`, `oof_finding_thresholds`).

Pure functions of saved class probabilities; a fit is a small frozen record that can be stored
(as JSON) beside the model it calibrates.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, log_softmax, logit, softmax

from distmed.errors import UserError
from distmed.metrics import (
    expected_calibration_error,
    sensitivity_threshold,
    youden_threshold,
)
from distmed.task.base import Task
from distmed.task.multilabel import MultilabelTask
from distmed.task.single import BinaryTask

MAX_FINDINGS = 10_000  # as savedmodel.MAX_CLASSES: bounds what a saved file may list

MIN_SAMPLES = 20  # fewer held-out predictions than this cannot pin a temperature down
TEMPERATURE_BOUNDS = (0.05, 20.0)  # sharpen at most 20x, flatten at most 20x
# An optimum this close (in log T) to the lower bound is the bound, not a fitted value.
AT_BOUND_LOG_MARGIN = 0.01
# Saved probabilities can underflow to exactly 0; their log must stay finite.
PROB_EPSILON = 1e-12


class TemperatureFit(BaseModel):
    """One fitted temperature and what it did on the data it was fitted to.

    NLL is the mean negative log-likelihood in nats per sample; ECE is
    `Task.calibration_error` (15 equal-width bins).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(gt=0)
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    num_samples: int = Field(ge=MIN_SAMPLES)
    kept_at_one: str | None = Field(
        None, description="why the temperature was kept at 1 instead of fitted; null if fitted"
    )


def fit_temperature(labels: np.ndarray, probs: np.ndarray, task: Task) -> TemperatureFit:
    """The temperature T minimising the NLL of softmax(log(probs) / T) on (labels, probs).

    log(probs) equals the model's logits up to a per-row constant, which softmax ignores, so
    fitting on saved probabilities is the same as fitting on the logits (Guo et al. 2017,
    section 4.2). T is searched on a log scale within `TEMPERATURE_BOUNDS`; T > 1 softens an
    over-confident model, T < 1 sharpens an under-confident one. Separable predictions, or an
    optimum at the lower bound, keep T = 1 with the reason in `kept_at_one`
    (`_bounded_minimum`).

    Args:
        labels: (N,) true class index per sample, held out from training.
        probs: (N, K) predicted class probabilities; rows sum to 1.
        task: the task, whose calibration error (`Task.calibration_error`) is reported.

    Raises:
        UserError: fewer than `MIN_SAMPLES` samples, a single class, mismatched shapes,
            labels outside 0..K-1 or non-finite probabilities.
    """
    labels, probs = _checked(labels, probs)
    log_probs = np.log(np.clip(probs, PROB_EPSILON, None))

    def nll_of_log_t(log_t: float) -> float:
        return _nll(labels, log_probs / math.exp(log_t))

    true_side = log_probs[np.arange(len(labels)), labels]
    others = log_probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    temperature, kept = _bounded_minimum(nll_of_log_t, bool((true_side > others.max(1)).all()))
    calibrated = apply_temperature(probs, temperature)
    return TemperatureFit(
        temperature=temperature,
        nll_before=_nll(labels, log_probs),
        nll_after=nll_of_log_t(math.log(temperature)),
        ece_before=task.calibration_error(labels, probs),
        ece_after=task.calibration_error(labels, calibrated),
        num_samples=len(labels),
        kept_at_one=kept,
    )


def _bounded_minimum(
    objective: Callable[[float], float], separable: bool
) -> tuple[float, str | None]:
    """The temperature minimising `objective` (a mean NLL as a function of log T) within
    `TEMPERATURE_BOUNDS`, or 1 with the reason when the data cannot pin it down.

    Why: when every held-out prediction is on its true class's side (`separable`), the NLL
    has no finite optimum: it keeps falling as T -> 0, so the search ends at the lower bound
    and the "calibrated" probabilities are pushed to 0 and 1. Typical of a small validation
    set scored perfectly (CV ROC-AUC 1.0 on 30 images); such a temperature describes the
    luck of the folds, not the model, and applied to a model refitted on all data it turns
    every prediction into a certainty. The same holds when a few errors with small margins
    leave the optimum at the bound (nearly separable). Then T = 1 (no rescaling) is the
    honest choice: the data gives no evidence of over- or under-confidence. An optimum at
    the upper bound (a model no better than chance) only flattens and is kept.
    """
    low, high = TEMPERATURE_BOUNDS
    if separable:
        return 1.0, (
            "the out-of-fold predictions are separable (every one on its true side), so the "
            "NLL has no finite optimum (it falls as T -> 0)"
        )
    found = minimize_scalar(objective, bounds=(math.log(low), math.log(high)), method="bounded")
    if float(found.x) <= math.log(low) + AT_BOUND_LOG_MARGIN:
        return 1.0, (
            f"the NLL's optimum lies at the search bound T = {low:g} (nearly separable "
            "out-of-fold predictions)"
        )
    return math.exp(float(found.x)), None


def fit_oof_temperature(
    oof: tuple[np.ndarray, np.ndarray] | None, task: Task
) -> TemperatureFit | FindingTemperatures | None:
    """The temperature fitted on the best trial's out-of-fold (labels, probs) (never the test
    split), one per finding for a multi-label task (`fit_finding_temperatures`); None, with
    one line saying why, when they are missing or too few."""
    if oof is None:
        print("calibration: the best trial saved no out-of-fold predictions; none fitted")
        return None
    if isinstance(task, MultilabelTask):
        return _fit_oof_finding_temperatures(*oof, task)
    try:
        fit = fit_temperature(*oof, task)
    except UserError as exc:
        print(f"calibration: not fitted ({exc})")
        return None
    if fit.kept_at_one:
        print(f"warning: calibration: {kept_note(fit)}", file=sys.stderr, flush=True)
        return fit
    print(
        f"calibration: temperature {fit.temperature:.3f} on {fit.num_samples} out-of-fold "
        f"predictions (ECE {fit.ece_before:.4f} -> {fit.ece_after:.4f})",
        flush=True,
    )
    return fit


def kept_note(
    fit: TemperatureFit | FindingTemperatures | None, task: Task | None = None
) -> str | None:
    """One line saying which temperatures were kept at 1 and why (for the console, the
    summary and the report; a multi-label `task` names the findings); None when every
    temperature was fitted or none was."""
    if isinstance(fit, TemperatureFit) and fit.kept_at_one:
        return f"temperature kept at 1 (not fitted): {fit.kept_at_one}"
    if isinstance(fit, FindingTemperatures):
        count = len(fit.findings)
        names = [f"finding {i}" for i in range(count)]
        if isinstance(task, MultilabelTask) and len(task.class_names) == count:
            names = list(task.class_names)
        kept = [
            (n, f.kept_at_one)
            for n, f in zip(names, fit.findings, strict=True)
            if f is not None and f.kept_at_one
        ]
        if kept:
            shown = ", ".join(n for n, _ in kept[:8]) + (" ..." if len(kept) > 8 else "")
            return (
                f"temperature kept at 1 (not fitted) for {len(kept)} finding(s) ({shown}): "
                f"{kept[0][1]}"
            )
    return None


@dataclass(frozen=True)
class ThresholdChoice:
    """A binary operating threshold and how it did on the predictions it was chosen on."""

    value: float  # on the positive class's (calibrated) probability
    method: str  # "youden" or "sensitivity>=0.95"
    num_samples: int
    sensitivity: float
    specificity: float


def oof_threshold(
    labels: np.ndarray,
    probs: np.ndarray,
    task: BinaryTask,
    temperature: float | None = None,
    target_sensitivity: float | None = None,
) -> ThresholdChoice:
    """Binary tasks: the positive-class score threshold, picked on out-of-fold validation.

    Youden's J by default, or the highest threshold that reaches `target_sensitivity`.
    The test split plays no part in the choice. With a `temperature`, the out-of-fold
    probabilities are scaled by it first: predict, the app and the saved test predictions
    apply it, so the threshold must live on the same (calibrated) scale.

    Args:
        labels: (N,) true class per out-of-fold sample; probs: (N, 2) its probabilities.
    """
    if temperature is not None:
        probs = apply_temperature(probs, temperature)
    truth, score = task.truth(labels), task.score(probs)
    if target_sensitivity is None:
        value, method = youden_threshold(truth, score), "youden"
    else:
        value = sensitivity_threshold(truth, score, target_sensitivity)
        method = f"sensitivity>={target_sensitivity:g}"
    at = task.metrics_at(labels, probs, value)
    return ThresholdChoice(value, method, len(labels), at["sensitivity"], at["specificity"])


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): `probs` (N, K) recalibrated, same shape, same argmax.

    Raises:
        UserError: a temperature that is not a positive finite number.
    """
    _check_temperature(temperature)
    log_probs = np.log(np.clip(np.asarray(probs, dtype=np.float64), PROB_EPSILON, None))
    return softmax(log_probs / temperature, axis=1)


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits` (N, K) / T, for torch callers that apply softmax themselves.

    Raises:
        UserError: a temperature that is not a positive finite number.
    """
    _check_temperature(temperature)
    return logits / temperature


def _nll(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean cross-entropy (nats) of softmax(`logits`) at the true classes."""
    picked = log_softmax(logits, axis=1)[np.arange(len(labels)), labels]
    return float(-picked.mean())


def _checked(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or labels.shape != (len(probs),):
        raise UserError(
            f"temperature scaling: labels {labels.shape} and probabilities {probs.shape} do "
            "not match; pass (N,) labels and (N, K) probabilities"
        )
    if len(labels) < MIN_SAMPLES:
        raise UserError(
            f"temperature scaling needs at least {MIN_SAMPLES} held-out predictions, got "
            f"{len(labels)}; use a larger validation set"
        )
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise UserError(
            f"temperature scaling: labels must lie in 0..{probs.shape[1] - 1}, got "
            f"{labels.min()}..{labels.max()}"
        )
    if len(np.unique(labels)) < 2:
        raise UserError(
            f"temperature scaling: all {len(labels)} held-out predictions are of class "
            f"{labels[0]}; it needs at least two classes to fit"
        )
    if not np.isfinite(probs).all():
        raise UserError("temperature scaling: the probabilities hold NaN or inf; nothing to fit")
    return labels, probs


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"temperature must be a positive finite number, got {temperature!r}")


# --------------------------------------------------------------------------- per finding


class FindingTemperatures(BaseModel):
    """Temperature scaling per finding of a multi-label model, in `class_names` order.

    A finding's probability p becomes sigmoid(logit(p) / T_l). One temperature per finding,
    not one shared: each sigmoid output is its own binary classifier, with its own
    prevalence, its own `pos_weight` in training and so its own over- or under-confidence;
    a shared T would correct their average and leave each one off. It costs one parameter
    per finding, fitted on thousands of out-of-fold predictions. `findings[l]` is None where
    finding l could not be fitted (fewer than `MIN_SAMPLES` known labels or one class): its
    temperature is 1 (unchanged); a finding whose predictions are separable keeps T = 1 with
    the reason (`TemperatureFit.kept_at_one`). Temperature keeps each finding's ranking (its
    AUC); it rescales confidence but cannot move a shifted base rate (Platt scaling's bias
    term would).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    findings: list[TemperatureFit | None] = Field(min_length=1, max_length=MAX_FINDINGS)

    @property
    def temperatures(self) -> np.ndarray:
        """(L,) temperatures, 1.0 where a finding was not fitted."""
        return np.array([f.temperature if f else 1.0 for f in self.findings])


def fit_finding_temperatures(
    labels: np.ndarray, probs: np.ndarray, task: MultilabelTask
) -> FindingTemperatures:
    """One temperature per finding, each minimising the binary cross-entropy of
    sigmoid(logit(p) / T) over that finding's known labels (Guo et al. 2017's temperature
    scaling, applied to each sigmoid output; log T searched within `TEMPERATURE_BOUNDS`).

    Args:
        labels: (N, L) targets (NaN: ignored, left out); probs: (N, L) probabilities.
        task: the multi-label task (its findings, in column order).
    """
    fits = []
    for truth, score in task.columns(labels, probs):
        enough = len(truth) >= MIN_SAMPLES and 0 < truth.sum() < len(truth)
        fits.append(_fit_one_finding(truth, score) if enough else None)
    return FindingTemperatures(findings=fits)


def _fit_one_finding(truth: np.ndarray, score: np.ndarray) -> TemperatureFit:
    logits = logit(np.clip(score, PROB_EPSILON, 1 - PROB_EPSILON))

    def bce(log_t: float) -> float:
        z = logits / math.exp(log_t)
        return float(-(truth * log_expit(z) + (1 - truth) * log_expit(-z)).mean())

    # Separable: every positive's logit above 0 and every negative's below (`_bounded_minimum`).
    separable = bool(((logits > 0) == (truth > 0.5)).all())
    temperature, kept = _bounded_minimum(bce, separable)
    return TemperatureFit(
        temperature=temperature,
        nll_before=bce(0.0),
        nll_after=bce(math.log(temperature)),
        ece_before=expected_calibration_error(score, truth),
        ece_after=expected_calibration_error(expit(logits / temperature), truth),
        num_samples=len(truth),
        kept_at_one=kept,
    )


def _fit_oof_finding_temperatures(
    labels: np.ndarray, probs: np.ndarray, task: MultilabelTask
) -> FindingTemperatures:
    fit = fit_finding_temperatures(labels, probs, task)
    note = kept_note(fit, task)
    if note:
        print(f"warning: calibration: {note}", file=sys.stderr, flush=True)
    done = [
        (n, f)
        for n, f in zip(task.class_names, fit.findings, strict=True)
        if f and not f.kept_at_one
    ]
    shown = ", ".join(f"{n} {f.temperature:.2f}" for n, f in done[:8])
    more = " ..." if len(done) > 8 else ""
    print(
        f"calibration: a temperature per finding on out-of-fold predictions for {len(done)} "
        f"of {len(task.class_names)} findings ({shown}{more})",
        flush=True,
    )
    return fit


def apply_finding_temperatures(probs: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """sigmoid(logit(probs) / T): `probs` (N, L) recalibrated per finding by (L,)
    `temperatures`; same shape, same ranking per finding.

    Raises:
        UserError: a temperature that is not a positive finite number.
    """
    for temperature in np.asarray(temperatures, dtype=np.float64):
        _check_temperature(float(temperature))
    clipped = np.clip(np.asarray(probs, dtype=np.float64), PROB_EPSILON, 1 - PROB_EPSILON)
    return expit(logit(clipped) / np.asarray(temperatures, dtype=np.float64))


@dataclass(frozen=True)
class FindingThresholdChoice:
    """Per finding (L, in order): the threshold and how it did on the predictions it was
    chosen on; `defaulted` names findings whose predictions held one class (threshold 0.5)."""

    values: list[float]
    method: str
    num_samples: list[int]
    sensitivity: list[float]
    specificity: list[float]
    defaulted: list[str]


def oof_finding_thresholds(
    labels: np.ndarray,
    probs: np.ndarray,
    task: MultilabelTask,
    temperatures: np.ndarray | None = None,
    target_sensitivity: float | None = None,
) -> FindingThresholdChoice:
    """A multi-label task's thresholds, one per finding, picked on out-of-fold validation.

    Each finding's rule is the binary one (`oof_threshold`): Youden's J, or the highest
    threshold reaching `target_sensitivity`, over that finding's known labels, on the scale
    predict uses (probabilities scaled by the finding's temperature first when given).

    Args:
        labels: (N, L) targets (NaN ignored); probs: (N, L) out-of-fold probabilities.
        temperatures: (L,) per-finding temperatures (`FindingTemperatures.temperatures`).
    """
    if temperatures is not None:
        probs = apply_finding_temperatures(probs, temperatures)
    method = "youden" if target_sensitivity is None else f"sensitivity>={target_sensitivity:g}"
    values, counts, defaulted = [], [], []
    for name, (truth, score) in zip(task.class_names, task.columns(labels, probs), strict=True):
        counts.append(len(truth))
        if not 0 < truth.sum() < len(truth):
            values.append(0.5)
            defaulted.append(name)
        elif target_sensitivity is None:
            values.append(youden_threshold(truth, score))
        else:
            values.append(sensitivity_threshold(truth, score, target_sensitivity))
    per = task.finding_metrics(labels, probs, np.array(values))
    return FindingThresholdChoice(
        values=values,
        method=method,
        num_samples=counts,
        sensitivity=[m["sensitivity"] for m in per],
        specificity=[m["specificity"] for m in per],
        defaulted=defaulted,
    )
