"""Search results: one row per trial, the best trial, and the files written from them.

`trials.csv` (config, CV ROC-AUC mean/std/standard error, per-fold AUCs, status, time),
`best_config.yaml` (a complete experiment config for `distmed.train --config`);
`summary.json` is `summary.RunSummary`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distmed.artifacts import read_text_uri, write_csv_atomic, write_json_uri
from distmed.config import ExperimentConfig, dump_config
from distmed.cvstats import separable
from distmed.failures import describe
from distmed.space import apply_params

# "stopped": the scheduler (ASHA) stopped it; "interrupted": a Ctrl-C ended the search while
# it was pending or training (`--resume` continues it).
STATUSES = ("completed", "stopped", "diverged", "errored", "interrupted")
# Per-fold epoch histories and out-of-fold predictions of one trial, in its Train run folder.
TRIAL_DETAIL = "cv_detail.json"


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str  # one of STATUSES
    cv_roc_auc: float
    cv_roc_auc_std: float
    fold_aucs: list[float]
    fold_epochs: list[int]
    epochs_reported: int
    time_s: float
    # The mean's corrected standard error (`cvstats.corrected_standard_error`): after the
    # required fields so that rows built by position stay valid.
    cv_roc_auc_se: float = math.nan
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# Tune names a trial's folder <trainable>_<trial id>_<n>_<params>_<date>: the ids are random
# hex, n counts the trials from 1 in creation order (a resumed search keeps its folders).
_TRIAL_FOLDER = re.compile(r"_([0-9a-f]{8})_(\d+)_")


def _trial_identity(result) -> tuple[str, float]:
    """(trial id, creation position) from the trial's metrics and folder name."""
    name = Path(result.path).name
    match = _TRIAL_FOLDER.search(name)
    trial_id = (result.metrics or {}).get("trial_id") or (match[1] if match else name)
    return str(trial_id), int(match[2]) if match else math.inf


def collect_rows(
    result_grid, space_keys: list[str], ended: set[str] | None = None
) -> list[TrialRow]:
    """One `TrialRow` per Tune trial, in trial-creation order.

    `ended`: after a Ctrl-C, the ids of the trials that had ended before it; every other
    trial is `interrupted` unless it had already completed, diverged or errored.
    """
    rows, positions = [], {}
    for result in result_grid:
        if result.config is None and not result.metrics and result.error is None:
            # Created but never started (a Ctrl-C between two trials): no parameters, no
            # result, nothing to list; `--resume` runs it.
            continue
        trial_id, positions[trial_id] = _trial_identity(result)
        metrics = result.metrics or {}
        folds = sorted(
            int(k[len("fold") : -len("_roc_auc")])
            for k in metrics
            if k.startswith("fold") and k.endswith("_roc_auc")
        )
        error = describe(result.error) if result.error is not None else ""
        if result.error is not None:
            status = "errored"
        elif metrics.get("folds_diverged"):
            status = "diverged"
            error = (
                f"loss became NaN/inf by epoch {metrics.get('epoch')} in "
                f"{metrics['folds_diverged']} fold(s); lower optim.lr or use train.amp=off"
            )
        elif metrics.get("cv_complete"):
            status = "completed"
        elif ended is not None and trial_id not in ended:
            status = "interrupted"
        else:
            status = "stopped"
        rows.append(
            TrialRow(
                trial_id=trial_id,
                params={k: (result.config or {}).get(k) for k in space_keys},
                status=status,
                cv_roc_auc=float(metrics.get("cv_roc_auc", math.nan)),
                cv_roc_auc_std=float(metrics.get("cv_roc_auc_std", math.nan)),
                cv_roc_auc_se=float(metrics.get("cv_roc_auc_se", math.nan)),
                fold_aucs=[float(metrics[f"fold{k}_roc_auc"]) for k in folds],
                fold_epochs=[int(metrics[f"fold{k}_epoch"]) for k in folds],
                # The worker's own epoch count: Tune's training_iteration restarts when a
                # killed search is resumed, so it would undercount a resumed trial.
                epochs_reported=int(metrics.get("epoch", metrics.get("training_iteration", 0))),
                time_s=float(metrics.get("time_total_s", math.nan)),
                error=error,
            )
        )
    return sorted(rows, key=lambda r: (positions[r.trial_id], r.trial_id))


def completed_score(metrics: dict[str, Any] | None) -> float | None:
    """The CV ROC-AUC of a last report that ended its CV cleanly (a trial `best_row` can
    pick), else None. Errors are not in the metrics: the caller knows them."""
    metrics = metrics or {}
    if not metrics.get("cv_complete") or metrics.get("folds_diverged"):
        return None
    score = float(metrics.get("cv_roc_auc", math.nan))
    return score if math.isfinite(score) else None


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The completed trial with the highest mean CV ROC-AUC (stopped trials never win)."""
    finished = [r for r in rows if r.status == "completed" and math.isfinite(r.cv_roc_auc)]
    return max(finished, key=lambda r: r.cv_roc_auc, default=None)


def runner_up_row(rows: list[TrialRow], best: TrialRow) -> TrialRow | None:
    """The best completed trial other than `best` (None when it is the only one)."""
    return best_row([r for r in rows if r.trial_id != best.trial_id])


def best_is_separable(best: TrialRow, runner_up: TrialRow | None) -> bool | None:
    """Whether the best trial's 95% interval (mean ± 1.96 SE) clears the runner-up's.

    None without a runner-up or without finite scores and standard errors.
    """
    if runner_up is None:
        return None
    return separable(
        (best.cv_roc_auc, best.cv_roc_auc_se), (runner_up.cv_roc_auc, runner_up.cv_roc_auc_se)
    )


def write_trials_csv(path: Path, rows: list[TrialRow], space_keys: list[str]) -> None:
    num_folds = max((len(r.fold_aucs) for r in rows), default=0)
    header = ["trial_id", *space_keys, "cv_roc_auc", "cv_roc_auc_std", "cv_roc_auc_se"]
    header += [f"fold{k}_roc_auc" for k in range(num_folds)]
    header += ["status", "epochs", "time_s", "error"]
    lines = []
    for r in rows:
        folds = r.fold_aucs + [math.nan] * (num_folds - len(r.fold_aucs))
        lines.append(
            [r.trial_id, *(r.params[k] for k in space_keys)]
            + [r.cv_roc_auc, r.cv_roc_auc_std, r.cv_roc_auc_se]
            + folds
            + [r.status, r.epochs_reported, round(r.time_s, 1), r.error]
        )
    write_csv_atomic(path, header, lines)


def best_config(base: ExperimentConfig, row: TrialRow) -> ExperimentConfig:
    """The base config with the trial's parameters, its data paths made absolute so that
    `best_config.yaml` works from any folder."""
    return resolve_data_paths(apply_params(base, row.params))


def resolve_data_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """`data.root` and `data.group_csv` as absolute paths where they name existing files or
    folders; a source such as `demo` or `medmnist:NAME` stays as it is."""
    updates = {}
    for key in ("root", "group_csv"):
        value = getattr(cfg.data, key)
        if value and Path(value).expanduser().exists():
            updates[key] = str(Path(value).expanduser().resolve())
    if not updates:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=updates)})


def write_best_config(path: Path, cfg: ExperimentConfig) -> None:
    dump_config(cfg, path)


def status_counts(rows: list[TrialRow]) -> dict[str, int]:
    return {status: sum(r.status == status for r in rows) for status in STATUSES}


def format_table(rows: list[TrialRow], space_keys: list[str], limit: int = 10) -> str:
    """The best `limit` trials, best first, as a fixed-width text table.

    Each score is the mean CV ROC-AUC ± its corrected standard error (not the fold std).
    """
    ranked = sorted(rows, key=lambda r: (r.status != "completed", -_sortable(r.cv_roc_auc)))
    keys = [k.split(".")[-1] for k in space_keys]
    score = "CV ROC-AUC ± SE"
    header = f"{'trial':<14} {'status':<9} {score:>16} " + " ".join(f"{k:>12}" for k in keys)
    lines = [header]
    for r in ranked[:limit]:
        values = " ".join(f"{_short(r.params[k]):>12}" for k in space_keys)
        auc = f"{r.cv_roc_auc:.4f} ± {r.cv_roc_auc_se:.4f}"
        lines.append(f"{r.trial_id[-14:]:<14} {r.status:<9} {auc:>16} {values}")
    return "\n".join(lines)


def _sortable(value: float) -> float:
    return value if math.isfinite(value) else -1.0


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def write_trial_detail(run_uri: str, folds: list[dict[str, Any]]) -> None:
    """Save a trial's per-fold histories and out-of-fold predictions next to its Train run.

    `folds`: per fold, `history` (one record per epoch) and `val_indices`, `val_labels`,
    `val_probs` (the latest validation pass). With `cv.repeats` R > 1 there are R x k folds
    (repeat-major) and each pool index is in R folds' `val_indices`, once per repeat.
    Tune keeps only the last reported metrics; the report needs every epoch of every fold
    and the validation scores that pick the operating threshold.
    """
    payload = {"folds": [{"fold": k, **fold} for k, fold in enumerate(folds)]}
    write_json_uri(f"{run_uri}/{TRIAL_DETAIL}", payload)


def read_trial_detail(run_uri: str) -> dict[str, Any] | None:
    """What `write_trial_detail` saved, or None when the trial has no such file.

    Undefined numbers are `null` in the file (strict JSON); they come back as NaN here, as
    the training loop produced them.
    """
    text = read_text_uri(f"{run_uri}/{TRIAL_DETAIL}")
    if text is None:
        return None
    detail = json.loads(text)
    for fold in detail.get("folds", []):
        fold["history"] = [
            {key: math.nan if value is None else value for key, value in record.items()}
            for record in fold.get("history", [])
        ]
        if fold.get("val_probs"):
            fold["val_probs"] = np.asarray(fold["val_probs"], dtype=np.float64).tolist()
    return detail


def oof_predictions(detail: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A trial's out-of-fold validation (labels (N,), probabilities (N, K)), folds pooled;
    a multi-label task's are targets (N, L) (float, NaN ignored) and probabilities (N, L).

    None when the trial saved no detail or a fold has no predictions. With `cv.repeats`
    R > 1 every image is here R times, once per repeat (scored by a different fold model
    each time). Fine for choosing a threshold or fitting a temperature: each image weighs
    the same, and its R scores spread it the way fold models differ.
    """
    if not detail or not all(f.get("val_labels") for f in detail["folds"]):
        return None
    labels = np.concatenate([_label_array(f["val_labels"]) for f in detail["folds"]])
    probs = np.concatenate([np.asarray(f["val_probs"]) for f in detail["folds"]])
    return labels, probs


def _label_array(values: list) -> np.ndarray:
    """Saved labels as an array: class indices (N,), or rows of targets (N, L) whose ignored
    entries JSON wrote as null (read back as NaN)."""
    if values and isinstance(values[0], list):
        return np.asarray(values, dtype=np.float64)
    return np.asarray(values)
