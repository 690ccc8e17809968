"""One pass over the CV pool per epoch trains every fold; a second scores every fold.

The streamed loader's epoch (`data.loader: stream`). Decoding is its cost, so the pool is
read once for training and once for validation per epoch, whatever k is: each image trains
the k-1 folds it does not validate and validates the one it does, so a batch of the pool is
split by fold (`Routes`) and each fold steps on its share. k filtered passes would decode
(k-1) x N images for training alone (benchmarks/stream.py measures both). The per-batch
steps are `distmed.loop`'s (`train_step`, `predict_batch`), the epoch's bookkeeping too
(`finish_train_epoch`, `score_validation`, `close_epoch`), so both loaders train alike.

Batches come from a `BatchReader`: given pool positions in reading order, it yields (uint8
images (B, C, S, S), positions (B,)) batches in that order. `distmed.data.stream` reads
through Ray Data; `array_reader` reads an in-memory array (tests, benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from distmed.config import ExperimentConfig
from distmed.data.stream import epoch_positions
from distmed.loop import (
    FoldRun,
    Runtime,
    TrainTally,
    close_epoch,
    finish_train_epoch,
    gather_predictions,
    predict_batch,
    score_validation,
    train_step,
)
from distmed.model import set_train_mode

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, C, S, S), pool positions (B,)
BatchReader = Callable[[np.ndarray], Iterable[Batch]]
# A fold's share of a batch smaller than this is skipped on every rank: a training batch of
# one image breaks BatchNorm, and DDP needs every rank to step together.
MIN_SHARE = 2


@dataclass(frozen=True)
class Routes:
    """Which folds each pool position trains and validates: (folds, N) boolean masks."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def of(cls, specs: Sequence[tuple[Sequence[int], Sequence[int] | None]], size: int) -> Routes:
        """From each fold's (train positions, validation positions or None)."""
        train = np.zeros((len(specs), size), dtype=bool)
        val = np.zeros((len(specs), size), dtype=bool)
        for fold, (train_positions, val_positions) in enumerate(specs):
            train[fold, np.asarray(train_positions, dtype=np.int64)] = True
            if val_positions is not None:
                val[fold, np.asarray(val_positions, dtype=np.int64)] = True
        return cls(train, val)

    def positions(self, folds: Sequence[int], train: bool) -> np.ndarray:
        """Pool positions that train (or validate) at least one of `folds`."""
        masks = (self.train if train else self.val)[list(folds)]
        return np.flatnonzero(masks.any(axis=0))

    def pass_batch_size(self, fold_batch: int) -> int:
        """The pass's batch size that gives each fold about `fold_batch` images a step."""
        share = self.train.sum(axis=1).mean() / self.train.shape[1]
        return max(fold_batch, math.ceil(fold_batch / share))

    def steps_per_epoch(self, fold_batch: int, world: int) -> int:
        """Training steps each fold takes per epoch on each rank (its schedule's unit)."""
        rows = len(self.positions(range(len(self.train)), train=True)) // world
        return max(1, math.ceil(rows / self.pass_batch_size(fold_batch)))


def array_reader(images: np.ndarray, batch_size: int) -> BatchReader:
    """A `BatchReader` over decoded images in memory (or memory-mapped)."""

    def read(positions: np.ndarray) -> Iterable[Batch]:
        for start in range(0, len(positions), batch_size):
            chunk = np.asarray(positions[start : start + batch_size], dtype=np.int64)
            yield torch.from_numpy(np.asarray(images[chunk])), torch.from_numpy(chunk)

    return read


def train_pass(
    folds: Sequence[FoldRun],
    batches: Iterable[Batch],
    routes: Routes,
    labels: torch.Tensor,
    runtime: Runtime,
) -> dict[int, dict[str, float]]:
    """One training epoch of every fold in `folds` from one pass; fold index -> metrics.

    Each batch is split by `routes.train`; a fold whose share is below MIN_SHARE on any rank
    skips that batch on every rank (ranks agree through one all-reduce per batch).
    """
    tallies = {fold.index: TrainTally.start(runtime) for fold in folds}
    for fold in folds:
        set_train_mode(fold.model)
    rows = [fold.index for fold in folds]
    for images, positions in batches:
        where = positions.numpy()
        masks = routes.train[rows][:, where]
        shares = torch.as_tensor(masks.sum(axis=1), device=runtime.device)
        if dist.is_initialized():
            dist.all_reduce(shares, op=dist.ReduceOp.MIN)
        for fold, mask, share in zip(folds, masks, shares.tolist(), strict=True):
            if share < MIN_SHARE:
                continue
            pick = torch.from_numpy(mask)
            step = train_step(fold, images[pick], labels[positions[pick]], runtime)
            tallies[fold.index].add(fold, *step)
    return {fold.index: finish_train_epoch(fold, tallies[fold.index]) for fold in folds}


@torch.no_grad()
def validation_pass(
    folds: Sequence[FoldRun],
    batches: Iterable[Batch],
    routes: Routes,
    labels: torch.Tensor,
    runtime: Runtime,
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every fold's validation predictions from one pass, gathered over ranks, each image
    once: fold index -> (positions, labels, probabilities)."""
    for fold in folds:
        fold.eval_model.eval()  # the EMA copy when train.ema_decay is on, as the cache's loop
    parts: dict[int, list[list[torch.Tensor]]] = {fold.index: [[], [], []] for fold in folds}
    for images, positions in batches:
        where = positions.numpy()
        for fold in folds:
            mask = routes.val[fold.index, where]
            if not mask.any():
                continue
            pick = torch.from_numpy(mask)
            chosen = positions[pick]
            part = parts[fold.index]
            part[0].append(chosen)
            part[1].append(labels[chosen])
            part[2].append(
                predict_batch(fold.eval_model, images[pick], runtime, fold.task, fold.augment)
            )
    gathered = {}
    for fold in folds:  # in the same order on every rank: each gathers
        index, truth, probs = parts[fold.index]
        local = (
            torch.cat(index).numpy() if index else np.zeros(0, dtype=np.int64),
            torch.cat(truth).numpy() if truth else labels[:0].numpy(),
            torch.cat(probs).numpy() if probs else np.zeros((0, fold.task.num_outputs)),
        )
        gathered[fold.index] = gather_predictions(local)
    return gathered


def run_shared_epoch(
    folds: Sequence[FoldRun],
    epoch: int,
    cfg: ExperimentConfig,
    runtime: Runtime,
    routes: Routes,
    labels: torch.Tensor,
    read: BatchReader,
    rank: int = 0,
    world: int = 1,
) -> None:
    """Train every fold still training for one epoch from one seeded pass, score them from
    a second, and record each fold's epoch as `loop.run_fold_epoch` does."""
    active = [fold for fold in folds if not fold.stopped]
    if not active:
        return
    ids = [fold.index for fold in active]
    order = epoch_positions(routes.positions(ids, True), cfg.train.seed, epoch, rank, world, True)
    trained = train_pass(active, read(order), routes, labels, runtime)
    scored = [f for f in active if math.isfinite(trained[f.index]["loss"]) and f.val_count > 0]
    predictions: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if scored:
        ids = [fold.index for fold in scored]
        order = epoch_positions(routes.positions(ids, False), 0, epoch, rank, world, False)
        predictions = validation_pass(scored, read(order), routes, labels, runtime)
    for fold in active:
        close_epoch(
            fold,
            epoch,
            cfg,
            trained[fold.index],
            lambda fold=fold: score_validation(fold, *predictions[fold.index]),  # type: ignore[misc]
        )
