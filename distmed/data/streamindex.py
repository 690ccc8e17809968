"""The streamed pool's file index as a file every node reads, instead of a list in the object store.

A streamed run's Train workers need pool position -> file path or URI. Sent as a Python list
(inside the train loop's config, or a task's argument) it is a Ray object of ~70-100 bytes per
image, copied into the object store of every node that runs a worker: object-store use that
grows with the data set (BENCHMARKS.md part 10). Here the driver writes the list once as an
Arrow IPC file (one string column, `path`) into the run's storage, which every node of a
cluster already reads (Ray Train keeps its checkpoints there: a shared folder or a bucket),
named by the SHA-256 of its content, so trials, resumes and refits of one search write it once.
A reader memory-maps the file (a bucket's is first copied once to the node's temporary folder)
and takes one window's rows by position (`pyarrow.Table.take`): the pages it touches are the
file's, shared and reclaimable, not a copy per process. The plan's class numbers and fold
positions go beside it the same way (`write_plan_arrays`, an .npz), for the same reason.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distmed.data.objects import copy_object, is_uri

INDEX_FOLDER = "stream-index"  # under the run's storage
PATH_COLUMN = "path"


def index_name(paths: Sequence[str]) -> str:
    """The index file's name: the SHA-256 (first 32 hex digits) of the paths, one per line."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        digest.update(b"\n")
    return f"{digest.hexdigest()[:32]}-{len(paths)}.arrow"


def write_index(paths: Sequence[str], storage: str) -> str:
    """Write `paths` (position i -> file) as an Arrow IPC file under `storage`/stream-index/
    unless it is there already; returns its location (an absolute path, or a URI with the
    storage's scheme).

    `storage`: an absolute local folder or a URI (s3://, gs://) that every node reads.
    Written to a temporary name and renamed (local) or put in one request (a bucket), so a
    reader never sees half a file, and two trials writing it at once write the same bytes.
    """
    import pyarrow as pa

    def write(sink: Any) -> None:
        table = pa.table({PATH_COLUMN: pa.array(list(paths), type=pa.string())})
        with pa.ipc.new_file(sink, table.schema) as out:
            out.write_table(table)

    return _write_once(f"{storage.rstrip('/')}/{INDEX_FOLDER}/{index_name(paths)}", write)


def write_plan_arrays(labels: Sequence[Any], folds: Sequence[dict[str, Any]], storage: str) -> str:
    """Write a streamed plan's targets ((N,) class numbers or (N, L) findings) and fold
    positions (each fold's `train` and `val` lists) as an .npz under `storage`/stream-index/
    unless there; returns its location. A Train run's config then carries this location
    instead of ~17 bytes an image per fit (5 folds) into each worker node's object store.
    Named by the arrays' SHA-256."""
    arrays: dict[str, Any] = {"labels": np.asarray(labels)}
    for number, fold in enumerate(folds):
        arrays[f"train_{number}"] = np.asarray(fold["train"], dtype=np.int64)
        if fold.get("val") is not None:
            arrays[f"val_{number}"] = np.asarray(fold["val"], dtype=np.int64)
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(f"{key}:{len(array)};".encode())
        digest.update(array.tobytes())

    def write(sink: Any) -> None:  # only when the file is not there yet (every fit asks)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        sink.write(buffer.getvalue())

    name = f"plan-{digest.hexdigest()[:32]}.npz"
    return _write_once(f"{storage.rstrip('/')}/{INDEX_FOLDER}/{name}", write)


def read_plan_arrays(location: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """`write_plan_arrays`' labels and folds ({train, val} lists, val None for a refit)."""
    with np.load(_local_copy(location), allow_pickle=False) as archive:
        labels = archive["labels"].tolist()
        folds = []
        for number in range(sum(key.startswith("train_") for key in archive.files)):
            val = archive[f"val_{number}"].tolist() if f"val_{number}" in archive.files else None
            folds.append({"train": archive[f"train_{number}"].tolist(), "val": val})
    return labels, folds


def _write_once(location: str, write: Any) -> str:
    """Write `location` with `write(sink)` unless it exists (content-addressed: a present
    file is the same), through a temporary name renamed (local) or one PUT (a bucket), so a
    reader never sees half a file; returns `location`."""
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(location)
    if filesystem.get_file_info(inner).type == pyarrow.fs.FileType.File:
        return location
    folder, name = inner.rsplit("/", 1)
    filesystem.create_dir(folder, recursive=True)
    staged = inner if is_uri(location) else f"{folder}/.{name}.tmp{os.getpid()}"
    with filesystem.open_output_stream(staged) as sink:
        write(sink)
    if staged != inner:
        filesystem.move(staged, inner)
    return location


def index_paths(location: str, positions: np.ndarray) -> list[str]:
    """The files at pool `positions` (in that order) of the index at `location`.

    Raises:
        IndexError: a position outside the index (a plan that does not match its index).
    """
    import pyarrow as pa

    table = _open_index(location)
    chosen = np.asarray(positions, dtype=np.int64)
    if len(chosen) and (chosen.min() < 0 or chosen.max() >= table.num_rows):
        raise IndexError(f"position outside the stream index {location} ({table.num_rows} rows)")
    column: Any = table.column(PATH_COLUMN).take(pa.array(chosen))
    return [str(p) for p in column.to_pylist()]


def index_rows(location: str) -> int:
    """How many files the index at `location` lists."""
    return int(_open_index(location).num_rows)


@functools.lru_cache(maxsize=4)
def _open_index(location: str) -> Any:
    """The index as a pyarrow Table over a memory map of its file (kept per process: a worker
    reads one index for the whole run)."""
    import pyarrow as pa

    source = pa.memory_map(str(_local_copy(location)))
    return pa.ipc.open_file(source).read_all()  # zero-copy: columns view the mapped file


def _local_copy(location: str) -> Path:
    """`location` itself when local; for a URI, a copy in this node's temporary folder, made
    once per node (the name is the content's hash, so a present copy is the same file)."""
    if not is_uri(location):
        return Path(location)
    folder = Path(tempfile.gettempdir()) / "distmed-stream-index"
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / location.rstrip("/").rsplit("/", 1)[-1]
    if local.is_file():
        return local
    handle, staged = tempfile.mkstemp(dir=folder, prefix=f".{local.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            copy_object(location, out)
        os.replace(staged, local)
    finally:
        Path(staged).unlink(missing_ok=True)
    return local
