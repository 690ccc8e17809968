"""The one module that sequences a run's stages, typed in and typed out.

Shaped like torchvision's `references/classification/train.py` `main`: a front door
(`distmed.tune`, `distmed.train`, nested CV in `distmed.nested`) turns its command line into
typed inputs and calls these stages in order, each a short function over the rooms below:

    prepare     scan -> inspect -> weights check -> folds and decoded cache   (before Ray)
    connect     Ray; the decoded images shared with other nodes, a stream's file index written
    run_search  the Tuner -> rows -> trials.csv -> interrupted? best and runner-up
    finalize    refit -> fold models -> temperature and operating threshold on the best
                trial's out-of-fold predictions -> best_model.pt written once -> the test
                split scored once
    summarize   summary.json, the report, MLflow; publish copies the results to --storage
    after_search  around every stage after the search: Ctrl-C stops at once saying what is
                saved; a results folder that fills up or turns read-only is one line

Nothing here parses arguments or knows a flag; nothing below it chooses what runs next.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from distmed import __version__, _ray_compat
from distmed.artifacts import (
    delete_checkpoints,
    publish_results,
    remove_run_without_checkpoints,
    results_folder,
    staging_folder,
)
from distmed.calibration import (
    FindingTemperatures,
    TemperatureFit,
    fit_oof_temperature,
    kept_note,
    oof_finding_thresholds,
    oof_threshold,
)
from distmed.config import CVConfig, ExperimentConfig, ModelConfig
from distmed.cv import (
    FoldPlan,
    PreparedData,
    held_out_images,
    prepare_data,
    score_caveat,
    share_images,
    storage_uri,
    trained_channels,
)
from distmed.cvstats import score_text
from distmed.data import describe_index, inspect_data, scan_source
from distmed.data.remote import bucket_summary
from distmed.data.stream import decode_reserve
from distmed.errors import EXIT_INTERRUPTED, UserError
from distmed.failures import failed_path, one_line_write_failures, out_of_space, write_failure
from distmed.importance import importance_text, param_importances
from distmed.inference import (
    TEST_PREDICTIONS,
    TEST_PREDICTIONS_FOLDS,
    Ensemble,
    evaluate_test,
    load_inference_model,
)
from distmed.model import check_weights
from distmed.model import warn_frozen_random_stages as model_warning
from distmed.pareto import RULE, FrontPoint, ModelSize, choose_on_front, pareto_front
from distmed.refit import final_fold_states, refit, refit_epochs, show_line
from distmed.resources import (
    concurrency_limit,
    keep_secrets_out_of_ray,
    plan_workers,
    start_ray,
    wait_for_free_resources,
)
from distmed.results import (
    TrialRow,
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
from distmed.runreport import REPORT, report_after_search
from distmed.sampling import warn_of_double_balancing as sampling_warning
from distmed.savedmodel import (
    FindingThresholds,
    FoldModels,
    SavedModel,
    Threshold,
    save_model,
    save_threshold,
    saved_source,
)
from distmed.search import (
    EndedTrials,
    StopOnCtrlC,
    TrialContext,
    build_tuner,
    experiment_path,
    hidden_status_lines,
    resolve_sampler,
    restore_tuner,
    trial_run_name,
    warn_of_scheduler,
)
from distmed.searchfile import check_new_search, check_same_search
from distmed.space import ARCH_KEY, SearchSpaceFile
from distmed.summary import DataSummary, RunSummary
from distmed.task.base import Task
from distmed.task.factory import task_of_index
from distmed.task.multilabel import MultilabelTask
from distmed.task.single import BinaryTask
from distmed.tracking import (
    log_search_to_mlflow,
    mlflow_callbacks,
    tensorboard_callbacks,
    tensorboard_command,
    wandb_callbacks,
)
from distmed.tunestate import check_state
from distmed.uris import shown
from distmed.warmstart import WarmStart, load_warm_start, model_size_of

MODEL_FILE = "best_model.pt"
SUMMARY_FILE = "summary.json"
TRIALS_FILE = "trials.csv"
BEST_CONFIG_FILE = "best_config.yaml"
# $TMPDIR/distmed-unsaved/<name>: results that the results folder would not take (full,
# read-only), kept so that nothing a search computed is lost.
UNSAVED_FOLDER = "distmed-unsaved"


@dataclass(frozen=True)
class RunContext:
    """Where a search runs and writes, and how it was asked to run."""

    name: str
    storage: str  # the results root as a URI or an absolute path (`cv.storage_uri`)
    experiment_uri: str  # <storage>/<name>: Tune's experiment, the trials, the refit
    local: Path  # this run's local results folder (for a URI, a staging copy)
    resume: bool = False
    verbose: bool = False
    resume_command: str = ""  # the command that continues this search after Ctrl-C

    @classmethod
    def create(
        cls, name: str, storage: str, resume: bool, verbose: bool, resume_command: str
    ) -> RunContext:
        """The context of search `name` under `storage` (a folder or a URI as given)."""
        root = storage_uri(storage)
        # For a URI, our result files are staged locally, then uploaded.
        local = staging_folder(root, name) if "://" in root else Path(root) / name
        return cls(name, root, experiment_path(root, name), local, resume, verbose, resume_command)

    def child(self, name: str, resume: bool) -> RunContext:
        """A search inside this one (a nested CV outer fold): its own experiment folder."""
        uri = experiment_path(self.experiment_uri, name)
        return replace(
            self,
            name=name,
            storage=self.experiment_uri,
            experiment_uri=uri,
            local=self.local / name,
            resume=resume,
        )


# --------------------------------------------------------------------------- prepare


def warn_frozen_random_stages(spec: SearchSpaceFile) -> None:
    """`warn_frozen_random_stages` for the trials the space can draw at its lowest unfreeze."""
    space = spec.space
    if "model.weights" in space:  # some trials may have pretrained weights: no single answer
        return
    model = spec.base.model
    if "model.stem" in space and "imagenet" in space["model.stem"].probe_values():
        model = model.model_copy(update={"stem": "imagenet"})  # a stem that can be frozen
    unfreeze = space.get("model.unfreeze")
    counts = [v for v in unfreeze.probe_values() if v != "all"] if unfreeze else []
    for arch in spec.drawn(ARCH_KEY, model.arch):  # each arch's stages: a count freezes others
        model_warning(model.model_copy(update={"arch": arch}), min(counts) if counts else None)


def warn_of_double_balancing(spec: SearchSpaceFile) -> None:
    """`sampling.warn_of_double_balancing` for the trials the space can draw."""
    train = spec.base.train
    sampling_warning(
        spec.drawn("train.sampler", train.sampler),
        spec.drawn("train.class_weights", train.class_weights),
    )


def describe_search(spec: SearchSpaceFile, warm: WarmStart | None = None) -> str:
    """The resolved base config, search settings and space as YAML (`--dry-run`); the
    sampler as built for `max_concurrent` trials at once (fewer if the cluster is smaller);
    with `warm`, what --warm-start would feed the sampler."""
    search = spec.search
    concurrent = min(search.max_concurrent, search.num_samples)
    described = {
        "base": spec.base.model_dump(mode="json"),
        "search": search.model_dump(mode="json"),
        "sampler (resolved)": resolve_sampler(search, concurrent),
        "space": spec.space_as_dict(),
    }
    if warm is not None:
        described["warm start"] = warm.record()
    return yaml.safe_dump(described, sort_keys=False)


def batch_sizes(spec: SearchSpaceFile) -> list[int]:
    """Every batch size the search draws; empty when it does not search the key (then the
    base's `train.batch_size` is the one checked against the folds)."""
    dist = spec.space.get("train.batch_size")
    return [int(v) for v in dist.probe_values()] if dist else []


@dataclass(frozen=True)
class Prepared:
    """The data made ready once for every trial, and the full data summary for results."""

    data: PreparedData
    inspection: dict[str, Any]


def claim(
    ctx: RunContext, spec: SearchSpaceFile, nested: int | None, force: bool, locks: ExitStack
) -> dict[str, Any] | None:
    """Hold the run's results folder (one process per name: `distmed.runlock`, released by
    `locks`) and check the name: a new search may not reuse it; a resumed one must have
    been started with the same settings (`searchfile`) and find only Tune state this machine
    recorded it writing (`tunestate`, before Ray unpickles any). Returns the record of the
    search to resume (None for a new one); its images are checked once they are indexed.
    """
    locks.enter_context(hold_results_folder(ctx.local, f"--name {ctx.name}", force))
    if not ctx.resume:
        check_new_search(ctx.experiment_uri)
        return None
    record = check_same_search(ctx.experiment_uri, spec, nested)
    if not nested:  # a nested search's outer folds are checked one by one (restore_tuner)
        check_state(ctx.experiment_uri)
    return record


def models_to_check(spec: SearchSpaceFile) -> list[ModelConfig]:
    """The base's model section, then each pair of an arch and a local weights file the space
    can draw: a file that fits only the base's arch would otherwise error every trial of
    another arch, inside Ray, after the first decode."""
    base = spec.base.model
    files = set(spec.drawn("model.weights", base.weights)) - {"none", "imagenet"}
    pairs = [(a, w) for a in spec.drawn(ARCH_KEY, base.arch) for w in sorted(files)]
    others = [pair for pair in pairs if pair != (base.arch, base.weights)]
    return [base, *(base.model_copy(update={"arch": a, "weights": w}) for a, w in others)]


def prepare(
    cfg: ExperimentConfig,
    batch_sizes: Sequence[int] = (),
    models: Sequence[ModelConfig] = (),
) -> Prepared:
    """Index, data summary, folds and decoded cache; every input error (duplicates too, with
    `data.on_duplicates: error`; a bad weights file, for `cfg.model` or each of `models`
    where given) before Ray and the slow first decode."""
    scanned = scan_source(cfg.data)
    if scanned.pool.uris is None:
        inspection = inspect_data(scanned, cfg.data)
    else:  # a bucket: the driver reads no image (`distmed.data.remote`)
        inspection = bucket_summary(scanned)
    for model in models or [cfg.model]:  # a bad weights file fails before the slow first decode
        check_weights(model)
    refuse_unreadable_stream(cfg, inspection)
    return Prepared(prepare_data(cfg, scanned, batch_sizes), inspection)


def refuse_unreadable_stream(cfg: ExperimentConfig, inspection: dict[str, Any]) -> None:
    """Stop a streamed run on files the inspection could not read, before Ray starts: a
    stream cannot leave a file out (every rank must see the same rows), and a decoding task
    would otherwise stop the run on it only once training reached it.

    Raises:
        UserError: naming how many, the first ones and the fixes.
    """
    unreadable = inspection.get("unreadable") or {}
    if cfg.data.loader != "stream" or not unreadable.get("count"):
        return
    raise UserError(
        f"data.loader stream: {unreadable['count']} image file(s) in "
        f"{shown(cfg.data.root or cfg.data.manifest or '')} cannot be read, e.g. "
        f"{'; '.join(unreadable['first'][:2])}; a stream cannot leave files out: fix or "
        "remove them, or use data.loader: cache with data.skip_invalid: true"
    )


def warm_start(
    run_dir: str | None,
    spec: SearchSpaceFile,
    prepared: Prepared,
    ctx: RunContext,
    nested: int | None,
) -> WarmStart | None:
    """--warm-start's trials (checked against the images before Ray starts); None without
    one, and for a resumed search, whose study has them already.

    Raises:
        UserError: with --nested (each outer fold searches other images), or other images.
    """
    if not run_dir or ctx.resume:
        return None
    _refuse_warm_start_nested(nested)
    size = None
    if spec.search.multi_objective:
        size = model_size_of(spec, prepared.data.plan.task.num_outputs)
    return _warned(load_warm_start(run_dir, spec, prepared.data.index, size))


def _warned(warm: WarmStart) -> WarmStart:
    """`warm`, after its warnings are printed (a search's and --dry-run's alike)."""
    for line in warm.warnings():
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return warm


def _refuse_warm_start_nested(nested: int | None) -> None:
    if nested:
        raise UserError(
            "--warm-start with --nested: each outer fold searches other images; warm-start "
            "a plain search"
        )


def dry_run(spec: SearchSpaceFile, run_dir: str | None, nested: int | None) -> str:
    """`--dry-run`: `describe_search`'s text, after the checks that need neither Ray nor a
    decoded image: each local weights file against each arch the space can draw (sha256,
    strict load; `models_to_check`) and, with
    --warm-start, the earlier search against the data source's images (scanned, not decoded).

    Raises:
        UserError: a bad weights file, or a --warm-start folder that `warm_start` refuses.
    """
    for model in models_to_check(spec):
        if model.weights not in ("none", "imagenet"):  # ImageNet: a download, no check
            check_weights(model)
    warn_of_scheduler(spec)
    if run_dir:
        _refuse_warm_start_nested(nested)
        index = scan_source(spec.base.data)
        size = None
        if spec.search.multi_objective:
            task = task_of_index(index, spec.base.data, spec.base.cv.folds)
            size = model_size_of(spec, task.num_outputs)
        return describe_search(spec, _warned(load_warm_start(run_dir, spec, index, size)))
    return describe_search(spec)


def connect(
    data: PreparedData, address: str | None, storage: str, worker_logs: bool = True
) -> PreparedData:
    """Start or join Ray; with `address`, the decoded images go to the object store, as
    workers may run on nodes without this node's cache. A streamed pool's file list goes to
    an index file under `storage` (the run's, which every node reads; `StreamSpec.published`)
    before the plan crosses into Ray."""
    # Tune snapshots the search state every 10+ s by default; every 5 s bounds what a
    # killed driver loses (trials that ended since the last snapshot run again).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    start_ray(address, worker_logs=worker_logs)
    plan = data.plan
    if plan.stream is not None:
        plan = replace(plan, stream=plan.stream.published(storage_uri(storage)))
    return replace(data, plan=share_images(plan) if address else plan)


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchOutcome:
    """A search's trials as rows (trials.csv), and its best and runner-up when finished."""

    rows: list[TrialRow]
    keys: list[str]  # the space's keys: trials.csv's parameter columns
    interrupted: bool  # stopped by Ctrl-C: no best is chosen from an unfinished search
    best: TrialRow | None
    runner_up: TrialRow | None
    sampler: dict[str, Any] | None = None  # `search.resolve_sampler`'s settings
    front: list[FrontPoint] | None = None  # two objectives: the Pareto front


def run_search(
    spec: SearchSpaceFile, data: PreparedData, ctx: RunContext, warm: WarmStart | None = None
) -> SearchOutcome:
    """Run (or, with `ctx.resume`, continue) the search; writes `ctx.local/trials.csv`.
    `warm`: an earlier search's trials for the sampler. With two objectives the best is the
    front's point `pareto.choose_on_front` picks."""
    with StopOnCtrlC(on_exit=f"continue the search with: {ctx.resume_command}") as ctrl_c:
        grid, sampler = _fit_tuner(spec, data, ctx, warm)
    keys = list(spec.space)
    rows = collect_rows(grid, keys, ended=EndedTrials.ended if ctrl_c.interrupted else None)
    keep_trials_csv(ctx, rows, keys)
    front = None
    if spec.search.multi_objective:
        size = ModelSize(spec.base.model_dump(mode="json"), data.plan.task.num_outputs)
        sizes = {r.trial_id: size(r.params) for r in rows if r.status == "completed"}
        front = pareto_front(rows, sizes)
    best = None if ctrl_c.interrupted else best_row(rows)
    if best is not None and front is not None:
        chosen = choose_on_front(front)
        best = next((r for r in rows if chosen and r.trial_id == chosen.trial_id), best)
    runner_up = runner_up_row(rows, best) if best is not None else None
    return SearchOutcome(rows, keys, ctrl_c.interrupted, best, runner_up, sampler, front)


def keep_trials_csv(ctx: RunContext, rows: list[TrialRow], keys: list[str]) -> None:
    """Write `ctx.local/trials.csv`; where the folder will not take it (full, read-only:
    `failures.write_failure`), write it to `unsaved_folder(ctx)` instead and say so.

    Raises:
        UserError: the folder cannot be written; names it, where trials.csv is kept and
            what to do.
    """
    try:
        write_trials_csv(ctx.local / TRIALS_FILE, rows, keys)
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        kept = unsaved_folder(ctx)
        try:
            kept.mkdir(parents=True, exist_ok=True)
            write_trials_csv(kept / TRIALS_FILE, rows, keys)
        except OSError:  # nowhere to keep it either: the message says so
            raise results_write_error(ctx, reason) from exc
        raise results_write_error(ctx, reason, kept / TRIALS_FILE) from exc


def unsaved_folder(ctx: RunContext) -> Path:
    """Where results the results folder would not take are kept: $TMPDIR/distmed-unsaved/NAME."""
    return Path(tempfile.gettempdir()) / UNSAVED_FOLDER / ctx.name


def _fit_tuner(
    spec: SearchSpaceFile, data: PreparedData, ctx: RunContext, warm: WarmStart | None
) -> tuple[Any, dict[str, Any]]:
    """The Tuner's ResultGrid and the sampler's settings; `ctx.local` is where W&B keeps
    its files."""
    search = spec.search
    reserve = decode_reserve(spec.base.data)  # a stream's decoding tasks need a CPU
    concurrent = concurrency_limit(
        search.max_concurrent, search.num_samples, spec.base.scaling, reserve
    )
    layout = plan_workers(spec.base.scaling, concurrent=concurrent, reserve_cpus=reserve)
    context = TrialContext(
        spec.base.model_dump(mode="json"),
        data.plan,
        layout,
        f"{ctx.experiment_uri}/trials",
        report_num_params=search.multi_objective,
    )
    sampler = resolve_sampler(search, concurrent)
    gpu = f" + {layout.gpus_per_worker:g} GPU" if layout.use_gpu else ""
    images = len(data.plan.folds[0]["train"]) + len(data.plan.folds[0]["val"])
    print(
        f"distmed {__version__}: {search.num_samples} trials on {data.index.name} "
        f"({images} images, {folds_text(spec.base.cv)}), {concurrent} at a "
        f"time, {layout.num_workers} worker(s) x {layout.cpus_per_worker:g} CPU{gpu} each "
        f"-> {ctx.experiment_uri}",
        flush=True,
    )
    print(f"sampler: {sampler_text(sampler, search.objectives, warm)}", flush=True)
    if note := startup_note(sampler, search.num_samples):
        print(f"note: {note}", flush=True)
    keep_secrets_out_of_ray()
    EndedTrials.ended.clear()
    if ctx.resume:
        tuner = restore_tuner(ctx.experiment_uri, context)
    else:
        tracking = spec.base.tracking
        callbacks = [
            *wandb_callbacks(tracking.wandb, group=ctx.name, run_dir=ctx.local),
            *mlflow_callbacks(tracking.mlflow, experiment=ctx.name),
            *tensorboard_callbacks(),
        ]
        tuner = build_tuner(
            spec, context, ctx.name, ctx.storage, concurrent, callbacks, ctx.verbose, warm
        )
    with hidden_status_lines(hide=not ctx.verbose), one_line_write_failures():
        return tuner.fit(), sampler


def sampler_text(
    sampler: dict[str, Any], objectives: Sequence[str], warm: WarmStart | None = None
) -> str:
    """One line: the sampler's settings, the objectives, the warm start."""
    settings = ", ".join(f"{k} {v}" for k, v in sampler.items() if k != "algorithm")
    text = f"{sampler['algorithm'].upper()} ({settings}) on {' and '.join(objectives)}"
    if len(objectives) > 1:
        text += "; no early stopping (ASHA ranks one score)"
    if warm is not None:
        text += (
            f"; warm-started with {len(warm.params)} trial(s) of {warm.source}"
            f" ({warm.skipped} outside this space left out)"
        )
    return text


def startup_note(sampler: dict[str, Any], num_samples: int) -> str | None:
    """A line when TPE's random start-up covers the whole budget (so no trial is guided)."""
    startup = sampler.get("n_startup_trials")
    if startup is None or startup < num_samples:
        return None
    return (
        f"n_startup_trials {startup} >= num_samples {num_samples}: every trial is a random "
        "start-up trial, TPE guides none (give more trials, or a smaller "
        "search.sampler.n_startup_trials)"
    )


def folds_text(cv: CVConfig) -> str:
    """ "5 folds", or "3 x 5 folds" with repeats."""
    return f"{cv.folds} folds" if cv.repeats == 1 else f"{cv.repeats} x {cv.folds} folds"


# --------------------------------------------------------------------------- finalize


@dataclass(frozen=True)
class FinalModel:
    """`best_model.pt` and its one score on the test split (per ensemble, when there is one)."""

    path: Path
    refit_epochs: int
    fold_models_missing: str | None = None  # why best_model.pt has no fold ensemble
    calibration_note: str | None = None  # why a temperature was kept at 1 (`kept_note`)
    test_metrics: dict[str, int | float] | None = None
    test_metrics_folds: dict[str, int | float] | None = None

    def summary_update(self) -> dict[str, Any]:
        return {
            "refit_epochs": self.refit_epochs,
            "fold_models_missing": self.fold_models_missing,
            "calibration_note": self.calibration_note,
            **({"test_metrics": self.test_metrics} if self.test_metrics else {}),
            **({"test_metrics_folds": self.test_metrics_folds} if self.test_metrics_folds else {}),
        }


def finalize(
    chosen: ExperimentConfig,
    outcome: SearchOutcome,
    data: PreparedData,
    ctx: RunContext,
    target_sensitivity: float | None = None,
) -> FinalModel:
    """Refit the best config on the whole CV pool, keep the best trial's fold models, fit the
    temperature and choose the operating threshold on its out-of-fold predictions, write
    `best_model.pt` once with all of it; then score the test split once with the refit model
    and with the fold ensemble, and drop the trials' checkpoints. Without the best trial's
    final checkpoint (deleted before a `--resume`) there is no fold ensemble: one warning
    line, and `fold_models_missing` says why (summary.json)."""
    best = outcome.best
    assert best is not None  # the front door stops before finalize when no trial completed
    epochs = refit_epochs(best.fold_epochs)
    path = ctx.local / MODEL_FILE
    run_name = f"refit-{best.trial_id}"
    trials = f"{ctx.experiment_uri}/trials"
    oof = oof_predictions(read_trial_detail(f"{trials}/cv-{best.trial_id}"))
    task, trial = data.plan.task, best.trial_id

    def threshold_for(
        calibration: TemperatureFit | FindingTemperatures | None,
    ) -> Threshold | FindingThresholds | None:
        return operating_threshold(oof, task, trial, calibration, target_sensitivity)

    if saved_source(path) == run_name:  # a resumed search whose refit had finished
        print(f"reusing {path} (refit of trial {best.trial_id})", flush=True)
        saved = SavedModel.load(path)
        has_folds = saved.fold_models is not None
        calibration = saved.finding_calibration or saved.calibration
        kept = saved.finding_thresholds if saved.multilabel else saved.threshold
        wanted = threshold_for(calibration)
        if wanted != kept and wanted:
            save_threshold(path, wanted)  # only when this run asks for another rule
    else:
        print(
            f"refitting trial {best.trial_id}'s config on all {len(data.index.pool)} training "
            f"images for {epochs} epochs",
            flush=True,
        )
        state = refit_chosen(chosen, data.plan, epochs, ctx.experiment_uri, run_name, "the refit")
        fold_states = final_fold_states(f"{trials}/{trial_run_name(trial)}", best.epochs_reported)
        folds = None
        if fold_states:
            folds = FoldModels(
                trial=trial, num_models=len(fold_states), stop_epochs=best.fold_epochs
            )
        else:
            print(f"warning: {no_fold_models_text(trial)}", file=sys.stderr, flush=True)
        has_folds = folds is not None
        calibration = fit_oof_temperature(oof, task)
        save_model(
            path,
            state,
            chosen,
            task,
            trained_channels(data),
            run_name,
            folds=folds,
            fold_states=fold_states,
            calibration=calibration,
            threshold=threshold_for(calibration),
        )
        delete_checkpoints(f"{ctx.experiment_uri}/refit/{run_name}")
    missing = None if has_folds else no_fold_models_text(trial)
    note = kept_note(calibration, task)
    final = FinalModel(path, epochs, missing, note, **score_test(path, data, ctx.local))
    for row in outcome.rows:  # the best trial's fold models are in best_model.pt now
        delete_checkpoints(f"{trials}/{trial_run_name(row.trial_id)}")
    return final


def no_fold_models_text(trial: str) -> str:
    """Why `best_model.pt` holds no fold ensemble: the best trial's final checkpoint is gone."""
    return (
        f"trial {trial}'s fold models were not found (its final checkpoint is missing or "
        f"stale); best_model.pt holds the refit model only: --ensemble folds is unavailable"
    )


def refit_chosen(
    chosen: ExperimentConfig, plan: FoldPlan, epochs: int, uri: str, run_name: str, what: str
) -> dict[str, torch.Tensor]:
    """`refit.refit` of `chosen` once the cluster has room for it; its Train run goes to
    `uri/refit/run_name`. `what` names the refit in the waiting message. A finished refit's
    run folder, whose checkpoint went once its model was saved, is removed first: Ray Train
    would try to resume it (a `--resume` after best_model.pt was deleted); an interrupted
    refit's checkpoint is resumed."""
    remove_run_without_checkpoints(f"{uri}/refit/{run_name}")
    layout = plan_workers(chosen.scaling, reserve_cpus=decode_reserve(chosen.data))
    wait_for_free_resources(layout, what)
    with _ray_compat.train_keeps_ctrl_c():  # Ctrl-C stops at once (`after_search`)
        return refit(chosen, plan, layout, f"{uri}/refit", run_name, epochs, show_line)


def operating_threshold(
    oof: tuple[np.ndarray, np.ndarray] | None,
    task: Task,
    trial: str,
    calibration: TemperatureFit | FindingTemperatures | None,
    target_sensitivity: float | None = None,
) -> Threshold | FindingThresholds | None:
    """The binary operating threshold chosen on trial `trial`'s out-of-fold predictions
    (`calibration.oof_threshold`), on the calibrated scale predict uses; a multi-label
    task's thresholds per finding (`calibration.oof_finding_thresholds`); None for a
    multi-class task or without out-of-fold predictions."""
    if isinstance(task, MultilabelTask) and oof is not None:
        temperatures = (
            calibration.temperatures if isinstance(calibration, FindingTemperatures) else None
        )
        chosen = oof_finding_thresholds(*oof, task, temperatures, target_sensitivity)
        return FindingThresholds(
            values=chosen.values,
            method=chosen.method,
            chosen_on=f"out-of-fold validation predictions of trial {trial}",
            num_samples=chosen.num_samples,
            validation_sensitivity=chosen.sensitivity,
            validation_specificity=chosen.specificity,
            defaulted=chosen.defaulted,
        )
    if not isinstance(task, BinaryTask) or oof is None:
        return None
    temperature = calibration.temperature if isinstance(calibration, TemperatureFit) else None
    choice = oof_threshold(*oof, task, temperature, target_sensitivity)
    return Threshold(
        value=choice.value,
        method=choice.method,
        positive_class=task.positive_class,
        chosen_on=f"out-of-fold validation predictions of trial {trial}",
        num_samples=choice.num_samples,
        validation_sensitivity=choice.sensitivity,
        validation_specificity=choice.specificity,
    )


def score_test(path: Path, data: PreparedData, local: Path) -> dict[str, Any]:
    """The test split scored once per saved ensemble (its predictions kept for the report);
    empty when the source has no test split."""
    test_split = held_out_images(data)  # a cache file, or the files streamed
    if test_split is None:
        return {}
    choices: list[tuple[Ensemble, str, str]] = [
        ("refit", "test_metrics", TEST_PREDICTIONS),
        ("folds", "test_metrics_folds", TEST_PREDICTIONS_FOLDS),
    ]
    has_folds = SavedModel.load(path).fold_models is not None  # read once
    out: dict[str, Any] = {}
    for ensemble, key, file in choices:
        if ensemble == "folds" and not has_folds:
            continue
        model, _ = load_inference_model(path, ensemble)
        labels = data.plan.task.targets(data.index.test.labels)  # a multi-label task's policies
        out[key] = evaluate_test(model, test_split, labels, data.plan.task, save_to=local / file)
    return out


# --------------------------------------------------------------------------- summarize


def summarize(
    ctx: RunContext,
    spec: SearchSpaceFile,
    prepared: Prepared,
    outcome: SearchOutcome,
    warm: WarmStart | None = None,
) -> RunSummary:
    """summary.json as far as the search goes: trials, space, data, the sampler, parameter
    importance (and the Pareto front) and, once it finished with a completed trial, the best
    and runner-up (written to best_config.yaml too)."""
    data = describe_index(prepared.data.index, prepared.inspection)
    data |= {
        "thin_validation_folds": prepared.data.thin_folds,
        "test_split_gaps": prepared.data.test_gaps,
    }
    summary = RunSummary(
        name=ctx.name,
        num_trials=len(outcome.rows),
        trials_by_status=status_counts(outcome.rows),
        search=spec.search.model_dump(mode="json"),
        space=spec.space_as_dict(),
        data=DataSummary.model_validate(data),
        versions=versions(),
        interrupted=outcome.interrupted,
        sampler=outcome.sampler,
        warm_start=warm.record() if warm else None,
        param_importance=param_importances(outcome.rows, spec.space, spec.search.seed),
        pareto_front=([asdict(p) for p in outcome.front] if outcome.front is not None else None),
        pareto_rule=RULE if outcome.front is not None else None,
    )
    best, runner_up = outcome.best, outcome.runner_up
    if best is None:
        return summary
    chosen = best_config(spec.base, best)
    write_best_config(ctx.local / BEST_CONFIG_FILE, chosen)
    return summary.model_copy(
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


def save_summary(summary: RunSummary, ctx: RunContext, **update: Any) -> RunSummary:
    """`summary` with `update` applied, written to `ctx.local/summary.json`."""
    summary = summary.model_copy(update=update) if update else summary
    summary.save(ctx.local / SUMMARY_FILE)
    return summary


def write_report(ctx: RunContext) -> Path | None:
    """report.html (None, with a warning, if it failed: the results are already saved)."""
    return report_after_search(ctx.local, ctx.experiment_uri)


def log_to_mlflow(
    spec: SearchSpaceFile, ctx: RunContext, best: TrialRow, summary: RunSummary
) -> str | None:
    """The best model and report as one MLflow run, when tracking.mlflow is set; which
    run at which server (None without one)."""
    record = {
        "best_trial": best.trial_id,
        "best_params": best.params,
        "best_cv_roc_auc": best.cv_roc_auc,
        "test_metrics": summary.test_metrics,
    }
    mlflow = spec.base.tracking.mlflow
    run_id = log_search_to_mlflow(mlflow, ctx.name, ctx.local, record)
    return None if run_id is None else f"run {run_id} at {mlflow.uri}"


def open_results(ctx: RunContext) -> Path:
    """The run's local results folder, created (`artifacts.results_folder`: for a URI, a
    staging copy, uploaded by `publish` and removed at exit once the bucket holds it)."""
    return results_folder(ctx.storage, ctx.name)


def publish(ctx: RunContext) -> None:
    """Copy the local results to <storage>/<name> when the storage is a URI."""
    publish_results(ctx.local, ctx.storage, ctx.name)


def versions() -> dict[str, str]:
    """The versions a run's results were made with."""
    import optuna
    import ray
    import torchvision

    return {
        "distmed": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
    }


def format_results(
    outcome: SearchOutcome,
    summary: RunSummary,
    ctx: RunContext,
    report: Path | None,
    mlflow_run: str | None = None,
) -> str:
    """What a finished search prints: the trials, the best and its test scores, where
    the results, the report, TensorBoard's curves and the MLflow run are."""
    best = outcome.best
    assert best is not None
    lines = [format_table(outcome.rows, outcome.keys)]
    counts = summary.trials_by_status
    lines.append(
        f"{counts['completed']} completed, {counts['stopped']} stopped early, "
        f"{counts['diverged']} diverged, {counts['errored']} errored; "
        "best CV ROC-AUC "
        + score_text(
            best.cv_roc_auc, best.cv_roc_auc_se, best.cv_roc_auc_std, f"; trial {best.trial_id}"
        )
    )
    caveat = score_caveat(best.fold_aucs, summary.data.thin_validation_folds)
    if caveat is not None:
        lines.append(f"  {caveat}")
    if summary.best_separable_from_runner_up is False:
        lines.append(
            f"  not separable from the runner-up, trial {summary.runner_up_trial}: their 95% "
            "intervals (mean ± 1.96 SE) overlap (see the report)"
        )
    if why := importance_text(summary.param_importance):
        lines.append(why)
    if summary.pareto_front is not None:
        lines.append(
            f"Pareto front of CV ROC-AUC and model size: {len(summary.pareto_front)} trial(s); "
            f"refitted trial {best.trial_id}: {summary.pareto_rule}"
        )
    lines.append("best configuration (best_config.yaml):")
    for key, value in best.params.items():
        lines.append(f"  {key}: {value}")
    for title, test in (
        ("refit model", summary.test_metrics),
        ("fold ensemble", summary.test_metrics_folds),
    ):
        if test is not None:
            lines.append(
                f"test split ({title}, scored once): ROC-AUC {test['roc_auc']:.4f}, "
                f"accuracy {test['accuracy']:.4f}, sensitivity {test['sensitivity']:.4f}, "
                f"specificity {test['specificity']:.4f}"
            )
    lines.append(f"results: {ctx.local}  ({summary.wall_time_s or 0:.0f} s)")
    if report is not None:
        lines.append(f"report: {report}")
    command = tensorboard_command(ctx.experiment_uri)
    lines.append(f"TensorBoard (every trial's curves; pip install tensorboard): {command}")
    if mlflow_run is not None:
        lines.append(f"MLflow: best model and report in {mlflow_run}")
    return "\n".join(lines)


@contextmanager
def after_search(ctx: RunContext) -> Iterator[None]:
    """Around every stage after the search (summary, refit, best_model.pt, test scores,
    report, upload, MLflow): what the search computed is saved as it goes, so

    - Ctrl-C stops at once: a `KeyboardInterrupt` whose message says what is saved and how
      to go on (`saved_text`); Ray Train's handler, which swallowed it, is kept out
      (`refit_chosen`).
    - a results folder that will not take a write (full, read-only:
      `failures.write_failure`) is one `UserError` naming it and what to do; the files
      written before it stay. A failed write elsewhere (the cache, /tmp) is left to the
      CLI's one line naming that file.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(saved_text(ctx)) from None
    except UserError:
        raise
    except Exception as exc:
        reason, path = write_failure(exc), failed_path(exc)
        if reason is None or (path and not _inside(Path(path), ctx.local)):
            raise  # elsewhere (the cache, /tmp): `cli.run_entry_point` names that file
        raise results_write_error(ctx, reason) from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def saved_files(ctx: RunContext) -> list[str]:
    """The result files already in `ctx.local`, in the order a search writes them."""
    names = (TRIALS_FILE, SUMMARY_FILE, BEST_CONFIG_FILE, MODEL_FILE, REPORT)
    return [name for name in names if (ctx.local / name).is_file()]


def next_step(ctx: RunContext) -> str:
    """How to finish a search stopped after its trials: rebuild the report from a saved
    best_model.pt, or `--resume` (which runs only what is missing, e.g. the refit)."""
    if (ctx.local / MODEL_FILE).is_file():
        return f"rebuild the report with: python -m distmed.report {ctx.local}"
    return f"finish it with: {ctx.resume_command}"


def saved_text(ctx: RunContext) -> str:
    """What a Ctrl-C after the search says: what is saved where, and what to run next."""
    saved = ", ".join(saved_files(ctx)) or "nothing yet"
    return f"stopped after the search; saved in {ctx.local}: {saved}; {next_step(ctx)}"


def results_write_error(ctx: RunContext, reason: str, kept: Path | None = None) -> UserError:
    """The one line for a results folder that will not take a write: why, what is saved
    (and `kept` elsewhere), what to do, then how to go on."""
    saved = ", ".join(saved_files(ctx)) or "nothing"
    elsewhere = f"; kept instead: {kept}" if kept is not None else ""
    if out_of_space(reason):
        fix = "free space there"
    else:
        fix = f"make it writable (e.g. chmod -R u+w {ctx.local}) or use another --storage"
    return UserError(
        f"cannot write the results in {ctx.local}: {reason}; saved there: {saved}{elsewhere}; "
        f"{fix}, then {next_step(ctx)}"
    )


def stopped(summary: RunSummary, ctx: RunContext) -> int:
    """A search that ended without a refit: Ctrl-C says what finished and how to continue
    (exit status 130); no completed trial is an error.

    Raises:
        UserError: no trial completed, so nothing can be refitted.
    """
    if not summary.interrupted:
        raise UserError(f"no trial completed (see {ctx.local / 'trials.csv'}); nothing to refit")
    print(interrupted_text(summary, ctx), flush=True)
    return EXIT_INTERRUPTED


def interrupted_text(summary: RunSummary, ctx: RunContext) -> str:
    """What a search stopped by Ctrl-C prints: what finished, and how to continue."""
    counts = summary.trials_by_status
    return (
        f"search interrupted: {counts['completed']} trial(s) completed, "
        f"{counts['interrupted']} interrupted (results so far: {ctx.local})\n"
        f"continue it with: {ctx.resume_command}"
    )
