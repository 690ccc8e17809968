"""`python -m distmed.train`: one configuration through k-fold CV with Ray Train.

Stages: config -> data index -> folds -> decoded cache -> Ray -> one fit over all folds
-> a per-fold table and `cv_result.json` (with the resolved config and fold assignment).
`cv.repeats` R > 1 repeats the k-fold split with other seeds: R x k folds, one score.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from distmed import __version__
from distmed.artifacts import write_json_atomic
from distmed.cli import add_common_options, overrides_from_args, run_command
from distmed.cvstats import score_text
from distmed.errors import UserError
from distmed.runlock import hold_results_folder

if TYPE_CHECKING:  # for annotations; imported where used, after parsing
    import numpy as np

    from distmed.config import ExperimentConfig
    from distmed.cv import CVResult
    from distmed.data import DataIndex


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.train",
        description="Cross-validate one configuration (k folds, or cv.repeats x k; Ray "
        "Train); print mean ROC-AUC ± its standard error.",
        epilog="example: python -m distmed.train --config demo --output runs/demo",
    )
    parser.add_argument(
        "--config",
        help="experiment YAML, or a search-space file or shipped name such as demo (its "
        "'base' is used); default: built-ins",
    )
    parser.add_argument("--output", help="result folder (default runs/train-<data>-<time>)")
    parser.add_argument(
        "--address", help="join a running Ray cluster, e.g. auto or ray://host:10001"
    )
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over --output's lock left by a process on another host that has ended",
    )
    add_common_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, _run)  # args.locks: what _run holds


def _run(args: argparse.Namespace) -> int:
    from distmed import _ray_compat, pipeline
    from distmed.config import dump_config, load_config
    from distmed.cv import cross_validate, finding_auc_text, interrupted_fit_text, score_caveat
    from distmed.data.stream import decode_reserve
    from distmed.model import warn_frozen_random_stages
    from distmed.resources import plan_workers
    from distmed.sampling import warn_of_double_balancing
    from distmed.task.multilabel import MultilabelTask

    started = time.perf_counter()
    cfg = load_config(args.config, overrides_from_args(args))
    if args.output:  # two runs into one --output would train into one Ray run: one at a time
        _hold_output(args, Path(args.output))
    warn_frozen_random_stages(cfg.model)
    warn_of_double_balancing([cfg.train.sampler], [cfg.train.class_weights])
    prepared = pipeline.prepare(cfg)
    index, assignment = prepared.data.index, prepared.data.assignment
    output = Path(args.output or _default_output(index)).resolve()
    if not args.output:
        _hold_output(args, output)
    output.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, output / "config.yaml")
    plan = pipeline.connect(prepared.data, args.address, str(output / "ray")).plan
    layout = plan_workers(cfg.scaling, reserve_cpus=decode_reserve(cfg.data))
    print(
        f"distmed {__version__}: {index.name}, {len(index.pool)} images, "
        f"{len(index.class_names)} classes, "
        f"{_cv_text(cfg)}, {layout.num_workers} worker(s) x {layout.cpus_per_worker:g} CPU"
        f"{' + GPU' if layout.use_gpu else ''}",
        flush=True,
    )
    name = run_name(cfg, index)
    # Ray Train's own Ctrl-C handler would end the process silently with status 1.
    with _ray_compat.train_keeps_ctrl_c():
        try:
            result = cross_validate(cfg, plan, layout, output / "ray", name)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(interrupted_fit_text(output / "ray", name)) from None
    wall = time.perf_counter() - started
    data = prepared.data
    warnings = {"thin_validation_folds": data.thin_folds, "test_split_gaps": data.test_gaps}
    write_cv_result(
        output / "cv_result.json",
        cfg,
        index,
        assignment,
        result,
        wall,
        prepared.inspection,
        warnings,
    )
    print(format_fold_table(result))
    print(f"precision: {result.precision} on {result.device}; wall time {wall:.0f} s")
    if result.diverged_folds:
        folds = ", ".join(str(k + 1) for k in result.diverged_folds)
        raise UserError(
            f"training diverged (loss NaN/inf) in fold(s) {folds}, so there is no CV score; "
            f"lower optim.lr or use train.amp=off (history: {output / 'cv_result.json'})"
        )
    print(
        "CV ROC-AUC "
        + score_text(
            result.mean_roc_auc,
            result.se_roc_auc,
            result.std_roc_auc,
            f", {len(result.folds)} folds",
        )
        + f"  -> {output / 'cv_result.json'}"
    )
    if isinstance(plan.task, MultilabelTask):
        print(f"  {finding_auc_text(plan.task, result.mean_metrics())}")
    caveat = score_caveat(result.fold_aucs, prepared.data.thin_folds, result.constant_folds)
    if caveat is not None:
        print(f"  {caveat}")
    return 0


def _hold_output(args: argparse.Namespace, output: Path) -> None:
    lock = hold_results_folder(output, f"--output {output}", args.force_unlock)
    args.locks.enter_context(lock)


def _cv_text(cfg: ExperimentConfig) -> str:
    if cfg.cv.repeats == 1:
        return f"{cfg.cv.folds}-fold CV"
    return f"{cfg.cv.repeats} x {cfg.cv.folds}-fold CV (repeated)"


def run_name(cfg: ExperimentConfig, index: DataIndex) -> str:
    """Ray Train run name from what determines the result (never a timestamp).

    Rerunning the same command into the same `--output` resumes an interrupted run from its
    last checkpoint; any change of config or data starts a new run beside it.
    """
    payload = json.dumps([cfg.model_dump(mode="json"), index.fingerprint], sort_keys=True)
    return "cv-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def _default_output(index: DataIndex) -> Path:
    # The data's name cut short: a source named up to NAME_MAX must not give a longer folder.
    return Path("runs") / f"train-{index.name[:100]}-{datetime.now():%Y%m%d-%H%M%S}"


def format_fold_table(result: CVResult) -> str:
    """Metrics per fold (numbered from 1; `repeat.fold` with repeats) and their means."""
    columns = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
    header = f"{'fold':>5} {'epoch':>5} " + " ".join(f"{c:>17}" for c in columns)
    lines = [header]
    k = len(result.folds) // result.repeats
    for fold in result.folds:
        values = " ".join(f"{fold.metrics[c]:>17.4f}" for c in columns)
        label = str(fold.fold + 1)
        if result.repeats > 1:
            label = f"{fold.fold // k + 1}.{fold.fold % k + 1}"
        lines.append(f"{label:>5} {fold.stop_epoch:>5} {values}")
    means = result.mean_metrics()
    lines.append(f"{'mean':>5} {'':>5} " + " ".join(f"{means[c]:>17.4f}" for c in columns))
    return "\n".join(lines)


def write_cv_result(
    path: Path,
    cfg: ExperimentConfig,
    index: DataIndex,
    assignment: np.ndarray,
    result: CVResult,
    wall_time_s: float,
    inspection: dict | None = None,
    warnings: dict[str, str | None] | None = None,
) -> None:
    """`cv_result.json`: scores, per-fold metrics and histories, config, data, assignment.

    `warnings` (`thin_validation_folds`, `test_split_gaps`: the data warnings said before
    training) are kept under `data`, as in `summary.json`.

    `assignment` is `make_folds`' (R, N): each sample's `fold` is its fold in repeat 0
    (the whole assignment when R = 1); with R > 1 `folds_by_repeat` lists all R.
    """
    import numpy as np

    from distmed.data import describe_index
    from distmed.metrics import METRIC_NAMES

    rows = np.atleast_2d(assignment)
    k = len(result.folds) // result.repeats
    payload = {
        "mean_roc_auc": result.mean_roc_auc,
        "std_roc_auc": result.std_roc_auc,
        "se_roc_auc": result.se_roc_auc,  # cvstats.corrected_standard_error
        "repeats": result.repeats,
        "mean_metrics": result.mean_metrics(),
        "folds": [
            {
                "fold": f.fold,
                "repeat": f.fold // k,
                "stop_epoch": f.stop_epoch,
                **f.metrics,
                "history": f.history,
            }
            for f in result.folds
        ],
        "precision": result.precision,
        "device": result.device,
        "world_size": result.world_size,
        **result.extra,  # channels_last, the worker's peak memory
        "data": describe_index(index, inspection) | (warnings or {}),
        "config": cfg.model_dump(mode="json"),
        "fold_assignment": [
            # a multi-label image's label is its row of raw codes (null: missing)
            {"id": sample_id, "label": label.tolist() if label.ndim else int(label)}
            | {"fold": int(folds[0])}
            | ({"folds_by_repeat": folds.tolist()} if len(folds) > 1 else {})
            for sample_id, label, folds in zip(
                index.pool.ids, index.pool.labels, rows.T, strict=True
            )
        ],
        "wall_time_s": wall_time_s,
        "metric_names": list(METRIC_NAMES),
        "distmed_version": __version__,
    }
    write_json_atomic(path, payload)


if __name__ == "__main__":
    sys.exit(main())
