"""Object storage as a data source, through pyarrow's filesystem for the URI's scheme with the
credentials of this machine's default chain (environment, profile, instance role;
`AWS_ENDPOINT_URL` for MinIO or Ceph): image folders in a bucket (`data.root:
s3://bucket/prefix` or `gs://...`) listed, the objects a labels sheet names looked up
(`object_versions`), and a sheet kept in a bucket read (`read_object`). No image is read
here; the files are read by the streamed loader's tasks on the nodes
(`distmed.data.stream`), or by the cache (`distmed.data.objects`), which keeps them decoded
on this node's disk by object version.

Layouts: `PREFIX/<class>/<file>` or `PREFIX/{train,val,test}/<class>/<file>` (train and val
form the CV pool, test is held back). Files are recognised by suffix (`FILE_EXTENSIONS`):
a DICOM file without a suffix, found locally by its preamble, is not read here.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable
from pathlib import PurePosixPath

import numpy as np

from distmed.config import DataConfig
from distmed.data.decode import FILE_EXTENSIONS
from distmed.data.index import DataIndex, Split
from distmed.data.objects import object_version
from distmed.errors import UserError
from distmed.uris import shown

SPLIT_FOLDERS = ("train", "val", "test")
# Up to this many objects of one bucket are looked up one request each; more, by listing
# their common prefix once (a page of 1,000 keys a request), not a request per sheet row.
LOOKUP_ONE_BY_ONE = 64


def is_bucket(root: str | None) -> bool:
    return bool(root) and "://" in str(root)


def scan_bucket(uri: str, cfg: DataConfig) -> DataIndex:
    """Index an image folder in object storage; see the module docstring for the layouts.

    The fingerprint covers every object's key, size and modification time, so a changed
    object is a new index.

    Raises:
        UserError: the bucket cannot be listed, holds no images in a layout above, has one
            class, or the config asks for what a bucket cannot give (group_csv, group_from).
    """
    from pyarrow import fs

    if cfg.group_csv or cfg.group_from:
        raise UserError(
            f"data.root {shown(uri)}: a bucket takes data.group_regex for patient groups, "
            "not data.group_csv or data.group_from"
        )
    scheme = uri.split("://", 1)[0]
    try:
        filesystem, prefix = fs.FileSystem.from_uri(uri)
        listing = filesystem.get_file_info(fs.FileSelector(prefix, recursive=True))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"data.root {shown(uri)}: cannot list it ({_reason(exc)}); "
            "check the name and this machine's credentials"
        ) from exc
    rows = []  # (split, class, uri, size, mtime)
    for info in listing:
        if info.type != fs.FileType.File:
            continue
        parts = PurePosixPath(info.path).relative_to(prefix.rstrip("/")).parts
        if PurePosixPath(parts[-1]).suffix.lower() not in FILE_EXTENSIONS:
            continue
        if len(parts) == 2:
            split, label = "all", parts[0]
        elif len(parts) == 3 and parts[0] in SPLIT_FOLDERS:
            split, label = parts[0], parts[1]
        else:
            continue
        rows.append((split, label, f"{scheme}://{info.path}", info.size, info.mtime_ns))
    rows.sort(key=lambda row: row[2])
    class_names = sorted({row[1] for row in rows})
    if len(class_names) < 2:
        raise UserError(
            f"data.root {shown(uri)}: found {len(rows)} image(s) in {len(class_names)} class "
            "folder(s); a classifier needs PREFIX/<class>/<file> with at least two classes"
        )
    number = {name: i for i, name in enumerate(class_names)}
    pool = _split([r for r in rows if r[0] != "test"], number, cfg, uri)
    test_rows = [r for r in rows if r[0] == "test"]
    digest = hashlib.sha256()
    for split, label, key, size, mtime in rows:
        digest.update(f"{split}|{label}|{key}|{size}|{mtime}\n".encode())
    return DataIndex(
        name=PurePosixPath(prefix.rstrip("/")).name or prefix,
        class_names=class_names,
        pool=pool,
        test=_split(test_rows, number, cfg, uri) if test_rows else None,
        fingerprint=digest.hexdigest(),
        layout=f"bucket {shown(uri)} ({', '.join(sorted({r[0] for r in rows}))})",
    )


def _split(rows: list, number: dict[str, int], cfg: DataConfig, uri: str) -> Split:
    uris = [row[2] for row in rows]
    groups = None
    if cfg.group_regex:
        pattern = re.compile(cfg.group_regex)
        found = []
        for key in uris:
            match = pattern.search(PurePosixPath(key).name)
            if match is None or not match.groups():
                raise UserError(
                    f"data.group_regex {cfg.group_regex!r} finds no patient id in "
                    f"{shown(key)}; fix the pattern (its first group is the id)"
                )
            found.append(match.group(1))
        groups = np.array(found)
    return Split(
        ids=[key[len(uri.rstrip("/")) + 1 :] for key in uris],
        labels=np.array([number[row[1]] for row in rows], dtype=np.int64),
        groups=groups,
        uris=uris,
        origins=np.array([row[0] for row in rows]),
        versions=[object_version(row[3], row[4]) for row in rows],
    )


def bucket_summary(index: DataIndex) -> dict:
    """What the results say about a bucket source in place of `inspect_data`'s summary (which
    reads every file: here only the streamed loader's tasks do); prints one line. Per class:
    images; per finding (several findings per image): positive images."""
    if index.multilabel:
        counts = (np.asarray(index.pool.labels) == 1).sum(axis=0).tolist()
    else:
        counts = np.bincount(index.pool.labels, minlength=len(index.class_names)).tolist()
    per_class = dict(zip(index.class_names, counts, strict=True))
    summary = {
        "root": index.layout,
        "num_images": len(index.pool),
        "num_test_images": len(index.test) if index.test is not None else 0,
        "per_class": per_class,
        "not_inspected": "images in object storage: formats, sizes and duplicates are not "
        "checked before training (the stream decodes each file on a node)",
    }
    shown_counts = ", ".join(f"{name} {count}" for name, count in per_class.items())
    positives = "positives: " if index.multilabel else ""
    print(
        f"{index.layout}: {len(index.pool)} images ({positives}{shown_counts}) in the CV pool",
        flush=True,
    )
    return summary


def object_path(uri: str) -> str:
    """`bucket/key` of `scheme://bucket/key`, the key normalised (`a//b`, `a/./b`, `a/../b`
    as a file system reads them), as pyarrow's filesystem names the object."""
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return f"{bucket}/{posixpath.normpath(key)}" if key else bucket


def canonical_uri(uri: str) -> str:
    """`uri` with its key normalised (`object_path`): the name two spellings share."""
    return f"{uri.split('://', 1)[0]}://{object_path(uri)}"


def object_versions(uris: Iterable[str]) -> dict[str, str]:
    """The version (`objects.object_version`: size and modification time) of each of `uris`
    (canonical, `canonical_uri`) that names an object; a missing one is absent.

    Per bucket: up to `LOOKUP_ONE_BY_ONE` objects are looked up one by one, more by one
    recursive listing of their common prefix, matched against the listed keys.

    Raises:
        UserError: a bucket cannot be read (its name, credentials or the network).
    """
    by_bucket: dict[str, list[str]] = {}
    for uri in dict.fromkeys(uris):
        scheme, rest = uri.split("://", 1)
        by_bucket.setdefault(f"{scheme}://{rest.split('/', 1)[0]}", []).append(uri)
    found: dict[str, str] = {}
    for bucket, group in by_bucket.items():
        found.update(_bucket_versions(bucket, group))
    return found


def _bucket_versions(bucket: str, uris: list[str]) -> dict[str, str]:
    from pyarrow import fs

    scheme = bucket.split("://", 1)[0]
    paths = [object_path(uri) for uri in uris]
    try:
        filesystem, _ = fs.FileSystem.from_uri(bucket)
        if len(paths) <= LOOKUP_ONE_BY_ONE:
            infos = filesystem.get_file_info(paths)
        else:
            prefix = posixpath.commonpath([posixpath.dirname(path) for path in paths])
            selector = fs.FileSelector(prefix, recursive=True, allow_not_found=True)
            infos = filesystem.get_file_info(selector)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{shown(bucket)}: cannot look up the objects the sheet names "
            f"({_reason(exc)}); check the name and this machine's credentials"
        ) from exc
    wanted = set(paths)
    return {
        f"{scheme}://{info.path}": object_version(info.size, info.mtime_ns)
        for info in infos
        if info.type == fs.FileType.File and info.path in wanted
    }


def read_object(uri: str, what: str, limit: int) -> bytes:
    """The bytes of the object at `uri` (a labels sheet), at most `limit` of them.

    Raises:
        UserError: no such object, larger than `limit`, or unreadable (credentials, network),
            naming `what`.
    """
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type != fs.FileType.File:
            raise UserError(f"{what}: no such object; check the URI")
        if info.size is not None and info.size > limit:
            raise UserError(f"{what}: {info.size >> 20} MiB is not a labels sheet")
        with filesystem.open_input_stream(path) as stream:
            raw = stream.read(limit + 1)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{what}: cannot read it ({_reason(exc)}); check the name and "
            "this machine's credentials"
        ) from exc
    if len(raw) > limit:  # grown since it was looked up
        raise UserError(f"{what}: over {limit >> 20} MiB is not a labels sheet")
    return bytes(raw)


def _reason(exc: BaseException) -> str:
    """A storage error's message on one line, cut to 160 characters (pyarrow's can be long)."""
    return " ".join(str(exc).split())[:160]
