"""Why this configuration: how much each searched parameter mattered to the CV ROC-AUC.

Optuna's fANOVA evaluator (Hutter, Hoos & Leyton-Brown, "An Efficient Approach for Assessing
Hyperparameter Importance", ICML 2014) fits a random forest to the completed trials'
parameters -> CV ROC-AUC and splits the variance of its predictions by parameter; the
importances sum to 1. It describes these trials over this space, not the task in general,
and with few trials the forest is a guess: below `MIN_TRIALS` completed trials none is given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import optuna

from distmed.results import TrialRow
from distmed.space import Distribution, optuna_distributions

# fANOVA's forest needs enough trials to split on every parameter; with fewer than this the
# ranking changes with the forest's seed (ten trials per five-parameter space is thin already).
MIN_TRIALS = 8


def param_importances(
    rows: Sequence[TrialRow], space: dict[str, Distribution], seed: int = 0
) -> dict[str, Any]:
    """`{"method", "num_trials", "importances": {key: share}}` over the completed trials,
    largest first, shares summing to 1; `importances` is empty, with `reason`, when fewer
    than MIN_TRIALS completed or no parameter varied."""
    completed = [r for r in rows if r.status == "completed" and math.isfinite(r.cv_roc_auc)]
    out: dict[str, Any] = {"method": "fANOVA (optuna)", "num_trials": len(completed)}
    if len(completed) < MIN_TRIALS:
        reason = f"only {len(completed)} completed trial(s); at least {MIN_TRIALS} are needed"
        return {**out, "importances": {}, "reason": reason}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            found = optuna.importance.get_param_importances(
                study_from_rows(completed, space),
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
            )
        except (RuntimeError, ValueError) as exc:  # e.g. every trial drew the same values
            # The summary is written whatever happens here: the reason instead of a result.
            return {**out, "importances": {}, "reason": str(exc).splitlines()[0]}
    return {**out, "importances": {k: float(v) for k, v in found.items()}}


def study_from_rows(rows: Sequence[TrialRow], space: dict[str, Distribution]) -> optuna.Study:
    """An in-memory Optuna study (maximize) holding `rows` as completed trials; parameters
    outside `space`'s distributions are left out of their trial."""
    distributions = optuna_distributions(space)
    study = optuna.create_study(direction="maximize")
    for row in rows:
        params = {k: v for k, v in row.params.items() if k in distributions}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                value=row.cv_roc_auc,
            )
        )
    return study


def importance_text(record: dict[str, Any] | None) -> str:
    """One sentence for the report and the console."""
    if not record:
        return ""
    if not record.get("importances"):
        return f"Parameter importance not computed: {record.get('reason', 'no result')}."
    ranked = ", ".join(f"{k} {v:.0%}" for k, v in record["importances"].items())
    return (
        f"Parameter importance ({record['method']}, on {record['num_trials']} completed "
        f"trials; shares of the CV ROC-AUC's variance across them): {ranked}. It describes "
        "these trials over this space, not the task in general."
    )
