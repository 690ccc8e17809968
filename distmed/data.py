"""Data sources -> an index (ids, labels, groups) -> a decoded-image cache -> torch datasets.

Sources: an image folder (`ROOT/<class>/*` or `ROOT/train|val|test/<class>/*`), a MedMNIST
`.npz`, `medmnist:NAME`, or `demo` (the generated data set in `distmed.demo`). Images are
decoded and resized once per (source, image size) into uint8 `.npy` files that every epoch,
fold, trial and worker memory-maps; augmentation runs later, on tensors.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from distmed.artifacts import atomic_path, write_text_atomic
from distmed.config import AugmentConfig, DataConfig
from distmed.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bump when the decoded representation changes, so stale caches are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class Split:
    """One split of a source: sample ids, integer labels, optional patient groups.

    Exactly one of `paths` (image files) and `images` (in-memory arrays from an .npz) is set.
    """

    ids: list[str]
    labels: np.ndarray
    groups: np.ndarray | None = None
    paths: list[Path] | None = None
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class DataIndex:
    """What a source holds: the CV pool (train + val) and the held-back test split."""

    name: str
    class_names: list[str]
    pool: Split
    test: Split | None
    fingerprint: str  # changes when any file, size or label changes
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable file id -> reason


def describe_index(index: DataIndex) -> dict:
    """What results files say about the data: name, classes, sizes, files left out."""
    return {
        "name": index.name,
        "classes": index.class_names,
        "num_images": len(index.pool),
        "num_test_images": len(index.test) if index.test is not None else 0,
        "skipped_invalid": len(index.skipped),
        "skipped_files": index.skipped,
    }


def drop_samples(index: DataIndex, skipped: dict[str, str]) -> DataIndex:
    """The index without the samples in `skipped` (files the cache could not decode)."""
    if not skipped:
        return index
    test = _drop_from_split(index.test, skipped) if index.test is not None else None
    return replace(index, pool=_drop_from_split(index.pool, skipped), test=test, skipped=skipped)


def _drop_from_split(split: Split, skipped: dict[str, str]) -> Split:
    keep = np.array([sample_id not in skipped for sample_id in split.ids], dtype=bool)
    return Split(
        ids=[sample_id for sample_id, kept in zip(split.ids, keep, strict=True) if kept],
        labels=split.labels[keep],
        groups=split.groups[keep] if split.groups is not None else None,
        paths=[p for p, kept in zip(split.paths, keep, strict=True) if kept]
        if split.paths is not None
        else None,
        images=split.images[keep] if split.images is not None else None,
    )


@dataclass(frozen=True)
class CachedData:
    """Decoded uint8 arrays (N, C, S, S) on disk, memory-mapped by every consumer."""

    pool_path: Path
    test_path: Path | None
    channels: int
    skipped: dict[str, str] = field(default_factory=dict)  # files left out: id -> reason


def default_cache_root() -> Path:
    return Path(os.environ.get("DISTMED_CACHE", Path.home() / ".cache" / "distmed"))


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else default_cache_root()


# --------------------------------------------------------------------------- scanning


def scan_source(cfg: DataConfig) -> DataIndex:
    """Resolve `data.root` into an index; every problem is a `UserError` naming the path."""
    if not cfg.root:
        raise UserError("data.root is not set: pass --data PATH (folder, .npz) or --data demo")
    root = cfg.root
    if root == "demo":
        from distmed.demo import ensure_demo_folder

        index = scan_folder(ensure_demo_folder(cache_root(cfg)), cfg, name="demo")
    elif root.startswith("medmnist:"):
        index = scan_npz(fetch_medmnist(root.split(":", 1)[1], cache_root(cfg)), cfg)
    else:
        path = Path(root).expanduser()
        if not path.exists():
            raise UserError(f"data.root {root}: no such file or folder; check --data")
        index = scan_npz(path, cfg) if path.is_file() else scan_folder(path, cfg)
    return index


def scan_folder(root: Path, cfg: DataConfig, name: str | None = None) -> DataIndex:
    """Index `ROOT/<class>/*` or `ROOT/train|val|test/<class>/*`, sorted and deterministic."""
    root = root.resolve()
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise UserError(
            f"data.root {root}: no class folders; expected ROOT/<class>/*.png "
            "or ROOT/train|val|test/<class>/*.png"
        )
    if "train" in subdirs and set(subdirs) <= set(SPLITS):
        splits = {s: _scan_class_folders(root / s) for s in SPLITS if s in subdirs}
        names = {s: sorted(classes) for s, classes in splits.items()}
        for split, classes in names.items():
            if classes != names["train"]:
                raise UserError(
                    f"data.root {root}: class folders of {split}/ {classes} differ from "
                    f"train/ {names['train']}; every split needs the same classes"
                )
        class_names = names["train"]
        pool_parts = [splits[s] for s in ("train", "val") if s in splits]
        test_files = splits.get("test")
    else:
        class_names = sorted(_scan_class_folders(root))
        pool_parts = [_scan_class_folders(root)]
        test_files = None
    _require_two_classes(class_names, str(root))
    group_of = _group_lookup(cfg)
    pool = _files_split(root, class_names, pool_parts, group_of)
    test = _files_split(root, class_names, [test_files], group_of) if test_files else None
    return DataIndex(
        name=name or root.name,
        class_names=class_names,
        pool=pool,
        test=test,
        fingerprint=_fingerprint_files(pool, test),
    )


def _scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    for class_dir in sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            raise UserError(
                f"class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        classes[class_dir.name] = files
    if not classes:
        raise UserError(f"{folder}: no class folders inside; expected {folder}/<class>/*.png")
    return classes


def _require_two_classes(class_names: list[str], where: str) -> None:
    if len(class_names) < 2:
        raise UserError(
            f"data.root {where}: only one class ({', '.join(class_names)}); "
            "a classifier needs at least two class folders"
        )


def _files_split(
    root: Path,
    class_names: list[str],
    parts: list[dict[str, list[Path]] | None],
    group_of: Callable[[str, Path], str] | None,
) -> Split:
    paths: list[Path] = []
    labels: list[int] = []
    for part in parts:
        for label, name in enumerate(class_names):
            for path in (part or {}).get(name, []):
                paths.append(path)
                labels.append(label)
    ids = [p.relative_to(root).as_posix() for p in paths]
    group_array = None
    if group_of is not None:
        group_array = np.array(
            [group_of(i, p) for i, p in zip(ids, paths, strict=True)], dtype=object
        )
    return Split(
        ids=ids, labels=np.asarray(labels, dtype=np.int64), groups=group_array, paths=paths
    )


def _group_lookup(cfg: DataConfig) -> Callable[[str, Path], str] | None:
    """Patient ids: a CSV mapping path -> group, or a regex on the file name."""
    if cfg.group_regex:
        try:
            pattern = re.compile(cfg.group_regex)
        except re.error as exc:
            raise UserError(f"data.group_regex {cfg.group_regex!r}: invalid regex ({exc})") from exc
        return lambda _sample_id, path: _group_from_regex(pattern, path)
    if cfg.group_csv:
        table = _read_group_csv(Path(cfg.group_csv).expanduser())
        return lambda sample_id, path: _group_from_table(table, sample_id, path)
    return None


def _group_from_regex(pattern: re.Pattern[str], path: Path) -> str:
    match = pattern.search(path.name)
    if not match:
        raise UserError(
            f"data.group_regex {pattern.pattern!r} does not match file name {path.name}; "
            "it must match every file (its first group is the patient id)"
        )
    return match.group(1) if match.groups() else match.group(0)


def _read_group_csv(csv_path: Path) -> dict[str, str]:
    if not csv_path.is_file():
        raise UserError(f"data.group_csv {csv_path}: file not found")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"path", "group"} <= set(reader.fieldnames):
            raise UserError(f"data.group_csv {csv_path}: needs columns 'path' and 'group'")
        return {row["path"].strip(): row["group"].strip() for row in reader}


def _group_from_table(table: dict[str, str], sample_id: str, path: Path) -> str:
    for key in (sample_id, path.name):
        if key in table:
            return table[key]
    raise UserError(f"data.group_csv has no row for {sample_id}; add one (columns path, group)")


def _fingerprint_files(pool: Split, test: Split | None) -> str:
    digest = hashlib.sha256()
    for split in (pool, test):
        if split is None:
            continue
        for sample_id, path, label in zip(split.ids, split.paths or [], split.labels, strict=True):
            stat = path.stat()
            digest.update(f"{sample_id}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode())
    return digest.hexdigest()


def scan_npz(path: Path, cfg: DataConfig) -> DataIndex:
    """Index a MedMNIST-style `.npz` with its official train/val/test split."""
    if cfg.group_csv or cfg.group_regex:
        raise UserError(f"{path}: grouped folds need an image folder; unset data.group_*")
    if path.suffix.lower() != ".npz":
        raise UserError(
            f"data.root {path}: a file must be a MedMNIST .npz; for images give a folder"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise UserError(
                    f"{path}: missing arrays {missing}; a MedMNIST .npz has {list(NPZ_KEYS)}"
                )
            arrays = {k: archive[k] for k in NPZ_KEYS}
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npz ({exc})") from exc
    splits: dict[str, Split] = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        labels = labels.reshape(len(labels), -1)
        if labels.shape[1] != 1:
            raise UserError(
                f"{path}: {split}_labels has {labels.shape[1]} columns; only single-label tasks"
            )
        if len(images) != len(labels):
            raise UserError(
                f"{path}: {split}_images has {len(images)} rows but {split}_labels {len(labels)}"
            )
        splits[split] = Split(
            ids=[f"{split}/{i}" for i in range(len(images))],
            labels=labels[:, 0].astype(np.int64),
            images=images,
        )
    pool = Split(
        ids=splits["train"].ids + splits["val"].ids,
        labels=np.concatenate([splits["train"].labels, splits["val"].labels]),
        images=np.concatenate([splits["train"].images, splits["val"].images]),
    )
    num_classes = int(max(pool.labels.max(), splits["test"].labels.max())) + 1
    class_names = [str(c) for c in range(num_classes)]
    _require_two_classes(class_names, str(path))
    stat = path.stat()
    return DataIndex(
        name=path.stem,
        class_names=class_names,
        pool=pool,
        test=splits["test"],
        fingerprint=hashlib.sha256(
            f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
        ).hexdigest(),
    )


def fetch_medmnist(name: str, root: Path) -> Path:
    """Download a MedMNIST data set through the `medmnist` package (needs the network)."""
    try:
        import medmnist
    except ImportError as exc:
        raise UserError(
            f"medmnist:{name} needs the optional package: pip install 'distmed[medmnist]', "
            "or download the .npz yourself and pass its path"
        ) from exc
    info = medmnist.INFO.get(name.lower())
    if info is None:
        raise UserError(
            f"medmnist:{name}: unknown data set; known: {', '.join(sorted(medmnist.INFO))}"
        )
    target = root / "medmnist"
    target.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(medmnist, info["python_class"])
    try:
        dataset_class(split="train", root=str(target), download=True)
    except Exception as exc:  # the package raises bare RuntimeError/URLError on network failure
        raise UserError(
            f"medmnist:{name}: download failed ({type(exc).__name__}); without network access, "
            f"fetch {name.lower()}.npz elsewhere and pass its path with --data"
        ) from exc
    return target / f"{name.lower()}.npz"


# --------------------------------------------------------------------------- decoding + cache


def build_cache(index: DataIndex, cfg: DataConfig) -> CachedData:
    """Decode + resize every image once per (source, image size); reuse it when present.

    Unreadable files stop the run with their names, or with `data.skip_invalid` are left
    out of the cache and listed in `CachedData.skipped` (see `drop_samples`).
    """
    key = hashlib.sha256(
        f"v{CACHE_VERSION}|{index.fingerprint}|{cfg.image_size}".encode()
    ).hexdigest()[:16]
    folder = cache_root(cfg) / "decoded" / f"{index.name}-{cfg.image_size}px-{key}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log.info("reusing decoded images in %s", folder)
    else:
        meta = _decode_into(folder, index, cfg.image_size)
        write_text_atomic(meta_path, json.dumps(meta))
        log.info("decoded %d images into %s", meta["num_pool"], folder)
    skipped = meta.get("skipped", {})
    if skipped and not cfg.skip_invalid:
        raise UserError(unreadable_message(skipped))
    test_path = folder / "test.npy" if index.test is not None else None
    return CachedData(
        pool_path=folder / "pool.npy",
        test_path=test_path,
        channels=meta["channels"],
        skipped=skipped,
    )


def _decode_into(folder: Path, index: DataIndex, size: int) -> dict:
    """Decode the pool and test splits into `folder`; returns the cache's metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    channels, skipped = [], {}
    for part, split in (("pool", index.pool), ("test", index.test)):
        if split is None:
            continue
        array, bad = decode_split(split, size)
        skipped.update(bad)
        if array is None:
            raise UserError(
                f"{index.name}: none of the {len(split)} {part} image files can be read "
                f"({unreadable_message(bad)})"
            )
        channels.append(array.shape[1])
        _save_atomic(folder / f"{part}.npy", array)
    return {
        "channels": max(channels),
        "num_pool": len(index.pool) - len(skipped),
        "skipped": skipped,
    }


def unreadable_message(bad: dict[str, str]) -> str:
    """One line naming the unreadable files (the first five) and the two ways on."""
    items = [f"{sample_id} ({reason})" for sample_id, reason in bad.items()]
    shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    return (
        f"{len(items)} unreadable image file(s): {shown}; fix or remove them, "
        "or set data.skip_invalid=true to leave them out"
    )


def decode_split(split: Split, size: int) -> tuple[np.ndarray | None, dict[str, str]]:
    """The readable images of a split as uint8 (N, C, size, size), and the unreadable ones.

    C = 1 when every image is grey. Returns (None, bad) when no image can be read.
    """
    if split.images is not None:
        return resize_array(split.images, size), {}
    decoded, bad = [], {}
    for sample_id, path in zip(split.ids, split.paths or [], strict=True):
        try:
            decoded.append(decode_image(path, size))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            bad[sample_id] = _reason(path, exc)
    if not decoded:
        return None, bad
    colour = any(img.ndim == 3 for img in decoded)
    if colour:
        decoded = [
            np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img for img in decoded
        ]
        return np.stack(decoded).transpose(0, 3, 1, 2).copy(), bad
    return np.stack(decoded)[:, None], bad


def _reason(path: Path, exc: Exception) -> str:
    if path.stat().st_size == 0:
        return "empty file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    return f"truncated or corrupt: {type(exc).__name__}"


def decode_image(path: Path, size: int) -> np.ndarray:
    """One file -> uint8 (size, size) grey or (size, size, 3) RGB.

    16-bit and float images are min-max scaled per image: their useful range rarely
    spans the full container (12-bit X-rays in 16-bit PNGs), and a fixed divide would
    leave them nearly black.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            values = np.asarray(img, dtype=np.float32)
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) * 255 if high > low else values * 0
            img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
        elif img.mode in ("1", "L", "LA", "P") and _is_grey(img):
            img = img.convert("L")
        else:
            img = img.convert("RGB")
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8)


def _is_grey(img: Image.Image) -> bool:
    if img.mode != "P":
        return True
    palette = np.asarray(img.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    return bool((palette == palette[:, :1]).all())


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, C, size, size) uint8, resized in batches with torch."""
    array = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if array.shape[-1] == size and array.shape[-2] == size:
        return np.ascontiguousarray(array, dtype=np.uint8)
    out = np.empty((len(array), array.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(array), 1024):
        chunk = torch.from_numpy(np.ascontiguousarray(array[start : start + 1024])).float()
        resized = torch.nn.functional.interpolate(
            chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + 1024] = resized.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)  # a file object: np.save would append .npy to a bare name


def load_cached(path: Path) -> np.ndarray:
    """Memory-map a decoded split: pages are shared between worker processes."""
    return np.load(path, mmap_mode="r")


# --------------------------------------------------------------------------- datasets + transforms


class CachedImageDataset(Dataset):
    """Samples `(uint8 image, label, sample index)` from a memory-mapped decoded split.

    The sample index travels with each item so that distributed evaluation can drop the
    duplicates that `DistributedSampler` pads with.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        self.images = images
        self.labels = labels
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int]:
        index = int(self.indices[position])
        return torch.from_numpy(np.array(self.images[index])), int(self.labels[index]), index


def augment_batch(batch: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Random flips and rotation, drawn per image, of a float (B, C, H, W) batch on its device.

    One vectorised pass per batch rather than a transform per image in the loader: several
    times faster on a CPU, and on a GPU the GPU does it instead of the host (issue #7). The
    draws come from torch's RNG on the batch's device, which the worker seeds per epoch.
    Rotation resamples bilinearly about the centre and fills the corners with black.
    """
    count, device = batch.shape[0], batch.device
    if cfg.hflip:
        batch = torch.where(_coin(count, device), batch.flip(-1), batch)
    if cfg.vflip:
        batch = torch.where(_coin(count, device), batch.flip(-2), batch)
    if cfg.rotation > 0:
        angles = (torch.rand(count, device=device) * 2 - 1) * math.radians(cfg.rotation)
        cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], dim=1), torch.stack([sin, cos, zero], dim=1)], dim=1
        )
        grid = F.affine_grid(theta.to(batch.dtype), list(batch.shape), align_corners=False)
        batch = F.grid_sample(batch, grid, mode="bilinear", align_corners=False)
    return batch


def _coin(count: int, device: torch.device) -> torch.Tensor:
    """A fair coin per image, shaped to pick whole images with `torch.where`."""
    return (torch.rand(count, device=device) < 0.5).view(count, 1, 1, 1)


def to_model_input(batch: torch.Tensor, augment: AugmentConfig | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) on any device -> ImageNet-normalised float (B, 3, H, W).

    `augment` (training batches only) applies `augment_batch` first, on the batch's device
    and before grey images are expanded to 3 channels (a third of the work).
    """
    inputs = batch.float() / 255.0
    if augment is not None:
        inputs = augment_batch(inputs, augment)
    if inputs.shape[1] == 1:
        inputs = inputs.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (inputs - mean) / std
