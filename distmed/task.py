"""The prediction task: what a label is, and how predictions are trained, scored and decided.

One object owns what differs between kinds of target: the loss, the output activation, the
key the folds are stratified on, the metric set and the decision rule. Binary and multi-class
tasks are here; several findings per image (multi-label) is one more `Task`. The split follows
torchmetrics' Binary/Multiclass/Multilabel AUROC classes and MedMNIST's per-data-set `task`
field (`medmnist/info.py`). A task is plain, frozen data, so it crosses Ray's process
boundaries as it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from distmed import metrics
from distmed.errors import UserError
from distmed.losses import PLAIN_LOSS, LossSpec, SoftmaxLoss


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

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) logits -> (N, K) class probabilities (softmax, in float32)."""
        return torch.softmax(logits.float(), dim=1)

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


# A task as a typed field of a pydantic record (the worker's config): the `kind` says which.
AnyTask = Annotated[BinaryTask | MulticlassTask, Field(discriminator="kind")]


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
        )
    return BinaryTask(names, names.index(positive_class))
