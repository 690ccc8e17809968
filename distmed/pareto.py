"""Two objectives: a trial's model size, the Pareto front of the trials, the point refitted.

With `search.objectives: [cv_roc_auc, num_params]` the search trades the fold-averaged
ROC-AUC (higher is better) against the model's parameter count (lower is better; counted
from the trial's config, so exact and free, unlike a latency measured on a shared machine).
Only completed trials are on the front: a stopped trial's score is from fewer epochs.

Which point is refitted (`choose_on_front`): the one-standard-error rule (Breiman et al.,
*Classification and Regression Trees*, 1984; Hastie, Tibshirani & Friedman, *The Elements of
Statistical Learning*, 2nd ed., section 7.10): the smallest model on the front whose CV
ROC-AUC is within one corrected standard error of the front's best; the best itself when
its standard error is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distmed.config import ExperimentConfig
from distmed.results import TrialRow
from distmed.space import apply_params


@dataclass(frozen=True)
class ModelSize:
    """Counts the parameters of a trial's model: `base` (a config as JSON) with the trial's
    sampled values, `num_classes` outputs. Picklable (Tune saves the searcher with it)."""

    base: dict[str, Any]
    num_classes: int

    def __call__(self, params: dict[str, Any]) -> int:
        from distmed.model import build_model

        cfg = apply_params(ExperimentConfig.model_validate(self.base), params)
        # The count does not depend on the weights: none are loaded (no download).
        model_cfg = cfg.model.model_copy(update={"weights": "none"})
        return sum(p.numel() for p in build_model(model_cfg, self.num_classes).parameters())


@dataclass(frozen=True)
class FrontPoint:
    trial_id: str
    cv_roc_auc: float
    cv_roc_auc_se: float
    num_params: int


def pareto_front(rows: Sequence[TrialRow], sizes: dict[str, int]) -> list[FrontPoint]:
    """The completed trials no other completed trial dominates (at least as good on both
    objectives and better on one), by descending CV ROC-AUC. `sizes`: trial id -> count."""
    points = [
        FrontPoint(r.trial_id, r.cv_roc_auc, r.cv_roc_auc_se, sizes[r.trial_id])
        for r in rows
        if r.status == "completed" and math.isfinite(r.cv_roc_auc) and r.trial_id in sizes
    ]
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (-p.cv_roc_auc, p.num_params, p.trial_id))


def dominates(a: FrontPoint, b: FrontPoint) -> bool:
    """Whether `a` is at least as good as `b` on both objectives and better on one."""
    no_worse = a.cv_roc_auc >= b.cv_roc_auc and a.num_params <= b.num_params
    return no_worse and (a.cv_roc_auc > b.cv_roc_auc or a.num_params < b.num_params)


def choose_on_front(front: Sequence[FrontPoint]) -> FrontPoint | None:
    """The refitted point: the smallest model within one SE of the front's best CV ROC-AUC
    (the one-standard-error rule, module docstring); None for an empty front."""
    if not front:
        return None
    best = max(front, key=lambda p: p.cv_roc_auc)
    if not math.isfinite(best.cv_roc_auc_se):
        return best
    near = [p for p in front if p.cv_roc_auc >= best.cv_roc_auc - best.cv_roc_auc_se]
    return min(near, key=lambda p: (p.num_params, -p.cv_roc_auc))


RULE = (
    "the smallest model on the front whose CV ROC-AUC is within one standard error of the "
    "front's best (the one-standard-error rule; the CV standard error corrected for "
    "overlapping training folds, Nadeau & Bengio 2003)"
)
