"""Which task a data set is: `task_for` (binary or multi-class, from its classes),
`multilabel_task` (policies per finding, the findings the CV pool can score), `task_of_index`
(either, from a scanned source and the config), and `AnyTask`, a task as a typed record field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import numpy as np
from pydantic import Field

from distmed.errors import UserError, did_you_mean, shorten
from distmed.task.base import Task
from distmed.task.multilabel import (
    MISSING_POLICIES,
    NEGATIVE,
    POSITIVE,
    UNCERTAIN_POLICIES,
    MultilabelTask,
)
from distmed.task.single import BinaryTask, MulticlassTask

if TYPE_CHECKING:
    from distmed.config import DataConfig
    from distmed.data import DataIndex

log = logging.getLogger(__name__)

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
