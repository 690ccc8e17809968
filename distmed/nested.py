"""`distmed.tune --nested K`: nested cross-validation of the whole search procedure.

The CV pool is split into K outer folds (stratified, patient-grouped like every fold). For
each outer fold an ordinary search (the same space, sampler, scheduler and inner k-fold CV)
runs on the outer training part only; its best configuration is refit there and scored
once on the outer validation part. The mean outer score estimates how well "search, then
refit" does on new data, the search's own selection included, which the best trial's CV
score overstates (Varma & Simon 2006, BMC Bioinformatics 7:91; Cawley & Talbot 2010, JMLR
11:2079). The test split is not used. A finished outer fold is recorded in `nested.json`
and skipped by `--resume`; an unfinished one continues its own search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from distmed import pipeline
from distmed.artifacts import delete_checkpoints, write_json_atomic
from distmed.cv import FoldPlan, PreparedData, fold_specs, make_folds
from distmed.data import Split
from distmed.errors import EXIT_INTERRUPTED, UserError
from distmed.inference import InferenceModel, build_network, evaluate_test
from distmed.metrics import METRIC_NAMES
from distmed.refit import refit_epochs
from distmed.results import TrialRow, best_config, write_best_config
from distmed.search import can_restore, trial_run_name
from distmed.space import SearchSpaceFile
from distmed.summary import Score

NESTED_FILE = "nested.json"


class OuterFold(BaseModel):
    """One outer fold's result: what its inner search chose and how that scored outside."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fold: int = Field(ge=0)
    num_train: int = Field(ge=1, description="outer training images (the inner search's pool)")
    num_val: int = Field(ge=1, description="outer validation images (scored once)")
    best_trial: str
    inner_cv_roc_auc: Score = Field(description="the chosen trial's inner CV ROC-AUC")
    params: dict[str, Any]
    refit_epochs: int = Field(ge=1)
    outer_metrics: dict[str, Score]  # NaN (null in nested.json) where undefined


class NestedSummary(BaseModel):
    """`nested.json`: every finished outer fold and, once all are, their mean."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    outer_folds: int = Field(ge=2)
    inner_folds: int = Field(ge=2)
    trials_per_search: int = Field(ge=1)
    folds: list[OuterFold] = Field(default_factory=list)
    mean_outer_roc_auc: float | None = None
    std_outer_roc_auc: float | None = None
    mean_inner_cv_roc_auc: float | None = None
    outer_metrics_mean: dict[str, Score] | None = None
    wall_time_s: float | None = None

    def finished(self, fold: int) -> OuterFold | None:
        return next((f for f in self.folds if f.fold == fold), None)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))


@dataclass(frozen=True)
class NestedRun:
    """What a nested search needs: the space, the data, where it runs, the outer folds."""

    spec: SearchSpaceFile
    prepared: PreparedData  # the whole CV pool, connected to Ray (`pipeline.connect`)
    ctx: pipeline.RunContext  # the experiment; each outer fold searches in a child of it
    outer: np.ndarray  # outer fold (0..K-1) of every pool image: `outer_assignment`
    outer_folds: int  # K (`--nested K`)


def run_nested(run: NestedRun) -> int:
    """All outer folds in turn; writes `nested.json` after each. Returns the exit status."""
    started = time.perf_counter()
    outer_k, ctx = run.outer_folds, run.ctx
    spec, prepared = run.spec, run.prepared
    plan = prepared.plan
    outer = run.outer
    path = ctx.local / NESTED_FILE
    summary = _load_or_start(path, run, outer_k)
    for k in range(outer_k):
        if summary.finished(k) is not None:
            print(f"outer fold {k + 1}/{outer_k}: done before, skipped", flush=True)
            continue
        train_idx, val_idx = np.flatnonzero(outer != k), np.flatnonzero(outer == k)
        inner = replace(prepared, plan=inner_plan(plan, train_idx, prepared, spec))
        print(
            f"outer fold {k + 1}/{outer_k}: searching on {len(train_idx)} images, "
            f"scoring on {len(val_idx)}",
            flush=True,
        )
        fold_name = f"outer-{k}"
        fold = ctx.child(fold_name, resume=can_restore(f"{ctx.experiment_uri}/{fold_name}"))
        fold.local.mkdir(parents=True, exist_ok=True)
        outcome = pipeline.run_search(spec, inner, fold)
        if outcome.interrupted:
            summary.model_copy(update={"wall_time_s": time.perf_counter() - started}).save(path)
            pipeline.publish(ctx)
            print(f"nested search interrupted; continue it with: {ctx.resume_command}")
            return EXIT_INTERRUPTED
        best = _best(outcome.best, k)
        result = score_outer_fold(run, inner.plan, outcome.rows, best, k, val_idx, fold)
        write_best_config(fold.local / "best_config.yaml", best_config(spec.base, best))
        summary = summary.model_copy(update={"folds": [*summary.folds, result]})
        summary.save(path)
        pipeline.publish(ctx)
        print(
            f"outer fold {k + 1}/{outer_k}: inner CV ROC-AUC {result.inner_cv_roc_auc:.4f}, "
            f"outer ROC-AUC {result.outer_metrics['roc_auc']:.4f}",
            flush=True,
        )
    summary = finish(summary, time.perf_counter() - started)
    summary.save(path)
    pipeline.publish(ctx)
    print(format_nested(summary, path))
    return 0


def outer_assignment(prepared: PreparedData, outer_k: int, spec: SearchSpaceFile) -> np.ndarray:
    """Outer fold (0..K-1) of every pool image: stratified and grouped like the inner folds."""
    cv = spec.base.cv.model_copy(update={"folds": outer_k, "repeats": 1})  # one outer split
    try:
        return make_folds(prepared.index.pool, cv, prepared.plan.task)[0]
    except UserError as exc:  # its text speaks of cv.folds; here the K is --nested's
        text = str(exc).replace("cv.folds=", "--nested ").replace("cv.folds", "--nested")
        raise UserError(f"--nested {outer_k} (outer folds): {text}") from exc


def inner_plan(
    plan: FoldPlan, train_idx: np.ndarray, prepared: PreparedData, spec: SearchSpaceFile
) -> FoldPlan:
    """The inner k-fold plan over the outer training part, in pool positions.

    The images and labels stay the whole pool's (one decoded cache); only the fold index
    lists change, and none of them holds an outer validation image.
    """
    pool = prepared.index.pool
    part = Split(
        ids=[pool.ids[i] for i in train_idx],
        labels=pool.labels[train_idx],
        groups=None if pool.groups is None else pool.groups[train_idx],
    )
    assignment = make_folds(part, spec.base.cv, prepared.plan.task)
    specs = fold_specs(assignment, spec.base.cv.folds)
    return replace(
        plan,
        folds=[
            {"train": train_idx[s["train"]].tolist(), "val": train_idx[s["val"]].tolist()}
            for s in specs
        ],
    )


def score_outer_fold(
    run: NestedRun,
    inner: FoldPlan,
    rows: list[TrialRow],
    best: TrialRow,
    k: int,
    val_idx: np.ndarray,
    fold: pipeline.RunContext,
) -> OuterFold:
    """Refit the inner search's best configuration on the outer training part; score it
    once on the outer validation part."""
    chosen = best_config(run.spec.base, best)
    epochs = refit_epochs(best.fold_epochs)
    run_name = f"refit-{best.trial_id}"
    print(f"outer fold {k + 1}: refitting trial {best.trial_id} for {epochs} epochs", flush=True)
    uri = fold.experiment_uri
    state = pipeline.refit_chosen(chosen, inner, epochs, uri, run_name, f"outer fold {k}'s refit")
    delete_checkpoints(f"{uri}/refit/{run_name}")
    for row in rows:
        delete_checkpoints(f"{uri}/trials/{trial_run_name(row.trial_id)}")
    network = build_network(chosen.model, inner.task.num_outputs, state)
    labels = np.asarray(inner.labels)
    metrics = evaluate_test(
        InferenceModel([network], tta=chosen.data.augment).eval(),
        inner.stream or Path(inner.images_path),  # the pool's stream, or its cache file
        labels,
        inner.task,
        indices=val_idx,
    )
    return OuterFold(
        fold=k,
        num_train=len(labels) - len(val_idx),
        num_val=len(val_idx),
        best_trial=best.trial_id,
        inner_cv_roc_auc=best.cv_roc_auc,
        params=best.params,
        refit_epochs=epochs,
        outer_metrics={key: float(value) for key, value in metrics.items()},
    )


def finish(summary: NestedSummary, wall_s: float) -> NestedSummary:
    """The summary with the outer folds' means (the nested estimate) filled in."""
    outer = [f.outer_metrics["roc_auc"] for f in summary.folds]
    return summary.model_copy(
        update={
            "mean_outer_roc_auc": float(np.mean(outer)),
            "std_outer_roc_auc": float(np.std(outer)),
            "mean_inner_cv_roc_auc": float(np.mean([f.inner_cv_roc_auc for f in summary.folds])),
            "outer_metrics_mean": {
                name: float(np.mean([f.outer_metrics[name] for f in summary.folds]))
                for name in METRIC_NAMES
            },
            "wall_time_s": (summary.wall_time_s or 0) + wall_s,
        }
    )


def format_nested(summary: NestedSummary, path: Path) -> str:
    lines = ["outer fold  best trial  inner CV ROC-AUC  outer ROC-AUC  outer accuracy"]
    for f in summary.folds:
        lines.append(
            f"{f.fold + 1:>10}  {f.best_trial:>10}  {f.inner_cv_roc_auc:>16.4f}  "
            f"{f.outer_metrics['roc_auc']:>13.4f}  {f.outer_metrics['accuracy']:>14.4f}"
        )
    inner, outer = summary.mean_inner_cv_roc_auc or 0.0, summary.mean_outer_roc_auc or 0.0
    gap = (
        "above the outer score: the optimism of picking the best trial on its own score"
        if inner > outer
        else "not above the outer score: here the refit's extra training data outweighed "
        "the optimism of picking the best trial"
    )
    lines.append(
        f"nested CV estimate (mean of {summary.outer_folds} outer folds): ROC-AUC "
        f"{outer:.4f} ± {summary.std_outer_roc_auc:.4f} (std over outer folds); the inner "
        f"searches' best CV ROC-AUC averaged {inner:.4f}, {gap}"
    )
    lines.append(
        f"results: {path}  ({summary.wall_time_s or 0:.0f} s). For the model itself, run the "
        "same search without --nested."
    )
    return "\n".join(lines)


def _best(best: TrialRow | None, k: int) -> TrialRow:
    if best is None:
        raise UserError(f"outer fold {k}: no trial of its inner search completed; nothing to refit")
    return best


def _load_or_start(path: Path, run: NestedRun, outer_k: int) -> NestedSummary:
    fresh = NestedSummary(
        name=run.ctx.name,
        outer_folds=outer_k,
        inner_folds=run.spec.base.cv.folds,
        trials_per_search=run.spec.search.num_samples,
    )
    if not path.is_file():
        return fresh
    if not run.ctx.resume:
        raise UserError(
            f"{path} exists: pass --resume to continue that nested search, or a new --name"
        )
    old = NestedSummary.model_validate_json(path.read_text())
    if (old.outer_folds, old.inner_folds) != (outer_k, fresh.inner_folds):
        raise UserError(
            f"{path} was a --nested {old.outer_folds} run with {old.inner_folds} inner folds; "
            f"resume it with the same --nested and cv.folds, or use a new --name"
        )
    return old
