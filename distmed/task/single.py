"""Single-label tasks: two classes (`BinaryTask`, scored and thresholded on one class) and
K > 2 exclusive classes (`MulticlassTask`, macro one-vs-rest, argmax decisions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from distmed import metrics
from distmed.task.base import Curve, Task


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
