"""Whole training epochs, data included, from the cache and from the stream: data wait and
step time apart.

    python -m benchmarks.epochs --device cpu --images 64 --size 32 --sources cache   # dry run
    python -m benchmarks.epochs --device cuda --arch resnet50 --images 5000           # a GPU

Generated grey PNGs are decoded into the cache (its one-off build is timed apart) or streamed
through Ray Data (a local Ray session); one fold trains `--epochs` epochs on them with
distmed's `train_step` under the runtime distmed picks for the device (bf16 and channels_last
on CUDA). Per epoch: data-wait seconds (blocked waiting for the next batch), step seconds
(the step, synchronised with the device after each so that the two add up) and images/s end
to end. `benchmarks.gpu_check` runs it as its `epochs` stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.stream import write_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epochs", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sources", default="cache,stream", help="cache, stream or both")
    parser.add_argument("--workdir", help="where the images and cache go (default: temporary)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from distmed.config import ExperimentConfig
    from distmed.data import build_cache, load_cached, scan_source
    from distmed.data.stream import StreamSpec, epoch_positions, stream_batches
    from distmed.loop import FoldData, Runtime, build_fold
    from distmed.sharedpass import array_reader
    from distmed.task import BinaryTask

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dmepochs"))
    root = write_images(work / "images", args.images, args.size)
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"root": str(root), "image_size": args.size, "cache_dir": str(work / "c")},
            "model": {"arch": args.arch, "weights": "none"},
            "train": {"batch_size": args.batch, "epochs": args.epochs},
        }
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    runtime = Runtime.resolve(cfg, device)
    index = scan_source(cfg.data)
    labels = np.asarray(index.pool.labels)
    positions = np.arange(len(labels))
    pin = device.type == "cuda"
    out: dict[str, Any] = {"arch": args.arch, "size": args.size, "batch": args.batch,
                           "images": len(labels), "device": str(device),
                           "precision": runtime.precision,
                           "channels_last": runtime.channels_last}  # fmt: skip
    for source in [s for s in args.sources.split(",") if s]:
        if source == "cache":
            started = time.perf_counter()
            images = load_cached(build_cache(index, cfg.data).pool_path)
            out["cache_build_s"] = round(time.perf_counter() - started, 2)
            read = array_reader(images, args.batch)
        else:
            import ray

            ray.init(ignore_reinit_error=True, logging_level="ERROR")
            paths = [str(p) for p in index.pool.paths or []]
            spec = StreamSpec(paths=paths, options=cfg.data.decode_settings())

            def read(order: np.ndarray, spec=spec) -> Iterable:
                return stream_batches(spec, order, args.batch, pin_memory=pin)

        task = BinaryTask(tuple(index.class_names), 1)
        steps = len(labels) // args.batch or 1
        fold = build_fold(FoldData(0, positions, None, None, labels, task), cfg, runtime,
                          args.batch, steps_per_epoch=steps)  # fmt: skip
        out[source] = [
            time_epoch(fold, read(epoch_positions(positions, 0, e, 0, 1, True)), labels, runtime)
            for e in range(args.epochs)
        ]
    return out


def time_epoch(fold: Any, batches: Iterable, labels: np.ndarray, runtime: Any) -> dict[str, float]:
    """One epoch: seconds waiting for batches, seconds stepping, images/s end to end."""
    from distmed.loop import train_step
    from distmed.model import set_train_mode

    set_train_mode(fold.model)
    targets = torch.from_numpy(labels)
    wait = step = 0.0
    count = 0
    started = time.perf_counter()
    iterator = iter(batches)
    while True:
        before = time.perf_counter()
        try:
            images, positions = next(iterator)
        except StopIteration:
            break
        got = time.perf_counter()
        wait += got - before
        if len(positions) < 2:  # a ragged batch of one breaks BatchNorm
            continue
        train_step(fold, images, targets[positions], runtime)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        step += time.perf_counter() - got
        count += len(positions)
    wall = time.perf_counter() - started
    return {"images": count, "wall_s": round(wall, 3), "data_wait_s": round(wait, 3),
            "step_s": round(step, 3), "images_per_s": round(count / wall, 1)}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
