"""The training loops that the throughput benchmark sets beside distmed's Ray Train path.

`plain`: distmed's own model, precision, memory format, optimiser and input conversion over
its cached tensors (`CachedImageDataset`; the default augmentation in batch), with no Ray.
`imagefolder`: the usual hand-written baseline: `ImageFolder` + PIL decoding + Resize,
RandomHorizontalFlip, RandomRotation, ToTensor, Normalize per image every epoch (the same
augmentation as distmed's), a torchvision ResNet, fp32, NCHW.
Each runs in a process of its own (`python -m benchmarks.loops ...`, started by
`benchmarks.throughput`), so the peak resident memory it reports is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import CpuSnapshot, imagefolder_transform, median, peak_rss_mib
from distmed.config import ExperimentConfig, validate_config

Step = Callable[[], None]


@dataclass(frozen=True)
class LoopBudget:
    """How long one loop is timed: steps per repeat and repeats are fitted to these seconds.

    A repeat is `steps` consecutive training steps timed together (data loading included);
    both counts are sized from the warm-up step, which is slower than the steady state, so
    the real time spent stays under the targets except where the minimums force more.
    """

    repeat_seconds: float = 2.0  # target length of one timed repeat
    cell_seconds: float = 6.0  # target timed seconds of all repeats together
    min_steps: int = 2
    max_repeats: int = 3
    # Untimed steps first; the last one sizes the repeats. One on a CPU; a GPU needs a few
    # (cuDNN's kernel search, the caching allocator, loader processes starting).
    warmup_steps: int = 1


@dataclass(frozen=True)
class LoopSpec:
    arch: str
    image_size: int
    batch_size: int
    threads: int


# --------------------------------------------------------------------------- (b) plain loop


def experiment_config(
    spec: LoopSpec, data: Path, cache_dir: Path, epochs: int = 2
) -> ExperimentConfig:
    """The config the Ray path runs with (`--set` overrides of the throughput benchmark)."""
    return validate_config(
        {
            "data": {"root": str(data), "image_size": spec.image_size, "cache_dir": str(cache_dir)},
            "model": {"arch": spec.arch, "weights": "none"},
            "train": {"batch_size": spec.batch_size, "epochs": epochs, "amp": "auto"},
            "cv": {"folds": 2},
        },
        "benchmark",
    )


def build_plain_step(
    spec: LoopSpec,
    data: Path,
    cache_dir: Path,
    device: torch.device | None = None,
    workers: int = 0,
) -> tuple[Step, dict[str, Any]]:
    """One training step of distmed's worker loop, minus Ray, over distmed's cached tensors.

    The fold comes from `distmed.loop.build_fold` (the worker's model factory, memory format,
    optimiser, schedule, loss and loader, without Ray's wrappers) over the whole pool, and the
    step is the worker's own `train_step`: same conversion, augmentation, precision and
    GradScaler; left out is only the epoch's metric bookkeeping (a softmax per step).
    `device` defaults to the CPU; `workers` are the fold loaders' processes.
    """
    from distmed.data import build_cache, load_cached, scan_source
    from distmed.loop import FoldData, Runtime, build_fold, train_step
    from distmed.model import set_train_mode
    from distmed.task import task_for

    device = device or torch.device("cpu")
    cfg = experiment_config(spec, data, cache_dir)
    index = scan_source(cfg.data)
    images = load_cached(build_cache(index, cfg.data).pool_path)
    labels = index.pool.labels
    runtime = Runtime.resolve(cfg, device)
    task = task_for(index.class_names)
    pool = FoldData(0, np.arange(len(labels)), None, images, labels, task)
    fold = build_fold(pool, cfg, runtime, batch_size=spec.batch_size, workers=workers)
    set_train_mode(fold.model)
    batches = cycle(fold.train_loader)

    def step() -> None:
        batch_images, batch_labels, _ = next(batches)
        train_step(fold, batch_images, batch_labels, runtime)

    facts = {
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "pool_images": len(labels),
    }
    return step, facts


# --------------------------------------------------------------------------- (c) ImageFolder


def build_imagefolder_step(spec: LoopSpec, png_root: Path) -> tuple[Step, dict[str, Any]]:
    """One step of the hand-written baseline: PNG decode + transforms per image, fp32, NCHW,
    with the same flips and rotation as distmed's training batches (the same recipe)."""
    import torchvision

    transform = imagefolder_transform(spec.image_size, augment=True)
    dataset = torchvision.datasets.ImageFolder(str(png_root), transform=transform)
    # num_workers=0: on this 2-core machine loader processes only compete with the model.
    loader = DataLoader(dataset, batch_size=spec.batch_size, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(spec.arch, weights=None, num_classes=len(dataset.classes))
    # distmed's default optimiser settings, so only the data path and precision differ.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    batches = cycle(loader)

    def step() -> None:
        inputs, labels = next(batches)
        loss = loss_fn(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    facts = {"precision": "off", "channels_last": False, "pool_images": len(dataset)}
    return step, facts


# --------------------------------------------------------------------------- timing


def cycle(loader: Iterable) -> Iterator:
    """Batches forever: a new epoch (new shuffle) whenever the loader runs out."""
    while True:
        yield from loader


def measure(
    step: Step, batch_size: int, budget: LoopBudget, sync: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Warm-up steps, then repeats of timed steps; images/s is the median over repeats.

    `sync` waits for the device (`torch.cuda.synchronize`) before every clock reading:
    GPU work is queued, and without it only the queueing would be timed.
    """
    wait = sync or (lambda: None)
    for _ in range(budget.warmup_steps - 1):
        step()
    wait()
    started = time.perf_counter()
    step()  # the last warm-up step (on a CPU the only one): oneDNN kernels, optimiser state
    wait()
    warmup_s = time.perf_counter() - started
    steps = max(budget.min_steps, math.ceil(budget.repeat_seconds / warmup_s))
    affordable = math.floor(budget.cell_seconds / (steps * warmup_s))
    repeats = max(1, min(budget.max_repeats, affordable))
    rates = []
    before = CpuSnapshot.take()
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        wait()
        rates.append(steps * batch_size / (time.perf_counter() - started))
    return {
        **CpuSnapshot.take().others_since(before),
        "images_per_s": median(rates),
        "repeat_images_per_s": rates,
        "steps_per_repeat": steps,
        "repeats": repeats,
        "timed_images": steps * repeats * batch_size,
        "warmup_steps": budget.warmup_steps,
        "warmup_step_s": warmup_s,
    }


def run_loop(
    kind: str, spec: LoopSpec, data: Path, cache_dir: Path, budget: LoopBudget
) -> dict[str, Any]:
    torch.set_num_threads(spec.threads)
    if kind == "plain":
        step, facts = build_plain_step(spec, data, cache_dir)
    else:
        step, facts = build_imagefolder_step(spec, data)
    result = measure(step, spec.batch_size, budget)
    return {
        "kind": kind,
        **asdict(spec),
        **facts,
        **result,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loops",
        description="Time one in-process training loop; started by benchmarks.throughput.",
    )
    parser.add_argument("kind", choices=("plain", "imagefolder"))
    parser.add_argument("--arch", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument(
        "--data", type=Path, required=True, help="plain: a .npz; imagefolder: a PNG folder"
    )
    parser.add_argument("--cache-dir", type=Path, help="distmed's decoded-image cache (plain)")
    parser.add_argument("--budget", default="{}", help="LoopBudget fields as JSON")
    parser.add_argument("--out", type=Path, required=True, help="result JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = LoopSpec(args.arch, args.image_size, args.batch_size, args.threads)
    budget = LoopBudget(**json.loads(args.budget))
    cache_dir = args.cache_dir or args.out.parent / "cache"
    result = run_loop(args.kind, spec, args.data, cache_dir, budget)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
