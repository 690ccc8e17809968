"""The decoded-image cache: every image decoded and resized once per (source, decoding
options) into uint8 `.npy` files that every epoch, fold, trial and worker memory-maps, and the
torch `Dataset` that reads them. Files are decoded in parallel by a process pool straight into
a preallocated memory-mapped file, so memory stays flat however many images there are.
Objects in a bucket are also kept decoded one by one (`distmed.data.objects`), so a changed
bucket costs a read of its new and changed objects only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from distmed.artifacts import atomic_path, write_json_atomic
from distmed.config import DataConfig
from distmed.data.decode import decode_rows, decode_split, unreadable_message
from distmed.data.index import DataIndex, Split
from distmed.data.objects import object_rows
from distmed.data.settings import DecodeSettings
from distmed.errors import UserError

log = logging.getLogger(__name__)

# Bump when the decoded representation changes, so stale caches are not reused.
# 2: EXIF orientation, DICOM, intensity policies, resize modes, JPEG draft decoding.
# 3: DICOM VOI/modality LUT sequences, palette colour, legacy files; 16-bit colour.
CACHE_VERSION = 3
# Files per task of the decoding pool: small enough to balance, large enough to amortise.
CHUNK = 32
# Rows copied at a time when the staged array is compacted into the cache file.
COPY_ROWS = 256
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
    options = cfg.decode_settings()
    key = hashlib.sha256(
        f"v{CACHE_VERSION}|{index.fingerprint}|{options.key()}".encode()
    ).hexdigest()[:16]
    folder = cache_root(cfg) / "decoded" / f"{index.name}-{cfg.image_size}px-{key}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log.info("reusing decoded images in %s", folder)
    else:
        remove_stale_temporaries(cache_root(cfg))
        try:
            store = object_store(cfg, options)
            meta = _decode_into(folder, index, options, decode_workers(cfg), store)
            write_json_atomic(meta_path, meta, indent=None)
        except OSError as exc:  # image files are read inside decode_files; this is writing
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


def decode_workers(cfg: DataConfig) -> int:
    """`data.decode_workers`, or every CPU this process may use."""
    if cfg.decode_workers:
        return cfg.decode_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def object_store(cfg: DataConfig, options: DecodeSettings) -> Path:
    """Where objects in a bucket are kept decoded, one file per object version
    (`objects.decode_object`), for these decode settings."""
    key = hashlib.sha256(f"v{CACHE_VERSION}|{options.key()}".encode()).hexdigest()[:16]
    return cache_root(cfg) / "objects" / f"{options.image_size}px-{key}"


def _decode_into(
    folder: Path, index: DataIndex, options: DecodeSettings, workers: int, store: Path
) -> dict:
    """Decode the pool and test splits into `folder` (objects in a bucket through `store`);
    returns the cache's metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    channels, skipped = [], {}
    for part, split in (("pool", index.pool), ("test", index.test)):
        if split is None:
            continue
        target = folder / f"{part}.npy"
        if split.images is not None:  # in memory already: resized in batches
            array, _ = decode_split(split, options)
            assert array is not None  # arrays in memory always decode
            _save_atomic(target, array)
            channels.append(array.shape[1])
            continue
        count, bad = decode_files(split, options, target, workers, part, store)
        skipped.update(bad)
        if count is None:
            raise UserError(
                f"{index.name}: none of the {len(split)} {part} image files can be read "
                f"({unreadable_message(bad, can_skip=False)})"
            )
        channels.append(count)
    return {
        "channels": max(channels),
        "num_pool": len(index.pool) - len(skipped),
        "skipped": skipped,
    }


def decode_files(
    split: Split,
    options: DecodeSettings,
    target: Path,
    workers: int,
    part: str = "images",
    store: Path | None = None,
) -> tuple[int | None, dict[str, str]]:
    """Decode a split's files into `target` (.npy, uint8 (N, C, S, S)); returns (C, bad).

    A split of objects in a bucket (`split.uris`) reads each object version once: decoded
    objects are kept in `store` (`objects.decode_object`), so only new or changed objects
    are read and decoded.

    Every image is written, as it is decoded, into a preallocated memory-mapped staging
    file (N, 3, S, S) beside `target` by `workers` processes; then the readable rows are
    copied into `target` (one channel when every image is grey) in bounded chunks. Peak
    memory is a few chunks of images, whatever N is. The staging file and an unfinished
    `target` are temporary files (`.NAME.tmpPID`): a killed decode leaves nothing that a
    later run would trust, and `remove_stale_temporaries` clears them. Returns (None, bad)
    when no file is readable.
    """
    paths = list(split.uris) if split.uris is not None else [str(p) for p in split.paths or []]
    versions = split.versions if split.uris is not None else None
    size = options.image_size
    stage = target.with_name(f".{target.stem}.stage.tmp{os.getpid()}")
    try:
        np.lib.format.open_memmap(
            stage, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size)
        )
        chunks = [list(range(i, min(i + CHUNK, len(paths)))) for i in range(0, len(paths), CHUNK)]
        colour = np.zeros(len(paths), dtype=bool)
        readable = np.zeros(len(paths), dtype=bool)
        bad: dict[str, str] = {}
        reader = _Rows(paths, versions, store)
        for results in _run_chunks(chunks, reader, stage, options, workers, part):
            for position, is_colour, reason in results:
                if reason:
                    bad[split.ids[position]] = reason
                else:
                    readable[position], colour[position] = True, is_colour
        if not readable.any():
            return None, bad
        channels = 3 if colour.any() else 1
        with atomic_path(target) as tmp:
            _compact(stage, tmp, np.flatnonzero(readable), colour, channels)
        return channels, bad
    finally:
        stage.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Rows:
    """What a decoding task reads: local files (`decode.decode_rows`), or objects by version
    kept decoded in `store` (`objects.object_rows`)."""

    paths: list[str]
    versions: list[str] | None = None  # set for objects in a bucket
    store: Path | None = None

    def job(self, chunk: list[int]) -> list:
        if self.versions is None:
            return [(i, self.paths[i]) for i in chunk]
        return [(i, self.paths[i], self.versions[i]) for i in chunk]

    def task(self) -> tuple[Callable[..., list[tuple[int, bool, str]]], tuple]:
        """The worker function and its arguments after (stage, job, options)."""
        if self.versions is None:
            return decode_rows, ()
        if self.store is None:
            raise ValueError("objects in a bucket are decoded into a store")
        return object_rows, (self.store,)


def _run_chunks(
    chunks: list[list[int]],
    rows: _Rows,
    stage: Path,
    options: DecodeSettings,
    workers: int,
    part: str,
):
    """Yield each chunk's results, decoded here (one worker, few files) or by a pool."""
    paths = rows.paths
    bar = tqdm(total=len(paths), desc=f"decoding {part}", unit="img", disable=None, leave=False)
    started = time.perf_counter()
    decode, extra = rows.task()
    try:
        jobs = [rows.job(chunk) for chunk in chunks]
        if workers <= 1 or len(chunks) <= 1:
            for job in jobs:
                yield decode(stage, job, options, *extra)
                bar.update(len(job))
        else:
            # spawn: the caller may hold threads (Ray, torch) that a fork would copy half-way.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
                futures = {pool.submit(decode, stage, job, options, *extra): job for job in jobs}
                for future in as_completed(futures):
                    yield future.result()
                    bar.update(len(futures[future]))
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    log.info(
        "decoded %d %s images in %.1f s (%.0f images/s, %d process(es))",
        len(paths),
        part,
        elapsed,
        len(paths) / max(elapsed, 1e-9),
        max(1, workers),
    )


def _compact(
    stage: Path, target: Path, rows: np.ndarray, colour: np.ndarray, channels: int
) -> None:
    """Copy the readable `rows` of the staging array into a (len(rows), channels, S, S) .npy.

    Plain file reads and writes in chunks of `COPY_ROWS`: mapping both files would count
    every page touched in this process's resident memory.
    """
    source = np.load(stage, mmap_mode="r")
    shape, offset = source.shape, source.offset
    del source
    size = shape[-1]
    row_bytes = 3 * size * size
    out = np.lib.format.open_memmap(
        target, mode="w+", dtype=np.uint8, shape=(len(rows), channels, size, size)
    )
    out_offset = out.offset
    del out
    with open(stage, "rb") as reader, open(target, "r+b") as writer:
        writer.seek(out_offset)
        for start in range(0, len(rows), COPY_ROWS):
            batch = rows[start : start + COPY_ROWS]
            block = np.empty((len(batch), 3, size, size), dtype=np.uint8)
            for k, row in enumerate(batch):
                reader.seek(offset + int(row) * row_bytes)
                block[k] = np.frombuffer(reader.read(row_bytes), dtype=np.uint8).reshape(
                    3, size, size
                )
            grey = ~colour[batch]
            if channels == 1:
                write_block(writer, np.ascontiguousarray(block[:, :1]))
                continue
            block[grey, 1] = block[grey, 0]
            block[grey, 2] = block[grey, 0]
            write_block(writer, block)


def write_block(handle, block: np.ndarray) -> None:
    """Append decoded rows to an open cache file (every decoded file's bytes pass here)."""
    handle.write(block.tobytes())


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
    candidates += root.glob("objects/*/.*.tmp*")
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
