"""Cache build on full-size inputs: images/s with 1 process and with every core, peak RSS.

Generates 1024 x 1024 16-bit PNGs and 1024 x 1024 12-bit DICOMs (two classes), then builds
the decoded cache at 224 px (`distmed.data.build_cache`, default `data.intensity: percentile`)
in a fresh subprocess per measurement, so each peak RSS is that build's alone:
  rate     the PNG set and the DICOM set, `data.decode_workers` 1 and all cores;
  memory   the PNG set at two sizes (all cores): peak RSS of the building process and of
           its largest decoding worker, beside the cache's size on disk.
Files beyond `--distinct` per class are hard links to the distinct ones (generating 5,000
full-size PNGs alone takes longer than decoding them); every file is still decoded.
Run from the repository root:
  .venv/bin/python -m benchmarks.decode [--pngs 5000 --dicoms 1000]
Writes benchmarks/results/decode.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import fmt, machine_info, markdown_table, usable_cpus, write_result

SIDE = 1024
MiB = 1024 * 1024


def full_size(seed: int) -> np.ndarray:
    """A smooth 12-bit 'radiograph' with noise and a few hot pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE].astype(np.float32) / SIDE
    values = 900 + 1800 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.08) + 400 * xx
    values += rng.normal(0, 30, (SIDE, SIDE)).astype(np.float32)
    values[rng.integers(0, SIDE, 20), rng.integers(0, SIDE, 20)] = 4095
    return values.clip(0, 4095).astype(np.uint16)


def write_set(root: Path, count: int, distinct: int, kind: str) -> Path:
    """ROOT/{a,b}/NNNNN.(png|dcm): `count` files, `distinct` contents per class."""
    for label in ("a", "b"):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        originals = []
        for i in range(count // 2):
            path = folder / f"{i:05d}.{'png' if kind == 'png' else 'dcm'}"
            if i < distinct:
                pixels = full_size(1000 * (label == "b") + i)
                if kind == "png":
                    Image.fromarray(pixels).save(path, compress_level=1)
                else:
                    write_dicom(path, pixels)
                originals.append(path)
            else:
                os.link(originals[i % distinct], path)
    return root


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.PatientID = "DX", path.stem
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (4095 - pixels).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def child(root: str, workers: int, cache: str) -> dict[str, Any]:
    """One cache build in this (fresh) process; its time and peak memory."""
    from distmed.config import DataConfig
    from distmed.data import build_cache, scan_source

    cfg = DataConfig(root=root, image_size=224, cache_dir=cache, decode_workers=workers)
    index = scan_source(cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    cached = build_cache(index, cfg)
    seconds = time.perf_counter() - started
    return {
        "images": len(index.pool),
        "workers": workers,
        "build_s": seconds,
        "images_per_s": len(index.pool) / seconds,
        "rss_before_build_mib": before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "cache_mib": cached.pool_path.stat().st_size / MiB,
    }


def measure(root: Path, workers: int, scratch: Path) -> dict[str, Any]:
    cache = tempfile.mkdtemp(dir=scratch, prefix="cache-")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode", "--child", str(root), str(workers), cache],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run(["rm", "-rf", cache], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pngs", type=int, default=5000, help="16-bit PNGs (5000)")
    parser.add_argument("--dicoms", type=int, default=1000, help="DICOM files (1000)")
    parser.add_argument("--distinct", type=int, default=40, help="distinct files per class")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2])))
        return 0
    cores = usable_cpus()
    with tempfile.TemporaryDirectory(prefix="distmed-decode-") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        pngs = write_set(scratch / "png", args.pngs, args.distinct, "png")
        small = write_set(scratch / "png-half", args.pngs // 2, args.distinct, "png")
        dicoms = write_set(scratch / "dicom", args.dicoms, args.distinct, "dicom")
        generated_s = time.perf_counter() - started
        runs = {
            "png_1": measure(pngs, 1, scratch),
            f"png_{cores}": measure(pngs, cores, scratch),
            "dicom_1": measure(dicoms, 1, scratch),
            f"dicom_{cores}": measure(dicoms, cores, scratch),
            f"png_half_{cores}": measure(small, cores, scratch),
        }
    scaling = {
        kind: runs[f"{kind}_{cores}"]["images_per_s"] / (cores * runs[f"{kind}_1"]["images_per_s"])
        for kind in ("png", "dicom")
    }
    full, half = runs[f"png_{cores}"], runs[f"png_half_{cores}"]
    payload = {
        "machine": machine_info(),
        "settings": vars(args) | {"side": SIDE, "image_size": 224, "cores": cores},
        "generate_s": generated_s,
        "runs": runs,
        "parallel_efficiency": scaling,
        "peak_rss_ratio_full_vs_half": full["peak_rss_mib"] / half["peak_rss_mib"],
    }
    path = write_result("decode", payload)
    rows = [
        [
            name,
            str(r["images"]),
            str(r["workers"]),
            fmt(r["images_per_s"]),
            fmt(r["rss_before_build_mib"], 0),
            fmt(r["peak_rss_mib"], 0),
            fmt(r["peak_worker_rss_mib"], 0),
            fmt(r["cache_mib"], 0),
        ]
        for name, r in runs.items()
    ]
    headers = ["run", "images", "processes", "images/s", "RSS before MiB", "peak RSS MiB"]
    print(markdown_table([*headers, "largest worker MiB", "cache MiB"], rows))
    print(
        f"parallel efficiency (rate / (cores x 1-process rate)): png {scaling['png']:.2f}, "
        f"dicom {scaling['dicom']:.2f}; peak RSS {full['images']} vs {half['images']} images: "
        f"x{payload['peak_rss_ratio_full_vs_half']:.3f} -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
