"""Images in object storage (s3://, gs://, any pyarrow filesystem URI) read on this node, and
kept decoded on its disk for the cache (`data.loader: cache` with a bucket root).

Reads go through pyarrow's filesystem for the URI's scheme with the credentials of this
node's default chain (environment, profile, instance role). The decoded copy is one file per
object under `<cache root>/objects/<decode settings>/`, named by the object's URI and its
version: the object's size and modification time as the bucket lists them (pyarrow's
`FileInfo`; pyarrow exposes no ETag). A rewritten object gets a new modification time, so it
is read and decoded again; an unchanged one is never read again. The limit of that key: S3
keeps the modification time to the second, so an object rewritten within the same second to
exactly the same size keeps its version.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np

from distmed.artifacts import atomic_path
from distmed.data.decode import fill_rows, try_decode
from distmed.data.settings import DecodeSettings
from distmed.data.volumes import suffix_of


def is_uri(path: str) -> bool:
    return "://" in path


def object_version(size: int | None, mtime_ns: int | None) -> str:
    """An object's version as the cache keys it: "<size>-<modification time, ns>"."""
    return f"{size}-{mtime_ns}"


@contextmanager
def readable_file(path: str) -> Iterator[Path]:
    """A local path to the file at `path`: itself, or for a URI a temporary copy (same suffix,
    so the decoder's rules by suffix hold) read through pyarrow's filesystem for its scheme,
    with the credentials of this node's default chain (environment, profile, instance role).
    """
    if not is_uri(path):
        yield Path(path)
        return
    handle, name = tempfile.mkstemp(suffix=suffix_of(Path(path)), prefix="distmed-object-")
    try:
        with os.fdopen(handle, "wb") as out:
            copy_object(path, out)
        yield Path(name)
    finally:
        os.unlink(name)


def copy_object(uri: str, out: BinaryIO) -> None:
    """Write the bytes of the object at `uri` into `out`, 1 MiB at a time, read through
    pyarrow's filesystem for its scheme with this node's default credential chain."""
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(inner) as source:
        while chunk := source.read(1 << 20):
            out.write(chunk)


def stored_row_path(store: Path, uri: str, version: str) -> Path:
    """Where the decoded image of object `uri` at `version` is kept in `store`."""
    return store / f"{hashlib.sha256(f'{uri}|{version}'.encode()).hexdigest()[:32]}.npy"


def decode_object(
    uri: str, version: str, options: DecodeSettings, store: Path
) -> tuple[np.ndarray | None, str]:
    """The decoded image of one object (`decode.try_decode`'s (S, S) grey or (S, S, 3) RGB
    uint8, or None and why), from `store` when this version was decoded before, else read
    and decoded now and kept there (an unreadable object is not kept: it is tried again).
    """
    kept = stored_row_path(store, uri, version)
    if kept.is_file():
        return np.load(kept), ""
    with readable_file(uri) as local:
        image, reason = try_decode(local, options)
    if image is not None:
        store.mkdir(parents=True, exist_ok=True)
        with atomic_path(kept) as tmp, open(tmp, "wb") as out:  # whole or absent
            np.save(out, image)
    return image, reason


def object_rows(
    stage: Path, job: list[tuple[int, str, str]], options: DecodeSettings, store: Path
) -> list[tuple[int, bool, str]]:
    """`decode.decode_rows` for objects: job entries (position, URI, version) ->
    (position, colour, reason), each image written into its row of the staging array and
    kept in `store` (`decode_object`). The cache's worker function for a bucket."""
    decoders = (
        (p, partial(decode_object, uri, version, options, store)) for p, uri, version in job
    )
    return fill_rows(stage, decoders)
