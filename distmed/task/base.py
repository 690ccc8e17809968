"""The single-label `Task` contract every kind of target implements, and the `Curve` it draws.

`Task` says what a label is and how predictions are trained, scored and decided: the loss, the
output activation, the folds' stratification key, the metric set and the decision rule. Its
shared defaults are those of one class per image (K logits, softmax, cross-entropy).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from distmed import metrics
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
