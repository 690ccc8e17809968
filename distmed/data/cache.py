"""The decoded-image cache: every image decoded and resized once per (source, image size)
into uint8 `.npy` files that every epoch, fold, trial and worker memory-maps, and the torch
`Dataset` that reads them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from distmed.artifacts import atomic_path, write_text_atomic
from distmed.config import DataConfig
from distmed.data.decode import decode_split, unreadable_message
from distmed.data.index import DataIndex
from distmed.errors import UserError

log = logging.getLogger(__name__)

# Bump when the decoded representation changes, so stale caches are not reused.
CACHE_VERSION = 1
# A temporary file untouched this long belongs to no live writer, whatever host wrote it.
STALE_AFTER_S = 24 * 3600


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
        remove_stale_temporaries(cache_root(cfg))
        try:
            meta = _decode_into(folder, index, cfg.image_size)
            write_text_atomic(meta_path, json.dumps(meta))
        except OSError as exc:  # image files are read inside decode_split; this is writing
            raise UserError(cache_write_error(cache_root(cfg), exc)) from exc
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


def cache_write_error(root: Path, exc: OSError) -> str:
    """One line for a failed cache write: the folder, the cause, and what to do."""
    text = str(exc).lower()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "free space" in text or "no space" in text:
        # numpy's tofile says "Not enough free space to write N bytes" without an errno
        return (
            f"data.cache_dir {root}: the disk is full (writing the decoded images failed: "
            f"{exc.strerror or exc}); free space there, or set data.cache_dir (or "
            "$DISTMED_CACHE) to a folder on a disk with room"
        )
    return (
        f"data.cache_dir {root}: cannot write the decoded images ({exc.strerror or exc}); "
        "set data.cache_dir (or $DISTMED_CACHE) to a writable folder"
    )


def remove_stale_temporaries(root: Path) -> int:
    """Delete temporary files that killed writers left in the cache; returns how many.

    `atomic_path` names them `.<file>.tmp<pid>`. One is stale when its process is gone
    from this host, or when it has not changed for a day (a writer on another host).
    """
    removed = 0
    candidates = [*root.glob("decoded/*/.*.tmp*"), *root.glob("inspect/.*.tmp*")]
    for tmp in candidates:
        match = re.fullmatch(r"\..+\.tmp(\d+)", tmp.name)
        if match is None:
            continue
        try:
            old = time.time() - tmp.stat().st_mtime > STALE_AFTER_S
            if old or not _process_alive(int(match.group(1))):
                tmp.unlink()
                removed += 1
        except OSError:
            continue  # removed by someone else meanwhile, or not ours to remove
    if removed:
        log.info("removed %d temporary file(s) left by killed runs in %s", removed, root)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)  # a file object: np.save would append .npy to a bare name


def load_cached(path: Path) -> np.ndarray:
    """Memory-map a decoded split: pages are shared between worker processes."""
    return np.load(path, mmap_mode="r")


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
