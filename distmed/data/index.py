"""What a source holds once scanned: `Split` (ids, labels, groups, files or arrays) and
`DataIndex` (classes, the CV pool, the held-back test split), plus the results' description
of it and the files' fingerprint that keys the decoded cache. Index, split, load and transform
stay separate steps; folds are index arithmetic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split of a source: sample ids, labels, optional patient groups.

    `labels` are class numbers, int64 (N,); for several findings per image
    (`DataIndex.multilabel`) float32 (N, L) raw codes: 1.0 positive, 0.0 negative, -1.0
    uncertain, NaN missing (the task's policy turns them into targets).

    Exactly one of `paths` (image files), `images` (in-memory arrays from an .npz) and `uris`
    (objects in a bucket, `distmed.data.remote`; read only by the streamed loader) is set.
    `origins` names the split each sample came from (`train`, `val`, `test`; `all` for a
    folder without split folders).
    """

    ids: list[str]
    labels: np.ndarray
    groups: np.ndarray | None = None
    paths: list[Path] | None = None
    images: np.ndarray | None = None
    origins: np.ndarray | None = None
    uris: list[str] | None = None
    # Each of `uris`' object versions (`objects.object_version`): they key its decoded copy.
    versions: list[str] | None = None

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
    layout: str = ""  # how the source was read, e.g. "split folders train/, valid/ (val)"
    ignored: dict[str, str] = field(default_factory=dict)  # clutter, non-images -> reason
    # data.normalize_labels: class name -> {label as written: images}, where spellings merged
    merged_labels: dict[str, dict[str, int]] = field(default_factory=dict)
    # Several findings per image: `class_names` are the L findings, labels (N, L) codes.
    multilabel: bool = False


def describe_index(index: DataIndex, inspection: dict | None = None) -> dict:
    """What results files say about the data: name, layout, classes, sizes, files left out.

    `inspection` (from `distmed.data.inspection.inspect_index`) adds the full summary:
    counts per split, formats, skipped files, patients and duplicates.
    """
    described = {
        "name": index.name,
        "layout": index.layout,
        "classes": index.class_names,
        "multilabel": index.multilabel,
        "num_images": len(index.pool),
        "num_test_images": len(index.test) if index.test is not None else 0,
        "skipped_invalid": len(index.skipped),
        "skipped_files": index.skipped,
        "ignored_files": len(index.ignored),
    }
    if inspection is not None:
        described["inspection"] = inspection
    return described


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
        origins=split.origins[keep] if split.origins is not None else None,
        uris=[u for u, kept in zip(split.uris, keep, strict=True) if kept]
        if split.uris is not None
        else None,
        versions=[v for v, kept in zip(split.versions, keep, strict=True) if kept]
        if split.versions is not None
        else None,
    )


def files_fingerprint(pool: Split, test: Split | None) -> str:
    """sha256 over every sample's id, file size and modification time (an object's URI and
    version) and label."""
    digest = hashlib.sha256()
    for split in (pool, test):
        if split is None:
            continue
        if split.uris is not None:
            stamps = [f"{u}|{v}" for u, v in zip(split.uris, split.versions or [], strict=True)]
        else:
            stamps = [f"{s.st_size}|{s.st_mtime_ns}" for s in (p.stat() for p in split.paths or [])]
        for sample_id, stamp, label in zip(split.ids, stamps, split.labels, strict=True):
            digest.update(f"{sample_id}|{stamp}|{_label_text(label)}\n".encode())
    return digest.hexdigest()


def _label_text(label: np.ndarray | np.integer) -> str:
    """A class number as written; a row of finding codes as `1,0,-1,nan`."""
    if np.ndim(label) == 0:
        return f"{label}"
    return ",".join(f"{code:g}" for code in np.asarray(label).tolist())
