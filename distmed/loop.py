"""One fold's training loop without Ray: build, step, epoch, evaluate, predict.

Owns the precision policy (`Runtime`: device, autocast precision, memory format), the
optimiser, schedule and loss builders, and the epoch bookkeeping (early stopping, divergence,
the fold-averaged report, the precise-BN recompute before validation). Gathering across
ranks uses `torch.distributed` when it is initialised; Ray Train (`distmed.worker`) only
hosts these functions.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from distmed.config import AugmentConfig, ExperimentConfig, OptimConfig, TrainConfig
from distmed.cvstats import corrected_standard_error
from distmed.data import CachedImageDataset, to_model_input
from distmed.losses import BatchMixer, LossSpec
from distmed.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    arch_of,
    build_model,
    input_normalization,
    recompute_batchnorm_statistics,
    set_train_mode,
)
from distmed.sampling import train_sampler
from distmed.task.base import Task
from distmed.tta import average_probabilities

Precision = Literal["bf16", "fp16", "off"]

# --------------------------------------------------------------------------- precision


def resolve_amp(setting: str, device: torch.device) -> Precision:
    """`train.amp` -> the precision actually used: 'bf16', 'fp16' or 'off'.

    auto: bf16 on CUDA GPUs that support it, else fp16; bf16 on CPUs with native bf16
    (AVX-512 BF16 / AMX, where it roughly doubles the step rate), else fp32.
    """
    if setting != "auto":
        return cast(Precision, setting)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "off"


def cpu_has_native_bf16() -> bool:
    # Private helpers, but the only public signal torch offers; absent ones mean "no".
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_channels_last(cfg: ExperimentConfig, device: torch.device) -> bool:
    # Measured on CPU: channels_last costs ~40% at 32 px and gains up to ~15% from 64 px up
    # (more on CPUs with AVX-512; see benchmarks/BENCHMARKS.md).
    return device.type == "cuda" or cfg.data.image_size >= 64


def loader_workers(device: torch.device, threads: int) -> int:
    """DataLoader processes per fold loader, from the CPUs this worker owns.

    None on CPU: the model needs every core, and on 2 cores loader processes were measured
    slower (benchmarks/datapath.py). On a GPU (augmentation runs there, `augment_batch`) the
    worker's spare CPUs gather and pin the next uint8 batches while the GPU computes (at
    most 8: more only costs memory).
    """
    if device.type != "cuda":
        return 0
    return max(0, min(8, threads - 1))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: its device, autocast precision and memory format, and
    the per-channel `mean`/`std` its inputs are normalised with (the weights' own)."""

    device: torch.device
    precision: Precision = "off"
    channels_last: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def resolve(cls, cfg: ExperimentConfig, device: torch.device) -> Runtime:
        """The run settings `cfg` asks for on `device` (`train.amp`, the image size, the
        arch's weights' normalisation)."""
        mean, std = input_normalization(cfg.model)
        precision = resolve_amp(cfg.train.amp, device)
        return cls(device, precision, resolve_channels_last(cfg, device), mean, std)


def model_inputs(
    images: torch.Tensor, runtime: Runtime, augment: AugmentConfig | None = None
) -> torch.Tensor:
    """A uint8 batch on the runtime's device, augmented, normalised, in its memory format."""
    inputs = to_model_input(
        images.to(runtime.device, non_blocking=True), augment, runtime.mean, runtime.std
    )
    return in_memory_format(inputs, runtime)


def in_memory_format(inputs: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return inputs.contiguous(memory_format=torch.channels_last) if runtime.channels_last else inputs


# --------------------------------------------------------------------------- one fold


@dataclass
class FoldRun:
    """A fold's model, optimiser, loaders and early-stopping state on this rank."""

    index: int
    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    train_loader: DataLoader | None  # None: batches come from a stream (`distmed.sharedpass`)
    val_loader: DataLoader | None
    augment: AugmentConfig | None = None  # training batches only, applied on the device
    # The recipe (docs/training.md): mixup/cutmix of training batches, the EMA of
    # the weights (what is validated and saved when set), batches per optimiser step.
    mixer: BatchMixer | None = None
    ema: torch.optim.swa_utils.AveragedModel | None = None
    accumulate_steps: int = 1
    best_auc: float = -math.inf
    epochs_since_best: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    # The latest validation pass: sample positions, true labels and class probabilities.
    val_indices: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    val_probs: torch.Tensor | None = None
    val_count: int = 0  # validation images of a streamed fold (its loader's otherwise)

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved: the EMA of the weights when on, else the model."""
        return self.model if self.ema is None else self.ema.module

    def state_dict(self) -> dict[str, Any]:
        # "model" is what refit and the fold ensemble read back: the EMA when on. The
        # trained weights and the EMA's step count ride along so a resumed run goes on.
        extra = {}
        if self.ema is not None:
            extra = {
                "trained_model": unwrap(self.model).state_dict(),
                "ema_steps": int(self.ema.n_averaged),
            }
        return {
            "model": unwrap(self.eval_model).state_dict(),
            **extra,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_auc": self.best_auc,
            "epochs_since_best": self.epochs_since_best,
            "stopped": self.stopped,
            "history": self.history,
            "val_indices": self.val_indices,
            "val_labels": self.val_labels,
            "val_probs": self.val_probs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is None:
            unwrap(self.model).load_state_dict(state["model"])
        else:
            unwrap(self.model).load_state_dict(state["trained_model"])
            self.ema.module.load_state_dict(state["model"])
            self.ema.n_averaged.fill_(state["ema_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_auc = state["best_auc"]
        self.epochs_since_best = state["epochs_since_best"]
        self.stopped = state["stopped"]
        self.history = state["history"]
        self.val_indices = state.get("val_indices")
        self.val_labels = state.get("val_labels")
        self.val_probs = state.get("val_probs")

    def validation_size(self) -> int:
        """How many images validate the fold (0: a refit, train only)."""
        if self.val_loader is not None:
            return len(cast(Sized, self.val_loader.dataset))
        return self.val_count

    def predictions(self) -> dict[str, list]:
        """The fold's out-of-fold validation predictions (empty before any validation)."""
        names = ("val_indices", "val_labels", "val_probs")
        values = (self.val_indices, self.val_labels, self.val_probs)
        return {n: [] if v is None else v.tolist() for n, v in zip(names, values, strict=True)}

    def update_stopping(self, auc: float, patience: int | None) -> None:
        """Early stopping on validation ROC-AUC; the fold is scored where it stops."""
        if auc > self.best_auc:
            self.best_auc, self.epochs_since_best = auc, 0
        else:
            self.epochs_since_best += 1
        if patience is not None and self.epochs_since_best >= patience:
            self.stopped = True


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside torch.compile's and DDP's wrappers (its state dict's keys are bare)."""
    model = unwrap_compiled(model)  # torch.compile wraps the DDP wrapper (build_fold)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return cast(nn.Module, model.module)
    return model


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module torch.compile compiled (`model` itself when not compiled)."""
    return cast(nn.Module, getattr(model, "_orig_mod", model))


@dataclass(frozen=True)
class FoldData:
    """A fold's sample positions in the decoded images, and the images and labels themselves.

    `images` None: the fold's batches are streamed (`distmed.sharedpass`), so it gets no
    loaders and `build_fold` needs the steps per epoch.
    """

    index: int
    train: Sequence[int]
    val: Sequence[int] | None
    images: np.ndarray | None
    labels: np.ndarray
    task: Task


def build_fold(
    data: FoldData,
    cfg: ExperimentConfig,
    runtime: Runtime,
    batch_size: int,
    workers: int = 0,
    prepare_model: Callable[[nn.Module], nn.Module] = lambda model: model,
    prepare_loader: Callable[[DataLoader], DataLoader] = lambda loader: loader,
    steps_per_epoch: int | None = None,
) -> FoldRun:
    """A fold's model, optimiser, schedule, loss and loaders.

    The Ray Train loop passes Ray's `prepare_*` functions (DDP wrap, distributed sampler);
    the benchmarks and the GPU tests pass none. A streamed fold (`data.images` None) gets
    no loaders; its schedule is laid out over `steps_per_epoch`.
    """
    torch.manual_seed(cfg.train.seed + data.index)  # same initial weights on every rank
    # On the device here, not only in Ray's prepare_model: the fold also runs without Ray
    # (benchmarks, the GPU tests), and Ray's move is then a no-op.
    model = build_model(cfg.model, data.task.num_outputs).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = build_ema(model, cfg.train.ema_decay)  # before DDP's wrap: a copy of the network
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(param_groups(model, trained, cfg.optim), cfg.optim)
    model = prepare_model(model)
    if cfg.train.compile:
        model = cast(nn.Module, torch.compile(model))
    train_idx = np.asarray(data.train, dtype=np.int64)
    train_loader = val_loader = None
    if data.images is not None:
        train_set = fold_dataset(data.images, data.labels, train_idx)
        sampler = train_sampler(
            cfg.train.sampler, train_set, data.labels[train_idx], cfg.train.seed, data.index
        )
        train_loader = prepare_loader(_loader(train_set, batch_size, True, workers, sampler))
        steps_per_epoch = len(train_loader)
    if data.images is not None and data.val is not None and len(data.val) > 0:
        val_set = fold_dataset(data.images, data.labels, np.asarray(data.val, dtype=np.int64))
        val_loader = prepare_loader(_loader(val_set, batch_size, False, workers))
    assert steps_per_epoch is not None, "a streamed fold needs steps_per_epoch"
    device = runtime.device
    steps = math.ceil(steps_per_epoch / cfg.train.accumulate_steps)  # optimiser steps
    return FoldRun(
        index=data.index,
        task=data.task,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.optim, cfg.train.epochs, steps),
        scaler=torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16"),
        loss_fn=build_loss(cfg.train, data.labels[train_idx], data.task, device),
        train_loader=train_loader,
        val_loader=val_loader,
        augment=cfg.data.augment,
        mixer=build_mixer(cfg.train, data.task),
        ema=ema,
        accumulate_steps=cfg.train.accumulate_steps,
        val_count=len(data.val) if data.images is None and data.val is not None else 0,
    )


class TargetRowsDataset(CachedImageDataset):
    """`CachedImageDataset` whose label is a row of targets: `(uint8 image, float32 (L,)
    targets with NaN where ignored, sample index)`; batches collate to (B, L) float32."""

    def __getitem__(self, position: int) -> tuple[torch.Tensor, Any, int]:
        index = int(self.indices[position])
        row = torch.from_numpy(np.asarray(self.labels[index], dtype=np.float32))
        return torch.from_numpy(np.array(self.images[index])), row, index


def fold_dataset(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> CachedImageDataset:
    """The dataset of some samples: class-index labels (N,), or rows of targets (N, L)."""
    if np.asarray(labels).ndim == 2:
        return TargetRowsDataset(images, labels, indices)
    return CachedImageDataset(images, labels, indices)


def _loader(
    dataset: CachedImageDataset,
    batch_size: int,
    train: bool,
    workers: int,
    sampler: Sampler[int] | None = None,
) -> DataLoader:
    # Training drops the ragged last batch: a batch of one breaks BatchNorm.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        persistent_workers=workers > 0,  # not re-forked every epoch
        pin_memory=torch.cuda.is_available(),
    )


# Devices with fused optimizer kernels: the whole update of every tensor in one kernel instead
# of a Python loop over them. On a 2-core CPU a ResNet-18's AdamW step took 7.5 ms fused
# against 25.6 ms (and 24.8 ms with foreach), a share that grows as batches shrink.
_FUSED_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def build_optimizer(
    params: list[nn.Parameter] | list[dict[str, Any]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """`cfg.name`'s optimiser over `params` (tensors, or param groups with their own `lr`)."""
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.device.type in _FUSED_DEVICES for p in tensors) or None  # None: torch's pick
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
        )
    optimizer_class = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def param_groups(
    model: nn.Module, trained: list[nn.Parameter], cfg: OptimConfig
) -> list[dict[str, Any]]:
    """The trained parameters in groups with layer-wise decayed learning rates.

    Layer-wise lr decay (Clark et al. 2020, ELECTRA; BEiT; timm's `--layer-decay`) over the
    architecture table's stages: the head (and any parameter outside every stage) trains at
    `lr`, the k-th stage below it (k = 1 for the stage next to the head, ..., the stem last)
    at `lr * layer_decay**k`. With `layer_decay` 1 it is one group at `lr`, as before.
    """
    if cfg.layer_decay == 1.0:
        return [{"params": trained, "lr": cfg.lr}]
    wanted = {id(p) for p in trained}
    groups: list[dict[str, Any]] = []
    placed: set[int] = set()
    for k, (name, modules) in enumerate(arch_of(model).stage_modules(model).items(), start=1):
        params = [p for m in modules for p in m.parameters() if id(p) in wanted]
        params = [p for p in params if id(p) not in placed]
        placed.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": cfg.lr * cfg.layer_decay**k, "stage": name})
    head = [p for p in trained if id(p) not in placed]
    return [{"params": head, "lr": cfg.lr, "stage": "head"}, *groups]


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of `model`'s weights (`train.ema_decay`; 0: None).

    torch's `AveragedModel` with `get_ema_multi_avg_fn`: after each optimiser step
    W_ema <- decay * W_ema + (1 - decay) * W. It is updated once here, so it starts at the
    initial weights and the first step gives exactly that formula (torch's first update
    would copy). `use_buffers=True`: BatchNorm's running statistics are averaged with the
    same decay as the weights (as timm's ModelEmaV3 does), so the EMA's BN statistics
    match its weights without an extra pass over the data (`update_bn`).
    """
    if decay == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)
    return ema


def build_mixer(cfg: TrainConfig, task: Task) -> BatchMixer | None:
    """Mixup/cutmix of training batches (`train.mixup_alpha`, `train.cutmix_alpha`), or None."""
    if cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0:
        return None
    return BatchMixer(cfg.mixup_alpha, cfg.cutmix_alpha, task.num_outputs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up, then cosine decay to zero (or constant)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    main: torch.optim.lr_scheduler.LRScheduler
    if cfg.schedule == "constant":
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def build_loss(
    cfg: TrainConfig, train_labels: np.ndarray, task: Task, device: torch.device | str
) -> nn.Module:
    """The task's loss; `train.class_weights: balanced` weighs classes by n / (K * n_k), or
    findings by their negatives / positives (`Task.class_weights`, on the training fold);
    `train.loss`, `train.focal_gamma` and `train.label_smoothing` shape it (`LossSpec`)."""
    spec = LossSpec(cfg.label_smoothing, cfg.focal_gamma if cfg.loss == "focal" else None)
    if cfg.class_weights == "none":
        return task.build_loss(None, device, spec)
    return task.build_loss(task.class_weights(train_labels), device, spec)


# --------------------------------------------------------------------------- steps and epochs


def train_step(
    fold: FoldRun,
    images: torch.Tensor,
    labels: torch.Tensor,
    runtime: Runtime,
    share: float = 1.0,
    step: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's gradients (and an optimiser step); (loss, logits, labels), detached.

    The batch moves to the device, is augmented and normalised there (`to_model_input`),
    mixed (`fold.mixer`: the loss sees the mixed targets, the returned labels are the
    batch's own), runs under the runtime's precision (the GradScaler scales only for fp16).
    Gradient accumulation: the loss is scaled by `share` (1 / the batches of this optimiser
    step) and added to the gradients; only with `step` does the optimiser step, the EMA
    follow and the schedule advance (and DDP all-reduce: the other batches run `no_sync`).
    Nothing waits for the device: the caller decides when to read the results.
    """
    inputs = model_inputs(images, runtime, fold.augment)
    labels = labels.to(runtime.device, non_blocking=True)
    targets = labels
    if fold.mixer is not None:
        inputs, targets = fold.mixer(inputs, labels)
    sync = contextlib.nullcontext()
    if not step and isinstance(unwrap_compiled(fold.model), nn.parallel.DistributedDataParallel):
        sync = unwrap_compiled(fold.model).no_sync()  # type: ignore[operator]
    with sync:
        with autocast(runtime.device, runtime.precision):
            logits = fold.model(inputs)
            loss = fold.loss_fn(logits, targets)
        fold.scaler.scale(loss * share if share != 1.0 else loss).backward()
    if step:
        fold.scaler.step(fold.optimizer)
        fold.scaler.update()
        fold.optimizer.zero_grad(set_to_none=True)
        fold.scheduler.step()
        if fold.ema is not None:
            fold.ema.update_parameters(unwrap(fold.model))
    return loss.detach(), logits.detach(), labels


def accumulation_plan(batches: int, k: int) -> list[tuple[float, bool]]:
    """Per batch of an epoch: (its share of the step's loss, whether the optimiser steps).

    Groups of `k` batches make one step, each batch weighing 1/k; a ragged last group of r
    batches weighs 1/r each, so every step averages the batches it saw.
    """
    plan = []
    for start in range(0, batches, k):
        size = min(k, batches - start)
        plan += [(1.0 / size, i == size - 1) for i in range(size)]
    return plan


def train_one_epoch(fold: FoldRun, runtime: Runtime) -> dict[str, float]:
    """One pass over the fold's training data; loss, accuracy and ROC-AUC over all ranks.

    Accuracy and ROC-AUC come from the logits of the training steps themselves (model in
    training mode, augmented images, weights moving): a cheap, slightly pessimistic train
    curve, not a second pass. Probabilities stay on the device until the epoch ends, so
    there is no host sync per step.
    """
    assert fold.train_loader is not None, "a streamed fold trains in distmed.sharedpass"
    set_train_mode(fold.model)
    tally = TrainTally.start(runtime)
    fold.optimizer.zero_grad(set_to_none=True)
    plan = accumulation_plan(len(fold.train_loader), fold.accumulate_steps)
    for (images, batch_labels, _), (share, step) in zip(fold.train_loader, plan, strict=True):
        tally.add(fold, *train_step(fold, images, batch_labels, runtime, share, step))
    return finish_train_epoch(fold, tally)


@dataclass
class TrainTally:
    """A fold's training epoch so far on this rank: loss sum, images, outputs (on device)."""

    total: torch.Tensor
    count: torch.Tensor
    started: float
    probs: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(cls, runtime: Runtime) -> TrainTally:
        total, count = torch.zeros(2, device=runtime.device, dtype=torch.float64)
        return cls(total, count, time.perf_counter())

    def add(self, fold: FoldRun, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
        """Count one `train_step`'s (loss, logits, labels)."""
        self.total += loss.double() * len(labels)
        self.count += len(labels)
        self.probs.append(fold.task.probabilities(logits))
        self.labels.append(labels)


def finish_train_epoch(fold: FoldRun, tally: TrainTally) -> dict[str, float]:
    """`train_one_epoch`'s result from a tally: loss, accuracy, ROC-AUC and images/s over all
    ranks (every rank calls it for the same folds in the same order: it gathers)."""
    sums = torch.stack([tally.total, tally.count])
    if dist.is_initialized():
        dist.all_reduce(sums)
    # float() waits for the device, so the time covers every step of every rank.
    images_per_s = float(sums[1]) / (time.perf_counter() - tally.started)
    labels_all, probs_all = _gather_arrays(torch.cat(tally.labels), torch.cat(tally.probs))
    scores = {"accuracy": math.nan, "roc_auc": math.nan}  # diverged outputs have no score
    if np.isfinite(probs_all).all():
        scores = fold.task.metrics(labels_all, probs_all)
    return {
        "loss": float(sums[0] / sums[1]),
        "accuracy": scores["accuracy"],
        "roc_auc": scores["roc_auc"],
        "images_per_s": images_per_s,
    }


def _gather_arrays(labels: torch.Tensor, probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's (labels, probabilities) on every rank, as numpy arrays."""
    local = (labels.cpu().numpy(), probs.cpu().numpy())
    if not dist.is_initialized():
        return local
    shards: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, local)
    return np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards])


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    task: Task,
    tta: AugmentConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample indices, labels, class probabilities) over the whole loader, from every rank.

    `tta`: the test-time augmentation (`distmed.tta`) whose views' probabilities are averaged.
    `DistributedSampler` pads the last shard by repeating samples; duplicates are dropped by
    sample index, so the result covers each validation sample exactly once.
    """
    model.eval()
    indices, labels, probs = [], [], []
    for images, batch_labels, batch_indices in loader:
        probs.append(predict_batch(model, images, runtime, task, tta))
        labels.append(batch_labels)
        indices.append(batch_indices)
    local = (torch.cat(indices).numpy(), torch.cat(labels).numpy(), torch.cat(probs).numpy())
    return gather_predictions(local)


def predict_batch(
    model: nn.Module,
    images: torch.Tensor,
    runtime: Runtime,
    task: Task,
    tta: AugmentConfig | None = None,
) -> torch.Tensor:
    """Probabilities of one uint8 batch, on the host (the model in eval mode), averaged over
    the test-time augmentation's views when `tta` asks for them (`distmed.tta`)."""
    with autocast(runtime.device, runtime.precision):
        probs = average_probabilities(
            model,
            images.to(runtime.device, non_blocking=True),
            task.probabilities,
            tta,
            lambda inputs: in_memory_format(inputs, runtime),
            (runtime.mean, runtime.std),
        )
    return probs.cpu()


def gather_predictions(
    local: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's (indices, labels, probabilities) joined with every rank's, each sample
    once, by index (every rank calls it for the same folds in the same order: it gathers)."""
    shards: list[Any] = [local]
    if dist.is_initialized():
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, local)
    all_indices = np.concatenate([s[0] for s in shards])
    unique, first = np.unique(all_indices, return_index=True)
    return (
        unique,
        np.concatenate([s[1] for s in shards])[first],
        np.concatenate([s[2] for s in shards])[first],
    )


def evaluate(fold: FoldRun, runtime: Runtime) -> dict[str, float] | None:
    """Validation metrics of the fold's model; None when its outputs are not finite."""
    assert fold.val_loader is not None, "evaluate needs a fold with validation data"
    return score_validation(
        fold, *predict(fold.eval_model, fold.val_loader, runtime, fold.task, fold.augment)
    )


def score_validation(
    fold: FoldRun, indices: np.ndarray, labels: np.ndarray, probs: np.ndarray
) -> dict[str, float] | None:
    """The fold's validation metrics from its gathered predictions (kept as its out-of-fold
    scores); None when the outputs are not finite."""
    if not np.isfinite(probs).all():
        return None
    # The latest epoch's predictions are the fold's out-of-fold scores once it stops.
    fold.val_indices, fold.val_labels, fold.val_probs = (
        torch.from_numpy(a) for a in (indices, labels, probs)
    )
    result = fold.task.metrics(labels, probs)
    result["loss"] = fold.task.nll(labels, probs)
    result["num_samples"] = len(labels)
    return result


def run_fold_epoch(fold: FoldRun, epoch: int, cfg: ExperimentConfig, runtime: Runtime) -> None:
    """Train and validate one fold for one epoch; append its record to `fold.history`."""
    # Ray's prepare_data_loader puts a DistributedSampler there: reshuffle per epoch.
    set_epoch = getattr(getattr(fold.train_loader, "sampler", None), "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    train = train_one_epoch(fold, runtime)
    if math.isfinite(train["loss"]):  # before validation and the epoch's checkpoint
        recompute_fold_batchnorm(fold, epoch, cfg, runtime)
    close_epoch(fold, epoch, cfg, train, lambda: evaluate(fold, runtime))


def precise_bn_positions(size: int, count: int, seed: int, fold: int, epoch: int) -> np.ndarray:
    """Which of a fold's `size` training images recompute its BatchNorm statistics after
    `epoch`: the first `count` (all when fewer) of a permutation seeded by (`train.seed`,
    fold, epoch) only, so every DDP rank picks the same images and ends with the same
    statistics without communicating."""
    rng = np.random.default_rng([seed % 2**64, fold, epoch])  # SeedSequence takes no negatives
    return rng.permutation(size)[: min(count, size)]


def recompute_fold_batchnorm(
    fold: FoldRun, epoch: int, cfg: ExperimentConfig, runtime: Runtime
) -> int:
    """Precise BN (`train.precise_bn_images`): recompute the running statistics of the
    model that is validated and saved (`fold.eval_model`, the EMA's copy when on) from
    `precise_bn_positions` of the fold's training images, un-augmented as validation builds
    its inputs, in batches of the training batch size on this rank (train-mode BatchNorm
    normalises each batch by its own statistics, so the batch size shapes later layers'
    inputs). See `distmed.model.recompute_batchnorm_statistics`.

    Why: from random init, weights move faster than BatchNorm's running averages follow
    (momentum 0.1 remembers ~10 steps), and depthwise/squeeze-excitation stacks cascade the
    mismatch: an EfficientNet-B0 after one epoch on PneumoniaMNIST validated at ROC-AUC 0.50
    in eval mode with the same weights scoring 0.88 after a recompute (issue #33).

    Cost: one forward pass (no backward) over up to that many images per fold and epoch.
    Every rank forwards the same images through the unwrapped network (no DDP buffer
    broadcast, no communication). Returns the images used (0: off, or no training loader).
    """
    count = cfg.train.precise_bn_images
    if count == 0 or fold.train_loader is None:
        return 0
    dataset = cast(CachedImageDataset, fold.train_loader.dataset)
    chosen = dataset.indices[
        precise_bn_positions(len(dataset), count, cfg.train.seed, fold.index, epoch)
    ]
    batch_size = fold.train_loader.batch_size or len(chosen)
    groups = np.array_split(chosen, max(1, math.ceil(len(chosen) / batch_size)))

    def batches() -> Iterator[torch.Tensor]:
        for rows in groups:  # near-equal sizes: no ragged batch of one
            yield model_inputs(torch.from_numpy(np.asarray(dataset.images[rows])), runtime)

    with autocast(runtime.device, runtime.precision):
        return recompute_batchnorm_statistics(unwrap(fold.eval_model), batches())


def close_epoch(
    fold: FoldRun,
    epoch: int,
    cfg: ExperimentConfig,
    train: dict[str, float],
    validate: Callable[[], dict[str, float] | None],
) -> None:
    """Record a fold's epoch: its training metrics, `validate()`'s metrics (called only when
    training stayed finite and the fold has validation images), early stopping, divergence."""
    record = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()}}
    val = None
    if math.isfinite(record["train_loss"]) and fold.validation_size() > 0:
        val = validate()
        if val is not None:
            record.update({f"val_{k}": v for k, v in val.items()})
            fold.update_stopping(val["roc_auc"], cfg.train.patience)
    if not math.isfinite(record["train_loss"]) or (fold.validation_size() > 0 and val is None):
        # Diverged (NaN/inf): the fold has no score. Its metrics are NaN, so the CV mean
        # is NaN too and a search never ranks the trial by its surviving folds.
        fold.stopped = True
        record["diverged"] = 1.0
        record.update({f"val_{k}": math.nan for k in (*fold.task.metric_keys, "loss")})
        if fold.validation_size() > 0:  # how many images the fold would have been scored on
            record["val_num_samples"] = fold.validation_size()
    fold.history.append(record)


def diverged(fold: FoldRun) -> bool:
    return bool(fold.history and fold.history[-1].get("diverged"))


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The RNG seed of one rank's epoch: distinct per rank and epoch, fixed by `train.seed`."""
    return (seed * 100_003 + epoch) * 1_009 + rank


def epoch_metrics(
    folds: list[FoldRun], epoch: int, epochs: int, folds_per_repeat: int | None = None
) -> dict[str, float]:
    """What every rank reports after an epoch: fold-averaged validation AUC and progress.

    `cv_roc_auc` is the mean over all R x k folds, `cv_roc_auc_std` their (population)
    standard deviation, `cv_roc_auc_se` the mean's corrected standard error, which needs
    k = `folds_per_repeat` (None: the folds are one repeat).
    """
    latest = [f.history[-1] for f in folds if f.history]
    aucs = [r["val_roc_auc"] for r in latest if "val_roc_auc" in r]
    metrics: dict[str, float] = {
        "epoch": epoch + 1,
        "train_loss": float(np.mean([r["train_loss"] for r in latest])),
        "folds_active": sum(not f.stopped for f in folds),
        "folds_diverged": sum(diverged(f) for f in folds),
        # 1 on the run's last report: every fold reached its stopping rule. A search tells
        # Optuna a trial's score only when this is set (see distmed.search).
        "cv_complete": int(epoch + 1 == epochs or all(f.stopped for f in folds)),
    }
    if aucs:
        metrics.update(cv_roc_auc=float(np.mean(aucs)), cv_roc_auc_std=float(np.std(aucs)))
        if len(aucs) > 1:
            k = folds_per_repeat or len(aucs)
            metrics["cv_roc_auc_se"] = corrected_standard_error(aucs, k)
        for fold, record in zip(folds, latest, strict=True):
            metrics[f"fold{fold.index}_roc_auc"] = record["val_roc_auc"]
            metrics[f"fold{fold.index}_epoch"] = record["epoch"]
        metrics.update(_finding_means(latest))
    return metrics


def _finding_means(latest: list[dict[str, float]]) -> dict[str, float]:
    """Several findings per image: `cv_roc_auc/<finding>`, each finding's fold-mean ROC-AUC
    over the folds where it is defined (what W&B, TensorBoard and MLflow show per trial)."""
    keys = [k for k in latest[0] if k.startswith("val_roc_auc/")] if latest else []
    out = {}
    for key in keys:
        values = [r[key] for r in latest if np.isfinite(r.get(key, math.nan))]
        out[f"cv_{key[len('val_') :]}"] = float(np.mean(values)) if values else math.nan
    return out


def checkpoint_due(epoch: int, train: TrainConfig, last: bool) -> bool:
    """Whether the report after 0-based `epoch` carries a checkpoint: every
    `train.checkpoint_every` epochs, and always on the run's last report (what a refit or
    `cross_validate` reads back)."""
    return last or (epoch + 1) % train.checkpoint_every == 0


def checkpoint_bytes(cfg: ExperimentConfig, num_classes: int, num_folds: int) -> int:
    """About how many bytes one checkpoint of `num_folds` folds takes (the state.pt of all).

    Each fold stores its model (parameters and buffers) and the optimiser state of the
    trained parameters: two moments for Adam/AdamW, one momentum buffer for SGD; with
    `train.ema_decay` the EMA's copy of the model too. The model is built on the meta
    device: nothing is allocated or downloaded.
    """
    with torch.device("meta"):
        model = build_model(cfg.model.model_copy(update={"weights": "none"}), num_classes)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = 2 if cfg.optim.name in ("adam", "adamw") else int(cfg.optim.momentum > 0)
    ema = model_bytes if cfg.train.ema_decay > 0 else 0  # the trained weights ride along
    return num_folds * (model_bytes + moments * trained + ema)
