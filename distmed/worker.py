"""The Ray Train worker side of a cross-validated run: every fold of one configuration in lockstep.

This module is what runs inside each Train worker: `train_folds`, its report, checkpoint and
restore (`ray.train.report`, `get_checkpoint`, `get_context`, `ray.train.torch`). The driver
side of Ray Train is elsewhere: `cv.py` builds and fits the `TorchTrainer`, `refit.py` relays
the refit's epoch lines through a `ray.train.UserCallback`. One fit trains all k folds side by
side, epoch by epoch (the loop itself is `distmed.loop`), so each report carries a
fold-averaged signal (what a scheduler such as ASHA should compare) and a restarted worker
group resumes every fold from one checkpoint. `WorkerConfig` is what the driver hands the
workers: a typed model, a dict only while it crosses into Ray (`train_loop_config`).
"""

from __future__ import annotations

import logging
import resource
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from pydantic import BaseModel, ConfigDict, Field

from distmed import _ray_compat
from distmed.config import ExperimentConfig, TrainConfig
from distmed.data import load_cached
from distmed.data.stream import StreamSpec, stream_batches
from distmed.data.streamindex import read_plan_arrays
from distmed.loop import (
    FoldData,
    FoldRun,
    Runtime,
    build_fold,
    checkpoint_due,
    diverged,
    epoch_metrics,
    epoch_seed,
    loader_workers,
    run_fold_epoch,
)
from distmed.results import write_trial_detail
from distmed.sharedpass import BatchReader, Routes, run_shared_epoch
from distmed.task.factory import AnyTask

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FoldIndices(_Plain):
    """One fold's sample positions in the decoded images (`val` None: train only, a refit)."""

    train: list[int]
    val: list[int] | None = None


class WorkerConfig(_Plain):
    """Everything a Train worker needs for one fit (built by `cv.fit_folds`).

    It crosses into Ray as a plain dict (`to_loop_config`, Ray's `train_loop_config`) and is
    validated again on the worker's side straight away (`from_loop_config`), as the
    experiment config in it always was.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: ExperimentConfig
    images_path: str  # the decoded-image cache file (`distmed.data.load_cached`); "": streamed
    images_ref: Any = None  # a Ray ObjectRef of the same images, for nodes without the file
    labels: list[int] | list[list[float]]  # the task's targets (`Task.targets`) of the pool
    task: AnyTask  # binary, multi-class or multi-label: loss, metrics, decisions (`distmed.task`)
    folds: list[FoldIndices]
    folds_per_repeat: int | None = None  # k of the R x k folds; None: one repeat
    threads: int = Field(ge=1)  # torch threads per worker
    detail_uri: str | None = None  # where rank 0 keeps per-fold histories and predictions
    stream: StreamSpec | None = None  # data.loader stream: files decoded by Ray Data tasks
    # A streamed fit's labels and folds as a file in the run's storage (`labels` and `folds`
    # then empty here): `streamindex.write_plan_arrays`, read back by `from_loop_config`.
    plan_arrays: str | None = None

    def to_loop_config(self) -> dict[str, Any]:
        """The dict Ray carries; the ObjectRef stays an object (Ray passes it through)."""
        plain = self.model_dump(mode="json", exclude={"images_ref"})
        return {**plain, "images_ref": self.images_ref}

    @classmethod
    def from_loop_config(cls, loop_config: dict[str, Any]) -> WorkerConfig:
        if loop_config.get("plan_arrays"):
            labels, folds = read_plan_arrays(loop_config["plan_arrays"])
            loop_config = {**loop_config, "labels": labels, "folds": folds}
        return cls.model_validate(loop_config)


def train_folds(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: train every fold of a `WorkerConfig` (as a dict) in lockstep."""
    plan = WorkerConfig.from_loop_config(loop_config)
    cfg = plan.config
    _quiet_worker_logs()
    threads = plan.threads
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick kernels once
    runtime = Runtime.resolve(cfg, device)
    labels = plan.task.label_array(plan.labels)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    fold_batch = max(1, cfg.train.batch_size // world)  # this rank's share of a batch
    routes = Routes.of([(f.train, f.val) for f in plan.folds], len(labels))
    images = None if plan.stream else load_images(plan.images_path, plan.images_ref)
    folds = [
        build_fold(
            FoldData(i, spec.train, spec.val, images, labels, plan.task),
            cfg,
            runtime,
            batch_size=fold_batch,
            workers=loader_workers(device, threads),
            prepare_model=ray.train.torch.prepare_model,  # DDP
            # DistributedSampler; the batches move to the device in the loop.
            prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(
                loader, move_to_device=False
            ),
            steps_per_epoch=routes.steps_per_epoch(fold_batch, world),
        )
        for i, spec in enumerate(plan.folds)
    ]
    start_epoch = _restore(folds)
    read = None
    if plan.stream is not None:
        read = _stream_reader(plan.stream, routes.pass_batch_size(fold_batch), device)
    detail_uri, folds_per_repeat = plan.detail_uri, plan.folds_per_repeat
    if start_epoch >= cfg.train.epochs or (start_epoch and all(f.stopped for f in folds)):
        # The run had ended before it was interrupted (a killed or Ctrl-C'd search): its
        # last report may never have reached Tune, so report it again rather than nothing,
        # which would leave a finished trial without a score.
        _report(folds, start_epoch - 1, cfg.train, detail_uri, folds_per_repeat)
        start_epoch = cfg.train.epochs
    for epoch in range(start_epoch, cfg.train.epochs):
        # Shuffling and augmentation are seeded per epoch, so a run resumed from the
        # checkpoint of epoch e draws exactly what an uninterrupted run draws.
        torch.manual_seed(epoch_seed(cfg.train.seed, rank, epoch))
        if read is not None:  # one pass trains every fold, one scores them
            targets = torch.from_numpy(labels)
            run_shared_epoch(folds, epoch, cfg, runtime, routes, targets, read, rank, world)
        for fold in folds:
            if not fold.stopped and read is None:
                run_fold_epoch(fold, epoch, cfg, runtime)
        if any(diverged(f) for f in folds):
            for fold in folds:  # one fold without a score leaves the trial without one
                fold.stopped = True
        _report(folds, epoch, cfg.train, detail_uri, folds_per_repeat)
        if all(f.stopped for f in folds):
            break
    return {
        "precision": runtime.precision,
        "device": device.type,
        "channels_last": runtime.channels_last,
        "world_size": context.get_world_size(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "folds": [{"history": f.history, **f.predictions()} for f in folds],
    }


def _stream_reader(spec: StreamSpec, batch_size: int, device: torch.device) -> BatchReader:
    """The streamed `BatchReader`: Ray Data decodes ahead, pinned for a GPU's copy."""
    pin = device.type == "cuda"
    return lambda order: stream_batches(spec, order, batch_size, pin_memory=pin)


def load_images(path: str, ref: Any) -> np.ndarray:
    """The decoded images: the cache file where this node has it, else the object store copy."""
    if Path(path).is_file():
        return load_cached(Path(path))
    if ref is None:
        raise FileNotFoundError(
            f"decoded image cache {path} is not on this node and the driver did not share it; "
            "run with --address, or put data.cache_dir on storage every node mounts"
        )
    return ray.get(ref)


def _report(
    folds: list[FoldRun],
    epoch: int,
    train: TrainConfig,
    detail_uri: str | None,
    folds_per_repeat: int | None,
) -> None:
    """One report per epoch on every rank; rank 0 attaches the checkpoint of all folds when
    one is due (`checkpoint_due`).

    Rank 0 also rewrites the folds' histories and out-of-fold predictions at `detail_uri`
    before reporting: a scheduler may stop the trial at any report (ASHA does at max_t,
    even when every fold has finished), so nothing after the last report is sure to run.
    `folds_per_repeat` is k of the repeated k-fold plan, for the standard error.
    """
    epochs = train.epochs
    metrics = epoch_metrics(folds, epoch, epochs, folds_per_repeat)
    # This process's CPU seconds so far (all its threads, user + system): a trial's cost
    # that, unlike its wall time, hardly moves when other processes share the CPUs.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    metrics["worker_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    auc_text = ""
    if "cv_roc_auc" in metrics:
        auc_text = f"val ROC-AUC {metrics['cv_roc_auc']:.4f} ± {metrics['cv_roc_auc_std']:.4f}"
        if "cv_roc_auc_se" in metrics:
            auc_text += f" (SE {metrics['cv_roc_auc_se']:.4f})"
    if metrics["folds_diverged"]:
        auc_text += f"; {metrics['folds_diverged']} fold(s) diverged (loss NaN/inf)"
    log.info(
        "epoch %d/%d: train loss %.4f, %s (%d of %d folds still training)",
        epoch + 1,
        epochs,
        metrics["train_loss"],
        auc_text,
        metrics["folds_active"],
        len(folds),
    )
    if detail_uri:
        write_trial_detail(detail_uri, [{"history": f.history, **f.predictions()} for f in folds])
    if not checkpoint_due(epoch, train, last=bool(metrics["cv_complete"])):
        # A k-fold checkpoint is k models and optimisers (~0.13 GB per ResNet-18 fold);
        # on remote storage every one is an upload.
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = {"epoch": epoch + 1, "folds": [f.state_dict() for f in folds]}
        torch.save(state, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(folds: list[FoldRun]) -> int:
    """Resume every fold from the last reported checkpoint; returns the epoch to start at."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    for fold, fold_state in zip(folds, state["folds"], strict=True):
        fold.load_state_dict(fold_state)
    log.info("resumed %d folds at epoch %d", len(folds), state["epoch"])
    return int(state["epoch"])


def _quiet_worker_logs() -> None:
    """Our one progress line per epoch instead of Ray Train's per-report INFO messages."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Ray 2.60 logs every report at INFO under a logger named by its file path.
    logging.getLogger(_ray_compat.train_report_logger_name()).setLevel(logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
