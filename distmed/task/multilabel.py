"""The multi-label task: several findings per image, each positive, negative, uncertain or
missing, with CheXpert's policies per finding, a masked BCE loss, one sigmoid per output and
per-finding scores and thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from distmed import metrics
from distmed.errors import UserError
from distmed.losses import PLAIN_LOSS, LossSpec, MaskedBCEWithLogits
from distmed.task.base import Curve, Task

MULTILABEL_LOSS_REFUSAL = (
    "train.loss: focal and train.label_smoothing are for one class per image; these images have "
    "several findings (masked BCE per finding): set train.loss: cross_entropy and "
    "train.label_smoothing: 0"
)


# Raw codes of a multi-label index (`DataIndex.multilabel`): 1 positive, 0 negative,
# -1 uncertain, NaN missing (a blank cell, "not mentioned").
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")  # CheXpert's U-Ignore, U-Ones, U-Zeros
MISSING_POLICIES = ("ignore", "zeros")
# A metrics dict holds each finding's ROC-AUC under this prefix: "roc_auc/Edema".
FINDING_AUC_PREFIX = "roc_auc/"


def finding_auc_key(finding: str) -> str:
    """The metrics-dict key of one finding's ROC-AUC (`"roc_auc/" + finding`)."""
    return FINDING_AUC_PREFIX + finding


@dataclass(frozen=True)
class MultilabelTask(Task):
    """L findings per image, each present or not (torchmetrics' Multilabel*, torchxrayvision).

    Index labels are raw codes (N, L): 1 positive, 0 negative, -1 uncertain, NaN missing.
    `targets` turns them into what training and scoring see, per finding: `uncertain[l]` is
    "ignore" (masked: NaN), "ones" or "zeros" (CheXpert's U-Ignore / U-Ones / U-Zeros; Irvin
    et al. 2019, AAAI), `missing[l]` "ignore" (torchxrayvision) or "zeros" (CheXpert's
    competition code). Every method below that takes `labels` takes those TARGETS: float
    (N, L) of 0, 1 and NaN, where NaN leaves the entry out of loss and metrics.

    Outputs are L logits with a sigmoid each. The score is the mean ROC-AUC over the `scored`
    findings, each over its unmasked samples; the other `metrics.METRIC_NAMES` are macro
    means over the scored findings at each finding's decision (probability >= its threshold,
    0.5 without one). `scored` leaves out findings too rare in the CV pool to score
    (`multilabel_task`). Empty `uncertain`/`missing`/`scored` mean "ignore" and all findings.
    """

    uncertain: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    scored: tuple[str, ...] = ()
    kind: Literal["multilabel"] = "multilabel"

    def __post_init__(self) -> None:
        count = len(self.class_names)
        defaults = {"uncertain": ("ignore",) * count, "missing": ("ignore",) * count}
        for name, default in {**defaults, "scored": self.class_names}.items():
            value = tuple(getattr(self, name)) or default
            object.__setattr__(self, name, value)  # frozen: fill the defaults once, here
        if count < 1 or len(set(self.class_names)) != count:
            raise ValueError(f"a multi-label task has 1 or more distinct findings, not {self}")
        if len(self.uncertain) != count or not set(self.uncertain) <= set(UNCERTAIN_POLICIES):
            raise ValueError(f"uncertain: one of {UNCERTAIN_POLICIES} per finding, not {self}")
        if len(self.missing) != count or not set(self.missing) <= set(MISSING_POLICIES):
            raise ValueError(f"missing: one of {MISSING_POLICIES} per finding, not {self}")
        if not set(self.scored) <= set(self.class_names):
            raise ValueError(f"scored findings must be findings, not {self.scored}")
        ordered = tuple(n for n in self.class_names if n in self.scored)  # findings' order
        object.__setattr__(self, "scored", ordered)

    @property
    def thresholded(self) -> bool:
        """A threshold per finding applies (a vector of L)."""
        return True

    @property
    def scored_index(self) -> np.ndarray:
        """(S,) column numbers of the scored findings."""
        return np.array([self.class_names.index(n) for n in self.scored], dtype=np.int64)

    # ----------------------------------------------------------------- labels

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Raw codes (N, L) -> float32 targets (N, L): 0, 1, NaN (ignored), per the policies.

        Raises:
            ValueError: not (N, L), or a code other than 1, 0, -1, NaN.
        """
        raw = self._shaped(labels)
        known = np.isnan(raw) | np.isin(raw, (POSITIVE, NEGATIVE, UNCERTAIN))
        if not known.all():
            bad = np.unique(raw[~known])[:5].tolist()
            raise ValueError(f"multi-label codes are 1, 0, -1 and NaN, not {bad}")
        out = raw.copy()
        value = {"ignore": np.nan, "ones": POSITIVE, "zeros": NEGATIVE}
        for column, (unsure, blank) in enumerate(zip(self.uncertain, self.missing, strict=True)):
            out[raw[:, column] == UNCERTAIN, column] = value[unsure]
            out[np.isnan(raw[:, column]), column] = value[blank]
        return out

    def label_array(self, values: Sequence) -> np.ndarray:
        """Targets sent as nested lists -> float32 (N, L) (None, as JSON writes NaN, -> NaN)."""
        return self._shaped(np.asarray(values, dtype=np.float32))

    def stratify_key(self, labels: np.ndarray) -> np.ndarray:
        """int8 (N, L): 1 where the target is positive after the policies (ignored -> 0).

        Raw codes and targets give the same key."""
        return (self.targets(labels) == POSITIVE).astype(np.int8)

    def class_weights(self, train_labels: np.ndarray) -> np.ndarray:
        """`train.class_weights: balanced` for findings: (L,) `pos_weight` = negatives /
        positives of each finding on the training fold's unmasked targets (PyTorch's
        `BCEWithLogitsLoss` documentation suggests this ratio); 1 where a finding has no
        positive or no negative there."""
        targets = self._shaped(train_labels)
        positives = (targets == POSITIVE).sum(axis=0)
        negatives = (targets == NEGATIVE).sum(axis=0)
        both = (positives > 0) & (negatives > 0)
        ratio = negatives / np.maximum(positives, 1)
        return np.where(both, ratio, 1.0).astype(np.float32)

    def build_loss(
        self, weights: np.ndarray | None, device: torch.device | str, spec: LossSpec = PLAIN_LOSS
    ) -> nn.Module:
        """`MaskedBCEWithLogits`; `weights` (L,) is each finding's `pos_weight` when given.

        Raises:
            UserError: `spec` asks for label smoothing or focal loss, which are written for one
                class per image here (`cv.prepare_data` says so before training starts).
        """
        if spec != PLAIN_LOSS:
            raise UserError(MULTILABEL_LOSS_REFUSAL)
        if weights is None:
            return MaskedBCEWithLogits().to(device)
        pos_weight = torch.tensor(weights, dtype=torch.float32, device=device)
        return MaskedBCEWithLogits(pos_weight).to(device)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, L) logits -> (N, L) probabilities, one sigmoid per finding (float32)."""
        return torch.sigmoid(logits.float())

    # ----------------------------------------------------------------- scores

    def nll(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Mean binary cross-entropy over the unmasked entries (the loss without pos_weight)."""
        targets, probs = self._shaped(labels), self._probs(probs)
        known = ~np.isnan(targets)
        p = np.clip(probs[known], 1e-12, 1 - 1e-12)
        y = targets[known]
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if y.size else np.nan

    def columns(self, labels: np.ndarray, probs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per finding (all L, in order): (truth, score) over its unmasked samples, as the
        (N_l,) booleans and (N_l,) probabilities a binary metric takes."""
        targets, probs = self._shaped(labels), self._probs(probs)
        out = []
        for column in range(len(self.class_names)):
            known = ~np.isnan(targets[:, column])
            out.append((targets[known, column] == POSITIVE, probs[known, column]))
        return out

    def finding_metrics(
        self, labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | float | None = None
    ) -> list[dict[str, float]]:
        """`metrics.METRIC_NAMES` of each finding (L dicts, in order) over its unmasked samples,
        deciding "present" where the probability reaches the finding's threshold (0.5 without)."""
        cuts = self.thresholds_of(thresholds)
        out = []
        for (truth, score), cut in zip(self.columns(labels, probs), cuts, strict=True):
            if truth.size == 0:
                out.append(dict.fromkeys(metrics.METRIC_NAMES, np.nan))
                continue
            out.append(metrics.binary_metrics(truth, score, score >= cut))
        return out

    def metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        """`metrics_at` each finding's default decision, probability >= 0.5."""
        return self.metrics_at(labels, probs, None)

    def metrics_at(
        self, labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | float | None
    ) -> dict[str, float]:
        """Every `metrics.METRIC_NAMES` as the mean over the scored findings (each finding's
        value over its unmasked samples; NaN when one of them is undefined, as a single-class
        set's AUC is), plus every finding's ROC-AUC under `finding_auc_key(name)`.

        Args:
            labels: (N, L) targets (NaN ignored); probs: (N, L) probabilities.
            thresholds: (L,) per finding, one for all, or None (0.5).
        """
        per = self.finding_metrics(labels, probs, thresholds)
        scored = [per[i] for i in self.scored_index]
        out = {name: float(np.mean([m[name] for m in scored])) for name in metrics.METRIC_NAMES}
        for name, m in zip(self.class_names, per, strict=True):
            out[finding_auc_key(name)] = m["roc_auc"]
        return out

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return (*metrics.METRIC_NAMES, *map(finding_auc_key, self.class_names))

    def finding_aucs(self, values: dict[str, float]) -> dict[str, float]:
        """Finding -> ROC-AUC, read back from a metrics dict (`metrics_at`'s keys)."""
        return {n: values[finding_auc_key(n)] for n in self.class_names}

    def calibration_error(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Mean over the scored findings of each finding's binary ECE (its probability against
        "present", `metrics.expected_calibration_error`), in [0, 1]."""
        columns = self.columns(labels, probs)
        return float(
            np.mean(
                [metrics.expected_calibration_error(*columns[i][::-1]) for i in self.scored_index]
            )
        )

    def brier(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Mean over the scored findings of each finding's binary Brier score, in [0, 1]."""
        columns = self.columns(labels, probs)
        return float(np.mean([metrics.binary_brier(*columns[i]) for i in self.scored_index]))

    def bootstrap(
        self,
        labels: np.ndarray,
        probs: np.ndarray,
        threshold: np.ndarray | float | None = None,
        resamples: int = 1000,
        seed: int = 0,
    ) -> dict[str, tuple[float, float]]:
        """95% percentile intervals of `metrics.CI_METRICS`, resampling cases (images, all L
        findings together): the scored findings' mean under each metric's name, and every
        finding's own interval under `"<metric>/<finding>"` (e.g. "roc_auc/Edema").
        A resample where a finding is undefined (no positive) leaves that finding's draw,
        and the mean's, out of the interval."""
        targets = self._shaped(labels)
        macro, per = metrics.multilabel_bootstrap_ci(
            truth=targets == POSITIVE,
            valid=~np.isnan(targets),
            score=self._probs(probs),
            thresholds=self.thresholds_of(threshold),
            scored=self.scored_index,
            resamples=resamples,
            seed=seed,
        )
        out = dict(macro)
        for name, intervals in zip(self.class_names, per, strict=True):
            out.update({f"{metric}/{name}": ci for metric, ci in intervals.items()})
        return out

    def decide(self, probs: np.ndarray, threshold: np.ndarray | float | None = None) -> np.ndarray:
        """int8 (N, L): 1 where a finding's probability reaches its threshold ((L,) vector,
        one number for all, or None: 0.5), else 0."""
        return (self._probs(probs) >= self.thresholds_of(threshold)).astype(np.int8)

    def curves(self, labels: np.ndarray, probs: np.ndarray) -> list[Curve]:
        """One curve per finding (all L), over its unmasked samples."""
        return [
            Curve(column, name, truth, score)
            for column, (name, (truth, score)) in enumerate(
                zip(self.class_names, self.columns(labels, probs), strict=True)
            )
        ]

    def thresholds_of(self, threshold: np.ndarray | Sequence[float] | float | None) -> np.ndarray:
        """(L,) decision thresholds: the vector given, one number for all, or 0.5 each."""
        count = len(self.class_names)
        if threshold is None:
            return np.full(count, 0.5)
        cuts = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (count,))
        return np.array(cuts)

    def _shaped(self, labels: np.ndarray) -> np.ndarray:
        return self._checked(labels, np.float32, "labels")

    def _probs(self, probs: np.ndarray) -> np.ndarray:
        return self._checked(probs, np.float64, "probabilities")

    def _checked(self, values: np.ndarray, dtype: type, what: str) -> np.ndarray:
        """`values` as a (N, L) array of `dtype`; ValueError naming `what` otherwise."""
        array: np.ndarray = np.asarray(values, dtype=dtype)
        if array.ndim != 2 or array.shape[1] != len(self.class_names):
            raise ValueError(
                f"multi-label {what} are (N, {len(self.class_names)}), not {array.shape}"
            )
        return array
