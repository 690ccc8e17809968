"""Data path: images/s delivered to the model (no model), and what distmed's cache costs.

Loaders compared at 28 -> 224 px and 28 -> 64 px, each iterated and converted to model input:
  distmed cached   `CachedImageDataset` over the decoded uint8 cache + the worker's
                   conversion (`to_model_input`, channels_last from 64 px), with the default
                   training augmentation done in batch and without it (the validation path);
  ImageFolder      PIL decoding + Resize + ToTensor + Normalize per image, per epoch, with
                   0 loader processes and with the `--loader-workers` counts; and once with
                   the same augmentation per image in PIL (0 loader processes).
Cache: `distmed.data.build_cache` time (decode, resize, fsync'd write) and size on disk.
Run from the repository root:
  flock /tmp/distmed-ray.lock .venv/bin/python -m benchmarks.datapath [--quick]
Writes benchmarks/results/datapath.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import (
    DEFAULT_SOURCE,
    REPO,
    CpuSnapshot,
    fmt,
    folder_bytes,
    imagefolder_transform,
    machine_info,
    machine_line,
    markdown_table,
    median,
    pool_of,
    usable_cpus,
    write_png_folder,
    write_result,
    write_subset_npz,
)
from distmed.config import AugmentConfig, DataConfig, validate_config
from distmed.data import (
    CachedData,
    CachedImageDataset,
    build_cache,
    load_cached,
    scan_source,
)

Convert = Callable[[torch.Tensor], torch.Tensor]
MB = 1e6


# --------------------------------------------------------------------------- cache


def measure_cache_build(
    source: Path, size: int, root: Path, repeats: int
) -> tuple[dict[str, Any], CachedData]:
    """Time `build_cache` from scratch `repeats` times (a fresh cache folder each time).

    The scan (reading the .npz into an index) is timed apart: it happens on every run,
    while the build happens once per (source, image size).
    """
    scans, builds = [], []
    cache: CachedData | None = None
    for repeat in range(repeats):
        cache_dir = root / f"cache-{size}px-{repeat}"
        cfg = DataConfig(root=str(source), image_size=size, cache_dir=str(cache_dir))
        started = time.perf_counter()
        index = scan_source(cfg)
        scans.append(time.perf_counter() - started)
        started = time.perf_counter()
        cache = build_cache(index, cfg)
        builds.append(time.perf_counter() - started)
        if repeat < repeats - 1:
            shutil.rmtree(cache_dir)  # the next build must not find (and reuse) this one
    assert cache is not None
    folder = cache.pool_path.parent
    num_images = len(load_cached(cache.pool_path)) + (
        len(load_cached(cache.test_path)) if cache.test_path else 0
    )
    result = {
        "image_size": size,
        "images": num_images,
        "build_s": median(builds),
        "build_s_repeats": builds,
        "scan_s": median(scans),
        "cache_bytes": folder_bytes(folder),
        "cache_files": {p.name: p.stat().st_size for p in sorted(folder.iterdir())},
    }
    return result, cache


# --------------------------------------------------------------------------- loaders


def distmed_loader(pool_path: Path, labels: np.ndarray, batch: int) -> DataLoader:
    dataset = CachedImageDataset(load_cached(pool_path), labels, np.arange(len(labels)))
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)


def distmed_convert(size: int, augment: bool) -> Convert:
    """The worker's own conversion: uint8 -> (augmented in batch) normalised float, in its
    memory format."""
    from distmed.loop import Runtime, model_inputs, resolve_channels_last

    device = torch.device("cpu")
    cfg = validate_config({"data": {"image_size": size}}, "benchmark")
    channels_last = resolve_channels_last(cfg, device)
    augmentation = AugmentConfig() if augment else None
    runtime = Runtime(device, channels_last=channels_last)
    return lambda images: model_inputs(images, runtime, augmentation)


def as_is(images: torch.Tensor) -> torch.Tensor:
    """ImageFolder's transforms already yield normalised float model input."""
    return images


def imagefolder_loader(
    png_root: Path, size: int, batch: int, workers: int, augment: bool
) -> DataLoader:
    import torchvision

    transform = imagefolder_transform(size, augment)
    dataset = torchvision.datasets.ImageFolder(str(png_root), transform=transform)
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)


def measure_loader(
    loader: DataLoader, convert: Convert, images_per_repeat: int, seconds: float, repeats: int
) -> dict[str, Any]:
    """Images/s through loader + conversion; each repeat starts a new epoch (new iterator).

    A repeat ends after `images_per_repeat` images or `seconds`, whichever comes first (at
    least two batches), so slow pipelines stay bounded. One batch is drawn first, untimed,
    so that lazy set-up (first kernel calls) is not charged to the first repeat. A new
    iterator per repeat keeps what every epoch pays, such as starting loader processes.
    """
    convert(next(iter(loader))[0])
    rates, counts = [], []
    before = CpuSnapshot.take()  # CPU time ticks at 10 ms: meaningful for windows of ~1 s up
    for _ in range(repeats):
        started = time.perf_counter()
        count = 0
        for batches, images in enumerate(_batches(loader), 1):
            count += len(convert(images))
            elapsed = time.perf_counter() - started
            if count >= images_per_repeat or (elapsed >= seconds and batches >= 2):
                break
        rates.append(count / (time.perf_counter() - started))
        counts.append(count)
    after = CpuSnapshot.take()
    return {
        "images_per_s": median(rates),
        "repeat_images_per_s": rates,
        "repeat_images": counts,
        "repeats": repeats,
        "timed_s": after.wall - before.wall,
        **after.others_since(before),
    }


def _batches(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Image batches, starting a new epoch whenever the loader runs out."""
    while True:
        for batch in loader:
            yield batch[0]


def run_loaders(
    size: int,
    pool_path: Path,
    labels: np.ndarray,
    png_root: Path,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Every pipeline at one image size, as result rows."""
    distmed = distmed_loader(pool_path, labels, args.batch_size)
    pipelines: list[tuple[str, int, DataLoader, Convert]] = [
        ("distmed cached, training augmentation", 0, distmed, distmed_convert(size, True)),
        ("distmed cached, no augmentation", 0, distmed, distmed_convert(size, False)),
        (
            "ImageFolder + PIL + transforms, training augmentation",
            0,
            imagefolder_loader(png_root, size, args.batch_size, 0, augment=True),
            as_is,
        ),
    ]
    for workers in sorted({0, *args.loader_workers}):
        pipelines.append(
            (
                "ImageFolder + PIL + transforms",
                workers,
                imagefolder_loader(png_root, size, args.batch_size, workers, augment=False),
                as_is,
            )
        )
    rows = []
    for name, workers, loader, convert in pipelines:
        result = measure_loader(loader, convert, args.images, args.seconds, args.repeats)
        rows.append({"pipeline": name, "loader_workers": workers, "image_size": size, **result})
        print(f"    {size} px, {name}, {workers} workers: {result['images_per_s']:.0f} img/s")
    return rows


# --------------------------------------------------------------------------- tables


def format_tables(payload: dict[str, Any]) -> str:
    loaders = payload["loaders"]
    baseline = {
        row["image_size"]: row["images_per_s"]
        for row in loaders
        if row["pipeline"] == "ImageFolder + PIL + transforms" and row["loader_workers"] == 0
    }
    loader_rows = [
        [
            f"28 -> {row['image_size']}",
            row["pipeline"],
            str(row["loader_workers"]),
            fmt(row["images_per_s"], 0),
            fmt(row["images_per_s"] / baseline[row["image_size"]], 1, "x"),
            f"{min(row['repeat_images'])}-{max(row['repeat_images'])} x {row['repeats']}",
            fmt(row["other_cores"] if row["timed_s"] >= 0.5 else None, 2),
        ]
        for row in loaders
    ]
    cache_rows = [
        [
            str(row["image_size"]),
            str(row["images"]),
            fmt(row["build_s"], 2),
            str(len(row["build_s_repeats"])),
            fmt(row["cache_bytes"] / MB, 1),
            fmt(row["scan_s"], 2),
        ]
        for row in payload["cache"]
    ]
    settings = payload["settings"]
    return "\n".join(
        [
            f"Machine: {machine_line(payload['machine'])}",
            f"Threads: {settings['threads']}; batch {settings['batch_size']}; source "
            f"{Path(settings['source']).name} ({settings['pool_images']} pool images; "
            f"{settings['png_bytes'] / MB:.1f} MB as PNG files)",
            "",
            markdown_table(
                (
                    "px",
                    "pipeline",
                    "loader workers",
                    "img/s to the model",
                    "vs ImageFolder, 0 workers",
                    "images x repeats",
                    "others' cores",
                ),
                loader_rows,
            ),
            "",
            markdown_table(
                (
                    "cache px",
                    "images (pool + test)",
                    "build_cache s (median)",
                    "builds",
                    "size on disk MB",
                    "scan s",
                ),
                cache_rows,
            ),
            "",
            "img/s: median over repeats; each repeat a new epoch of a shuffled loader, "
            "conversion to model input included, no model. others' cores: average cores that "
            "other processes took meanwhile (not this process or its loader processes; '-' "
            "where the timed window was under 0.5 s).",
        ]
    )


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.datapath",
        description="Images/s delivered to the model by distmed's cache vs ImageFolder; "
        "cache build time and size.",
    )
    parser.add_argument("--quick", action="store_true", help="a small pool, few images: smoke")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="MedMNIST .npz")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, help="images per timed repeat (default 8192)")
    parser.add_argument(
        "--seconds", type=float, help="at most seconds per timed repeat (default 3)"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per pipeline (default 3)")
    parser.add_argument("--builds", type=int, help="cache builds per size (default 3)")
    parser.add_argument(
        "--loader-workers",
        type=int,
        nargs="*",
        default=[2],
        help="ImageFolder loader process counts to try besides 0 (default: 2)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: usable CPUs)")
    parser.add_argument("--name", help="result file name (default datapath[-quick])")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.images = args.images or (256 if args.quick else 8192)
    args.seconds = args.seconds or (2.0 if args.quick else 3.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.builds = args.builds or (1 if args.quick else 3)
    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    name = args.name or ("datapath-quick" if args.quick else "datapath")
    payload: dict[str, Any] = {"benchmark": "datapath", "machine": machine_info()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distmed-datapath-") as tmp_name:
        tmp = Path(tmp_name)
        # Quick: a 512-image pool; otherwise the whole source, as a user would cache it.
        source = (
            write_subset_npz(args.source, tmp / "quick.npz", 512) if args.quick else args.source
        )
        images, labels = pool_of(source)
        png_root = write_png_folder(images, labels, tmp / "png")
        payload["settings"] = {
            "source": str(args.source),
            "pool_images": len(labels),
            "png_bytes": folder_bytes(png_root),
            "threads": threads,
            "batch_size": args.batch_size,
            "images_per_repeat": args.images,
            "seconds_per_repeat": args.seconds,
            "repeats": args.repeats,
            "builds": args.builds,
            "quick": args.quick,
        }
        payload["cache"], payload["loaders"] = [], []
        for size in args.sizes:
            print(f"{size} px: building the cache ...", flush=True)
            build, cache = measure_cache_build(source, size, tmp, args.builds)
            payload["cache"].append(build)
            rows = run_loaders(size, cache.pool_path, labels, png_root, args)
            payload["loaders"] += rows
    payload["machine"]["load_average_at_end"] = list(os.getloadavg())
    payload["total_wall_s"] = time.perf_counter() - started
    path = write_result(name, payload)
    print()
    print(format_tables(payload))
    print(f"\n{path.relative_to(REPO)}; total {payload['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
