"""The prediction task: what a label is, and how predictions are trained, scored and decided.

One object owns what differs between kinds of target: the loss, the output activation, the
key the folds are stratified on, the metric set and the decision rule. Binary, multi-class and
multi-label (several findings per image, each positive, negative, uncertain or missing) tasks
are here. The split follows torchmetrics' Binary/Multiclass/Multilabel AUROC classes and
MedMNIST's per-data-set `task` field (`medmnist/info.py`). A task is plain, frozen data, so it
crosses Ray's process boundaries as it is.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from distmed import metrics
from distmed.errors import UserError, did_you_mean, shorten
from distmed.losses import PLAIN_LOSS, LossSpec, SoftmaxLoss

if TYPE_CHECKING:
    from distmed.config import DataConfig
    from distmed.data import DataIndex

log = logging.getLogger(__name__)

MULTILABEL_LOSS_REFUSAL = (
    "train.loss: focal and train.label_smoothing are for one class per image; these images have "
    "several findings (masked BCE per finding): set train.loss: cross_entropy and "
    "train.label_smoothing: 0"
)


@dataclass(frozen=True)
class Curve:
    """One one-vs-rest view of the scores: class `index` called `name`, (N,) truth and score."""

    index: int
    name: str
    truth: np.ndarray
    score: np.ndarray


@dataclass(frozen=True)
class Task(ABC):
    """A single-label classification task over `class_names` (K of them, K >= 2).

    Labels are class indices (N,); model outputs are K logits; probabilities are (N, K) rows
    summing to 1.
    """

    class_names: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        """Width of the model's head (K)."""
        return len(self.class_names)

    @property
    @abstractmethod
    def thresholded(self) -> bool:
        """Whether a decision threshold on one score applies (binary tasks)."""

    def build_loss(
        self, weights: np.ndarray | None, device: torch.device | str, spec: LossSpec = PLAIN_LOSS
    ) -> nn.Module:
        """Cross-entropy (or `spec`'s focal loss, label smoothing) over the K logits;
        `weights` (K,) per class when given. Targets: indices (N,) or probabilities (N, K)."""
        weight = None
        if weights is not None:
            weight = torch.tensor(weights, dtype=torch.float32, device=device)
        return SoftmaxLoss(weight, spec)

    def class_weights(self, train_labels: np.ndarray) -> np.ndarray:
        """`train.class_weights: balanced`: (K,) weights n / (K * n_k) from a training fold's
        labels (scikit-learn's "balanced" rule); classes absent from the fold weigh 1."""
        train_labels = np.asarray(train_labels)
        present = np.unique(train_labels)
        weights = np.ones(self.num_outputs, dtype=np.float32)
        weights[present] = compute_class_weight("balanced", classes=present, y=train_labels)
        return weights

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) logits -> (N, K) class probabilities (softmax, in float32)."""
        return torch.softmax(logits.float(), dim=1)

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """What the loss and the metrics compare with, from the index's labels: the class
        indices (N,) themselves (a multi-label task applies its policies here)."""
        return np.asarray(labels)

    def label_array(self, values: Sequence) -> np.ndarray:
        """Targets that crossed a process boundary as lists, as the array they were: (N,) int64."""
        return np.asarray(values, dtype=np.int64)

    def stratify_key(self, labels: np.ndarray) -> np.ndarray:
        """What the folds are stratified on: the class of each sample (N,)."""
        return np.asarray(labels)

    def nll(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Mean negative log-likelihood of the true classes (the cross-entropy loss)."""
        picked = np.asarray(probs)[np.arange(len(labels)), np.asarray(labels)]
        return float(-np.log(np.clip(picked, 1e-12, None)).mean())

    @abstractmethod
    def metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        """Every metric in `metrics.METRIC_NAMES`, deciding by argmax."""

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The keys of a `metrics` dict: `metrics.METRIC_NAMES` (and, multi-label, each
        finding's ROC-AUC)."""
        return metrics.METRIC_NAMES

    @abstractmethod
    def calibration_error(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Expected calibration error (`metrics.expected_calibration_error`), in [0, 1]."""

    @abstractmethod
    def brier(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Brier score (lower is better): binary in [0, 1], multi-class in [0, 2]."""

    @abstractmethod
    def bootstrap(
        self,
        labels: np.ndarray,
        probs: np.ndarray,
        threshold: float | None = None,
        resamples: int = 1000,
        seed: int = 0,
    ) -> dict[str, tuple[float, float]]:
        """95% percentile bootstrap intervals of `metrics.CI_METRICS` (resampling cases)."""

    @abstractmethod
    def decide(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Predicted class index per row of `probs` (N, K)."""

    @abstractmethod
    def curves(self, labels: np.ndarray, probs: np.ndarray) -> list[Curve]:
        """The one-vs-rest views a figure draws: the scored class, or every class."""


@dataclass(frozen=True)
class BinaryTask(Task):
    """Two classes; class `positive` is the one whose probability ranks and is thresholded."""

    positive: int = 1
    kind: Literal["binary"] = "binary"  # which task a plain record (JSON, Ray) holds

    def __post_init__(self) -> None:
        if len(self.class_names) != 2 or self.positive not in (0, 1):
            raise ValueError(f"a binary task has 2 classes and positive 0 or 1, not {self}")

    @property
    def thresholded(self) -> bool:
        return True

    @property
    def positive_class(self) -> str:
        return self.class_names[self.positive]

    def truth(self, labels: np.ndarray) -> np.ndarray:
        """(N,) booleans: is each label the positive class."""
        return np.asarray(labels) == self.positive

    def score(self, probs: np.ndarray) -> np.ndarray:
        """(N,) the positive class's probability: what ranks samples and is thresholded."""
        return np.asarray(probs, dtype=np.float64)[:, self.positive]

    def metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        probs = np.asarray(probs, dtype=np.float64)
        decision = probs.argmax(axis=1) == self.positive
        return metrics.binary_metrics(self.truth(labels), self.score(probs), decision)

    def metrics_at(self, labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
        """`metrics.METRIC_NAMES`, deciding "positive" when its score >= `threshold`."""
        score = self.score(probs)
        return metrics.binary_metrics(self.truth(labels), score, score >= threshold)

    def calibration_error(self, labels: np.ndarray, probs: np.ndarray) -> float:
        return metrics.expected_calibration_error(self.score(probs), self.truth(labels))

    def brier(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Mean (p_positive - [label == positive])^2, in [0, 1]."""
        return metrics.binary_brier(self.truth(labels), self.score(probs))

    def bootstrap(
        self,
        labels: np.ndarray,
        probs: np.ndarray,
        threshold: float | None = None,
        resamples: int = 1000,
        seed: int = 0,
    ) -> dict[str, tuple[float, float]]:
        argmax = np.asarray(probs).argmax(axis=1) == self.positive
        return metrics.binary_bootstrap_ci(
            self.truth(labels), self.score(probs), argmax, threshold, resamples, seed=seed
        )

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """The positive class where its score reaches `threshold`, else the other one;
        without a threshold, the more probable class."""
        if threshold is None:
            return np.asarray(probs).argmax(axis=1)
        return np.where(self.score(probs) >= threshold, self.positive, 1 - self.positive)

    def curves(self, labels: np.ndarray, probs: np.ndarray) -> list[Curve]:
        return [Curve(self.positive, self.positive_class, self.truth(labels), self.score(probs))]


@dataclass(frozen=True)
class MulticlassTask(Task):
    """K > 2 exclusive classes: macro one-vs-rest ROC-AUC, argmax decisions."""

    kind: Literal["multiclass"] = "multiclass"

    def __post_init__(self) -> None:
        if len(self.class_names) < 3:
            raise ValueError(f"a multi-class task has 3 or more classes, not {self}")

    @property
    def thresholded(self) -> bool:
        return False

    def metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        return metrics.multiclass_metrics(np.asarray(labels), np.asarray(probs, dtype=np.float64))

    def calibration_error(self, labels: np.ndarray, probs: np.ndarray) -> float:
        probs = np.asarray(probs, dtype=np.float64)
        correct = probs.argmax(axis=1) == np.asarray(labels)
        return metrics.expected_calibration_error(probs.max(axis=1), correct)

    def brier(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Sum over classes of (p_k - onehot_k)^2, averaged over samples, in [0, 2]."""
        return metrics.multiclass_brier(np.asarray(labels), np.asarray(probs, dtype=np.float64))

    def bootstrap(
        self,
        labels: np.ndarray,
        probs: np.ndarray,
        threshold: float | None = None,
        resamples: int = 1000,
        seed: int = 0,
    ) -> dict[str, tuple[float, float]]:
        labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        return metrics.percentile_ci(
            lambda picks: metrics.multiclass_metrics(labels[picks], probs[picks]),
            len(labels),
            resamples,
            seed,
        )

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """The most probable class (a threshold does not apply to K > 2 classes)."""
        return np.asarray(probs).argmax(axis=1)

    def curves(self, labels: np.ndarray, probs: np.ndarray) -> list[Curve]:
        labels = np.asarray(labels)
        return [
            Curve(k, name, labels == k, np.asarray(probs, dtype=np.float64)[:, k])
            for k, name in enumerate(self.class_names)
        ]


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


class MaskedBCEWithLogits(nn.Module):
    """Binary cross-entropy with logits per finding, averaged over the known targets only.

    For logits z (N, L) and targets y (N, L) with NaN where a label is ignored, the mask
    m = [y is not NaN] and, per finding l, `pos_weight` p_l (1 when not given):

        loss = sum_il m_il * -(p_l y_il log s(z_il) + (1 - y_il) log(1 - s(z_il))) / sum_il m_il

    (s the sigmoid; the per-element term is PyTorch's `BCEWithLogitsLoss` with `pos_weight`).
    A masked entry adds nothing to the loss or its gradient; a batch with every entry masked
    gives 0.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.pos_weight: torch.Tensor | None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        per_entry = F.binary_cross_entropy_with_logits(
            logits.float(),
            torch.where(known, targets, 0.0).float(),
            pos_weight=self.pos_weight,
            reduction="none",
        )
        return (per_entry * known).sum() / known.sum().clamp_min(1)


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


# A task as a typed field of a pydantic record (the worker's config): the `kind` says which.
AnyTask = Annotated[BinaryTask | MulticlassTask | MultilabelTask, Field(discriminator="kind")]


def task_for(class_names: Sequence[str], positive_class: str | None = None) -> Task:
    """The task of a data set with `class_names`: binary for two classes, else multi-class.

    Args:
        class_names: the classes in label order.
        positive_class: binary tasks, the scored class (`data.positive_class`; default the
            second class).

    Raises:
        UserError: `positive_class` is not one of `class_names`.
    """
    names = tuple(class_names)
    if len(names) != 2:
        return MulticlassTask(names)
    if positive_class is None:
        return BinaryTask(names, 1)
    if positive_class not in names:
        raise UserError(
            f"data.positive_class {positive_class!r} is not a class; classes: {list(names)}"
            f"{did_you_mean([positive_class], names)}"
        )
    return BinaryTask(names, names.index(positive_class))


PolicySetting = str | dict[str, str]  # `data.uncertain` / `data.missing`: one, or per finding


def task_of_index(index: DataIndex, data: DataConfig, folds: int) -> Task:
    """The task of a scanned source: multi-label when the index says so (`multilabel_task`,
    policies from `data.uncertain` / `data.missing`, `data.score_findings`, the CV pool's
    counts against `cv.folds` = `folds`), else `task_for` its classes.

    Raises:
        UserError: as `task_for` and `multilabel_task` do.
    """
    if not getattr(index, "multilabel", False):
        return task_for(index.class_names, data.positive_class)
    # The multi-label keys arrive with the data reading (issue #32, M1): read with their
    # documented defaults until then.
    return multilabel_task(
        index.class_names,
        index.pool.labels,
        uncertain=getattr(data, "uncertain", "ignore"),
        missing=getattr(data, "missing", "ignore"),
        score_findings=getattr(data, "score_findings", None),
        folds=folds,
    )


def multilabel_task(
    findings: Sequence[str],
    pool_labels: np.ndarray,
    uncertain: PolicySetting = "ignore",
    missing: PolicySetting = "ignore",
    score_findings: Sequence[str] | None = None,
    folds: int = 5,
) -> MultilabelTask:
    """The multi-label task of a CV pool: policies per finding and the findings it can score.

    A finding with fewer than `folds` positive (or negative) images in the pool after its
    policy cannot have both in every validation fold, so its fold AUCs are undefined: it is
    left out of the score with one warning, or, when `score_findings` names it, the run
    stops. Its output is still trained and its AUC recorded where defined.

    Args:
        findings: the L finding names, in column order.
        pool_labels: (N, L) raw codes of the CV pool (1, 0, -1 uncertain, NaN missing).
        uncertain, missing: one policy for all findings, or finding -> policy (findings not
            named: "ignore").
        score_findings: the findings the CV score averages (`data.score_findings`); None: all.
        folds: `cv.folds`.

    Raises:
        UserError: an unknown finding or policy in the settings, a named finding too rare to
            score, or no finding left to score.
    """
    names = tuple(findings)
    task = MultilabelTask(
        names,
        uncertain=_per_finding(uncertain, names, "data.uncertain", UNCERTAIN_POLICIES),
        missing=_per_finding(missing, names, "data.missing", MISSING_POLICIES),
    )
    unknown = [n for n in score_findings or () if n not in names]
    if unknown:
        raise UserError(
            f"data.score_findings: {', '.join(map(shorten, unknown))} not among the findings "
            f"{[shorten(n) for n in names][:20]}; fix the name(s){did_you_mean(unknown, names)}"
        )
    targets = task.targets(pool_labels)
    positives = (targets == POSITIVE).sum(axis=0)
    negatives = (targets == NEGATIVE).sum(axis=0)
    candidates = list(score_findings) if score_findings else list(names)
    rare = {
        n: (int(positives[names.index(n)]), int(negatives[names.index(n)]))
        for n in candidates
        if min(positives[names.index(n)], negatives[names.index(n)]) < folds
    }
    counted = "; ".join(f"{shorten(n)} {p} positive / {q} negative" for n, (p, q) in rare.items())
    if rare and score_findings:
        raise UserError(
            f"data.score_findings names finding(s) with fewer than cv.folds={folds} positive "
            f"or negative images in the CV pool after data.uncertain/missing ({counted}): "
            "drop them from data.score_findings, change their policy or lower cv.folds"
        )
    scored = tuple(n for n in candidates if n not in rare)
    if not scored:
        raise UserError(
            f"no finding has {folds} (cv.folds) positive and negative images in the CV pool "
            f"after data.uncertain/missing ({counted}); add images or lower cv.folds"
        )
    if rare:
        log.warning(
            "finding(s) left out of the CV score, fewer than cv.folds=%d positive or negative "
            "images in the CV pool after data.uncertain/missing (%s); still trained, their "
            "AUCs recorded where defined",
            folds,
            counted,
        )
    return MultilabelTask(names, task.uncertain, task.missing, scored)


def _per_finding(
    setting: PolicySetting, names: tuple[str, ...], key: str, allowed: tuple[str, ...]
) -> tuple[str, ...]:
    """One policy per finding from a config value: one policy, or finding -> policy."""
    chosen = dict.fromkeys(names, setting) if isinstance(setting, str) else dict(setting)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise UserError(
            f"{key}: {', '.join(map(shorten, unknown))} not among the findings "
            f"{[shorten(n) for n in names][:20]}; fix the name(s){did_you_mean(unknown, names)}"
        )
    wrong = {n: p for n, p in chosen.items() if p not in allowed}
    if wrong:
        name, policy = next(iter(wrong.items()))
        raise UserError(f"{key}: {policy!r} for {shorten(name)} is not one of {list(allowed)}")
    return tuple(chosen.get(n, "ignore") for n in names)
