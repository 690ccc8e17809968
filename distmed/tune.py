"""`python -m distmed.tune --space FILE`: the hyperparameter search over CV ROC-AUC.

Stages: space file (+ CLI overrides) -> data index, folds and decoded cache (once, shared by
every trial) -> Ray -> Tune + Optuna TPE (+ ASHA) -> trials.csv, best_config.yaml -> the best
config refit on all training data -> best_model.pt, the test split evaluated once ->
summary.json and a results table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from distmed import __version__
from distmed.artifacts import delete_checkpoints, upload_dir
from distmed.calibration import TemperatureFit, fit_temperature
from distmed.cli import (
    add_common_options,
    inspect_data,
    overrides_from_args,
    parse,
    run_entry_point,
)
from distmed.config import CVConfig
from distmed.cv import PreparedData, prepare_data, share_images, storage_uri
from distmed.data import DataIndex, describe_index, scan_source
from distmed.errors import UserError
from distmed.inference import Ensemble, load_inference_model
from distmed.model import check_weights, warn_frozen_random_stages
from distmed.nested import NestedRun, outer_assignment, run_nested
from distmed.refit import (
    TEST_PREDICTIONS,
    TEST_PREDICTIONS_FOLDS,
    evaluate_test,
    final_fold_states,
    refit,
    refit_epochs,
    save_model,
    saved_source,
    show_line,
)
from distmed.report import report_after_search
from distmed.resources import (
    concurrency_limit,
    keep_secrets_out_of_ray,
    plan_workers,
    start_ray,
    wait_for_free_resources,
)
from distmed.results import (
    best_config,
    best_is_separable,
    best_row,
    collect_rows,
    format_table,
    oof_predictions,
    read_trial_detail,
    runner_up_row,
    status_counts,
    write_best_config,
    write_trials_csv,
)
from distmed.runlock import hold_results_folder
from distmed.savedmodel import FoldModels, SavedModel
from distmed.search import (
    EndedTrials,
    StopOnCtrlC,
    TrialContext,
    build_tuner,
    experiment_path,
    hidden_status_lines,
    restore_tuner,
    trial_run_name,
)
from distmed.searchfile import (
    check_new_search,
    check_same_images,
    check_same_search,
    record_search,
)
from distmed.space import SearchSpaceFile, load_space
from distmed.summary import DataSummary, RunSummary
from distmed.tracking import (
    log_search_to_mlflow,
    mlflow_callbacks,
    tensorboard_callbacks,
    tensorboard_command,
    wandb_callbacks,
)
from distmed.tunestate import check_state

# Exit status of a search stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130

EXAMPLES = """examples:
  python -m distmed.tune --space search_spaces/demo.yaml
  python -m distmed.tune --space search_spaces/resnet.yaml \\
      --data ../shared/data/pneumoniamnist.npz --cpu --num-samples 1
  python -m distmed.tune --space search_spaces/resnet.yaml --data /data/xray --address auto \\
      --storage s3://bucket/distmed --workers 2 --wandb-project xray
  python -m distmed.tune --space search_spaces/demo.yaml --name demo-1 --resume
  python -m distmed.tune --space search_spaces/demo.yaml --mlflow-uri http://127.0.0.1:5000
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.tune",
        description="Search hyperparameters with Ray Tune + Optuna TPE; every trial is a "
        "k-fold cross-validated Ray Train run scored on mean CV ROC-AUC.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--space", required=True, help="search-space YAML, e.g. search_spaces/resnet.yaml"
    )
    parser.add_argument(
        "--num-samples", type=int, help="number of trials, e.g. 20 (search.num_samples)"
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPUs per Train worker, e.g. 0.5 packs 2 trials per GPU",
    )
    parser.add_argument(
        "--max-concurrent", type=int, help="at most this many trials at once, e.g. 4"
    )
    parser.add_argument(
        "--name", help="experiment name (default: <space>-<time>); reuse with --resume"
    )
    parser.add_argument(
        "--storage",
        default="runs",
        help="results root: a folder or a URI such as s3://bucket/path (default runs)",
    )
    parser.add_argument(
        "--address", help="join a running Ray cluster, e.g. auto or ray://head:10001"
    )
    parser.add_argument("--wandb-project", help="log one W&B run per trial to this project")
    parser.add_argument(
        "--mlflow-uri",
        help="log one MLflow run per trial, and the best model and report, to this tracking "
        "server, e.g. http://mlflow.lab:5000 (token: MLFLOW_TRACKING_TOKEN)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the experiment --name in --storage"
    )
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over --name's lock left by a process on another host that has ended",
    )
    parser.add_argument(
        "--nested",
        type=int,
        metavar="K",
        help="nested cross-validation: K outer folds, each with its own search on the rest; "
        "the mean outer score estimates the whole procedure (K x the cost; no model kept)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved base config and space, then exit"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs and Tune's full status"
    )
    add_common_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for the --resume hint
    with contextlib.ExitStack() as args.locks:  # [trust] what _run holds, released here
        return run_entry_point(_run, args)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    spec = _load_spec(args)
    _warn_frozen_random_stages(spec)
    if args.dry_run:
        print(_describe(spec))
        return 0
    if args.resume and not args.name:
        raise UserError("--resume needs --name: the experiment to continue (a folder in --storage)")
    if args.nested is not None and not 2 <= args.nested <= 20:
        raise UserError(f"--nested {args.nested}: use 2 to 20 outer folds, e.g. --nested 3")
    name = args.name or f"{Path(args.space).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    # [trust] one process per results folder (distmed.runlock), held until main returns
    args.locks.enter_context(
        hold_results_folder(
            _local_results_dir(args.storage, name, create=False),
            f"--name {name}",
            args.force_unlock,
        )
    )
    exp_uri = experiment_path(storage_uri(args.storage), name)
    record = None  # what the search to resume was started with
    if args.resume:
        record = check_same_search(exp_uri, spec, args.nested)
        if not args.nested:  # [trust] before any work; restore_tuner checks each again
            check_state(exp_uri)
    else:
        check_new_search(exp_uri)
    prepared, inspection = _prepare_data(spec)
    if args.resume:
        check_same_images(exp_uri, record, prepared.index)
    # An impossible K is refused before Ray starts or the name is taken.
    outer = outer_assignment(prepared, args.nested, spec) if args.nested else None
    # Tune snapshots the search state every 10+ s by default; every 5 s bounds what a
    # killed driver loses (trials that ended since the last snapshot run again).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    start_ray(args.address, worker_logs=args.verbose)
    if args.address:  # workers may run on nodes without this node's decoded-image cache
        prepared = replace(prepared, plan=share_images(prepared.plan))
    resume = resume_command(args.argv, name)
    local = _local_results_dir(args.storage, name)
    if not args.resume:
        record_search(exp_uri, spec, prepared.index, args.nested)
    if outer is not None:  # --nested K
        return run_nested(
            NestedRun(args, spec, prepared, name, storage_uri(args.storage), local, resume, outer),
            search=_search,
            publish=lambda: _publish(local, args.storage, name),
        )
    with StopOnCtrlC(on_exit=f"continue the search with: {resume}") as ctrl_c:
        grid = _search(args, spec, prepared, name, storage_uri(args.storage), args.resume, local)
    keys = list(spec.space)
    rows = collect_rows(grid, keys, ended=EndedTrials.ended if ctrl_c.interrupted else None)
    write_trials_csv(local / "trials.csv", rows, keys)
    summary = _summary_head(name, spec, prepared.index, rows, inspection)
    if ctrl_c.interrupted:  # no refit: the search has not finished
        wall = time.perf_counter() - started
        summary = summary.model_copy(update={"interrupted": True, "wall_time_s": wall})
        summary.save(local / "summary.json")
        _publish(local, args.storage, name)
        counts = summary.trials_by_status
        print(
            f"search interrupted: {counts['completed']} trial(s) completed, "
            f"{counts['interrupted']} interrupted (results so far: {local})\n"
            f"continue it with: {resume}",
            flush=True,
        )
        return EXIT_INTERRUPTED
    best = best_row(rows)
    if best is None:
        summary = summary.model_copy(update={"wall_time_s": time.perf_counter() - started})
        summary.save(local / "summary.json")
        _publish(local, args.storage, name)
        raise UserError(f"no trial completed (see {local / 'trials.csv'}); nothing to refit")
    chosen = best_config(spec.base, best)
    runner_up = runner_up_row(rows, best)
    write_best_config(local / "best_config.yaml", chosen)
    summary = summary.model_copy(
        update={
            "best_trial": best.trial_id,
            "best_cv_roc_auc": best.cv_roc_auc,
            "best_cv_roc_auc_std": best.cv_roc_auc_std,
            "best_cv_roc_auc_se": best.cv_roc_auc_se,
            "runner_up_trial": runner_up.trial_id if runner_up else None,
            "best_separable_from_runner_up": best_is_separable(best, runner_up),
            "best_fold_roc_auc": list(best.fold_aucs),
            "best_config": chosen,
        }
    )
    summary.save(local / "summary.json")  # the search result is safe before the refit
    update = _refit_and_test(args, chosen, best, prepared, exp_uri, local)
    for row in rows:  # the best trial's fold models are in best_model.pt now; ties kept theirs
        delete_checkpoints(f"{exp_uri}/trials/{trial_run_name(row.trial_id)}")
    update["wall_time_s"] = time.perf_counter() - started
    summary = summary.model_copy(update=update)
    summary.save(local / "summary.json")
    report = report_after_search(local, exp_uri)
    _publish(local, args.storage, name)
    mlflow_run = log_search_to_mlflow(
        spec.base.tracking.mlflow,
        name,
        local,
        {
            "best_trial": best.trial_id,
            "best_params": best.params,
            "best_cv_roc_auc": best.cv_roc_auc,
            "test_metrics": summary.test_metrics,
        },
    )
    _print_results(rows, keys, best, summary, local, report)
    print(f"TensorBoard (every trial's curves): {tensorboard_command(exp_uri)}")
    if mlflow_run is not None:
        uri = spec.base.tracking.mlflow.uri
        print(f"MLflow: best model and report in run {mlflow_run} at {uri}")
    return 0


def _prepare_data(spec: SearchSpaceFile) -> tuple[PreparedData, dict[str, Any]]:
    """Index, data summary, folds and decoded cache, once for every trial; input errors
    (duplicates too, with `data.on_duplicates: error`) before Ray."""
    scanned = scan_source(spec.base.data)
    inspection = inspect_data(scanned, spec.base.data)
    check_weights(spec.base.model)  # a bad weights file fails before the (slow) first decode
    return prepare_data(spec.base, scanned, _batch_sizes(spec)), inspection


def _search(
    args,
    spec: SearchSpaceFile,
    prepared: PreparedData,
    name: str,
    storage: str,
    resume: bool,
    run_dir: Path,
):
    """Run (or, with `resume`, continue) the search `name` under `storage`; its ResultGrid.

    `run_dir` is the local results folder (W&B keeps its files there).
    """
    exp_uri = experiment_path(storage, name)
    search = spec.search
    concurrent = concurrency_limit(
        search.max_concurrent, search.num_samples, spec.base.scaling, args.cpu
    )
    layout = plan_workers(spec.base.scaling, force_cpu=args.cpu, concurrent=concurrent)
    context = TrialContext(
        spec.base.model_dump(mode="json"), prepared.plan, layout, f"{exp_uri}/trials"
    )
    gpu = f" + {layout.gpus_per_worker:g} GPU" if layout.use_gpu else ""
    images = len(prepared.plan.folds[0]["train"]) + len(prepared.plan.folds[0]["val"])
    print(
        f"distmed {__version__}: {search.num_samples} trials on {prepared.index.name} "
        f"({images} images, {_folds_text(spec.base.cv)}), {concurrent} at a "
        f"time, {layout.num_workers} worker(s) x {layout.cpus_per_worker:g} CPU{gpu} each "
        f"-> {exp_uri}",
        flush=True,
    )
    keep_secrets_out_of_ray()
    EndedTrials.ended.clear()
    if resume:
        tuner = restore_tuner(exp_uri, context)
    else:
        tracking = spec.base.tracking
        callbacks = [
            *wandb_callbacks(tracking.wandb, group=name, run_dir=run_dir),
            *mlflow_callbacks(tracking.mlflow, experiment=name),
            *tensorboard_callbacks(),
        ]
        tuner = build_tuner(spec, context, name, storage, concurrent, callbacks, args.verbose)
    with hidden_status_lines(hide=not args.verbose):
        return tuner.fit()


def _summary_head(
    name: str, spec: SearchSpaceFile, index: DataIndex, rows, inspection: dict[str, Any]
) -> RunSummary:
    return RunSummary(
        name=name,
        num_trials=len(rows),
        trials_by_status=status_counts(rows),
        search=spec.search.model_dump(mode="json"),
        space=spec.space_as_dict(),
        data=DataSummary.model_validate(describe_index(index, inspection)),
        versions=_versions(),
    )


def _refit_and_test(args, chosen, best, prepared: PreparedData, exp_uri: str, local: Path):
    """Refit the best config on the whole CV pool, keep the best trial's fold models and
    fit the temperature on its out-of-fold predictions; evaluate the test split once with
    the refit model and with the fold ensemble."""
    epochs = refit_epochs(best.fold_epochs)
    index, cache, plan = prepared.index, prepared.cache, prepared.plan
    run_name = f"refit-{best.trial_id}"
    model_path = local / "best_model.pt"
    if saved_source(model_path) == run_name:  # a resumed search whose refit had finished
        print(f"reusing {model_path} (refit of trial {best.trial_id})", flush=True)
    else:
        print(
            f"refitting trial {best.trial_id}'s config on all {len(index.pool)} training "
            f"images for {epochs} epochs",
            flush=True,
        )
        layout = plan_workers(chosen.scaling, force_cpu=args.cpu)
        wait_for_free_resources(layout, "the refit")
        state = refit(chosen, plan, layout, f"{exp_uri}/refit", run_name, epochs, show_line)
        trials = f"{exp_uri}/trials"
        fold_states = final_fold_states(
            f"{trials}/{trial_run_name(best.trial_id)}", best.epochs_reported
        )
        folds = (
            FoldModels(
                trial=best.trial_id, num_models=len(fold_states), stop_epochs=best.fold_epochs
            )
            if fold_states
            else None
        )
        detail = read_trial_detail(f"{trials}/cv-{best.trial_id}")
        calibration = fit_oof_temperature(detail, plan.positive)
        save_model(
            model_path,
            state,
            chosen,
            index.class_names,
            cache.channels,
            plan.positive,
            run_name,
            folds=folds,
            fold_states=fold_states,
            calibration=calibration,
        )
        delete_checkpoints(f"{exp_uri}/refit/{run_name}")
    out: dict[str, Any] = {"refit_epochs": epochs}
    if cache.test_path is not None:
        choices: list[tuple[Ensemble, str, str]] = [
            ("refit", "test_metrics", TEST_PREDICTIONS),
            ("folds", "test_metrics_folds", TEST_PREDICTIONS_FOLDS),
        ]
        has_folds = SavedModel.load(model_path).fold_models is not None  # read once
        for ensemble, key, file in choices:
            if ensemble == "folds" and not has_folds:
                continue
            model, _ = load_inference_model(model_path, ensemble)
            out[key] = evaluate_test(
                model, cache.test_path, index.test.labels, plan.positive, save_to=local / file
            )
    return out


def fit_oof_temperature(
    detail: dict[str, Any] | None, positive: int | None
) -> TemperatureFit | None:
    """The temperature fitted on the best trial's out-of-fold predictions (never the test
    split); None, with one line saying why, when they are missing or too few."""
    oof = oof_predictions(detail)
    if oof is None:
        print("calibration: the best trial saved no out-of-fold predictions; none fitted")
        return None
    try:
        fit = fit_temperature(*oof, positive=positive)
    except UserError as exc:
        print(f"calibration: not fitted ({exc})")
        return None
    print(
        f"calibration: temperature {fit.temperature:.3f} on {fit.num_samples} out-of-fold "
        f"predictions (ECE {fit.ece_before:.4f} -> {fit.ece_after:.4f})",
        flush=True,
    )
    return fit


def _print_results(rows, keys, best, summary: RunSummary, local: Path, report: Path | None) -> None:
    print(format_table(rows, keys))
    counts = summary.trials_by_status
    print(
        f"{counts['completed']} completed, {counts['stopped']} stopped early, "
        f"{counts['diverged']} diverged, {counts['errored']} errored; "
        f"best CV ROC-AUC {best.cv_roc_auc:.4f} ± {best.cv_roc_auc_se:.4f} SE "
        f"(fold std {best.cv_roc_auc_std:.4f}; trial {best.trial_id})"
    )
    if summary.best_separable_from_runner_up is False:
        print(
            f"  not separable from the runner-up, trial {summary.runner_up_trial}: their 95% "
            "intervals (mean ± 1.96 SE) overlap (see the report)"
        )
    print("best configuration (best_config.yaml):")
    for key, value in best.params.items():
        print(f"  {key}: {value}")
    for title, test in (
        ("refit model", summary.test_metrics),
        ("fold ensemble", summary.test_metrics_folds),
    ):
        if test is not None:
            print(
                f"test split ({title}, scored once): ROC-AUC {test['roc_auc']:.4f}, "
                f"accuracy {test['accuracy']:.4f}, sensitivity {test['sensitivity']:.4f}, "
                f"specificity {test['specificity']:.4f}"
            )
    print(f"results: {local}  ({summary.wall_time_s or 0:.0f} s)")
    if report is not None:
        print(f"report: {report}")


def resume_command(argv: list[str], name: str) -> str:
    """The command that continues this search: the same arguments, `--name`, `--resume`."""
    args = list(argv)
    if "--name" not in args and not any(a.startswith("--name=") for a in args):
        args += ["--name", name]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([sys.executable, "-m", "distmed.tune", *args])


def _load_spec(args: argparse.Namespace) -> SearchSpaceFile:
    overrides = overrides_from_args(args)
    if args.gpus_per_worker is not None:
        overrides.append(f"scaling.gpus_per_worker={args.gpus_per_worker}")
    if args.wandb_project:
        overrides.append(f"tracking.wandb.project={args.wandb_project}")
    if args.mlflow_uri:
        overrides.append(f"tracking.mlflow.uri={args.mlflow_uri}")
    spec = load_space(args.space, overrides)
    updates = {}
    if args.num_samples is not None:
        updates["num_samples"] = args.num_samples
    if args.max_concurrent is not None:
        updates["max_concurrent"] = args.max_concurrent
    return spec.with_search(**updates) if updates else spec


def _warn_frozen_random_stages(spec: SearchSpaceFile) -> None:
    """`warn_frozen_random_stages` for the trials the space can draw at its lowest unfreeze."""
    space = spec.space
    if "model.weights" in space:  # some trials may have pretrained weights: no single answer
        return
    model = spec.base.model
    if "model.stem" in space and "imagenet" in space["model.stem"].probe_values():
        model = model.model_copy(update={"stem": "imagenet"})  # a stem that can be frozen
    unfreeze = space.get("model.unfreeze")
    warn_frozen_random_stages(model, min(unfreeze.probe_values()) if unfreeze else None)


def _describe(spec: SearchSpaceFile) -> str:
    return yaml.safe_dump(
        {
            "base": spec.base.model_dump(mode="json"),
            "search": spec.search.model_dump(mode="json"),
            "space": spec.space_as_dict(),
        },
        sort_keys=False,
    )


def _folds_text(cv: CVConfig) -> str:
    if cv.repeats == 1:
        return f"{cv.folds} folds"
    return f"{cv.repeats} x {cv.folds} folds"


def _batch_sizes(spec: SearchSpaceFile) -> list[int]:
    dist = spec.space.get("train.batch_size")
    return [int(v) for v in dist.probe_values()] if dist else [spec.base.train.batch_size]


def _local_results_dir(storage: str, name: str, create: bool = True) -> Path:
    """Our result files go to <storage>/<name>; for a URI, a local staging copy first."""
    if "://" in storage:
        folder = Path(tempfile.gettempdir()) / "distmed-results" / name
    else:
        folder = Path(storage).expanduser().resolve() / name
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _publish(local: Path, storage: str, name: str) -> None:
    if "://" in storage:
        upload_dir(local, f"{storage.rstrip('/')}/{name}")


def _versions() -> dict[str, str]:
    import optuna
    import ray
    import torch
    import torchvision

    return {
        "distmed": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
