"""The search a `--name` was started with, kept with its results, so `--resume` continues it.

Tune restores a search's sampled parameters, but every trial's other settings come from the
space file given to the resumed command. An edited file (more epochs, a new range) would
silently mix two searches in one results table, and, with `--nested`, two procedures in one
estimate. So the first run records what decides the trials, and a resume with anything else
is refused. Where a run may differ on resume: `data.root`, `data.cache_dir` and
`data.decode_workers` (the same images, moved or decoded elsewhere), `scaling.*` (another
machine) and `tracking.*` (loggers). That the images are the same is checked apart: their
ids (paths below `data.root`), labels, file sizes and class names, hashed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from distmed.artifacts import read_text_uri, write_json_uri
from distmed.data import DataIndex
from distmed.errors import UserError, shorten
from distmed.search import can_restore
from distmed.space import SearchSpaceFile

SEARCH_FILE = "search_space.json"
IMAGES_KEY = "images"  # the record's images_hash
MAY_DIFFER_ON_RESUME = (
    "base.data.root",
    "base.data.cache_dir",
    "base.data.decode_workers",
    "base.scaling.",
    "base.tracking.",
)
# Recorded since the sampler became configurable: a search recorded before has none, and
# its restored study keeps the sampler it was started with.
NEWER_KEYS = ("search.sampler.", "search.objectives")


def search_record(spec: SearchSpaceFile, nested: int | None = None) -> dict[str, Any]:
    """What decides the trials, as dotted keys -> JSON values (`nested`: --nested's K)."""
    whole = {
        "nested": nested,
        "base": spec.base.model_dump(mode="json"),
        "search": spec.search.model_dump(mode="json"),
        "space": spec.space_as_dict(),
    }
    flat = _flatten(whole)
    return {k: v for k, v in flat.items() if not k.startswith(MAY_DIFFER_ON_RESUME)}


def check_new_search(exp_uri: str) -> None:
    """Refuse to start a search where one of that name was started (checked before any work).

    Raises:
        UserError: `exp_uri` holds a search's record.
    """
    if read_text_uri(f"{exp_uri}/{SEARCH_FILE}") is not None:
        raise UserError(
            f"{exp_uri}: a search of that name exists; continue it with --resume, or give "
            "a new --name"
        )


def images_hash(index: DataIndex) -> str:
    """sha256 of the class names and every pool and test sample's id, label and size in
    bytes (the pixels themselves for in-memory arrays; for objects in a bucket, size and
    modification time: an object rewritten in place, even at the same size, is other
    pixels). Moving or copying local files keeps it; other files, labels or pixels change
    it, and so does copying a bucket (its objects' times are new)."""
    digest = hashlib.sha256(json.dumps(index.class_names).encode())
    for split in (index.pool, index.test):
        if split is None:
            continue
        for sample_id, label in zip(split.ids, split.labels.tolist(), strict=True):
            digest.update(f"{sample_id}|{label}\n".encode())
        if split.paths is not None:
            digest.update(" ".join(str(p.stat().st_size) for p in split.paths).encode())
        if split.versions is not None:
            digest.update(" ".join(split.versions).encode())
        if split.images is not None:
            digest.update(split.images.tobytes())
    return digest.hexdigest()


def record_search(
    exp_uri: str, spec: SearchSpaceFile, index: DataIndex, nested: int | None = None
) -> None:
    """Keep a new search's record beside its results (just before its first trial)."""
    record = {**search_record(spec, nested), IMAGES_KEY: images_hash(index)}
    write_json_uri(f"{exp_uri}/{SEARCH_FILE}", record, sort_keys=True)


def check_same_images(exp_uri: str, record: dict[str, Any] | None, index: DataIndex) -> None:
    """Refuse to resume `exp_uri` on other images than it started with (a moved folder with
    the same files is fine). `record`: what `check_same_search` read; unchecked without one
    or without the hash.

    Raises:
        UserError: the ids, labels, sizes or class names differ.
    """
    before = None if record is None else record.get(IMAGES_KEY)
    if before is not None and before != images_hash(index):
        raise UserError(
            f"--resume: {exp_uri} was started on other images (file names, labels, sizes"
            f"{', object times' if index.pool.versions is not None else ''} or classes differ "
            f"from --data {index.name}'s now); resume on the same data, or start a new --name"
        )


def check_same_search(
    exp_uri: str, spec: SearchSpaceFile, nested: int | None = None
) -> dict[str, Any] | None:
    """Refuse to resume `exp_uri` with settings other than those it started with, `--nested`
    included (a plain search is not continued as a nested one, nor the other way).

    A search recorded before this file existed is resumed unchecked, if Tune can restore it.
    Returns the record (None for such a search), for `check_same_images`.

    Raises:
        UserError: nothing to resume there; or one line naming the keys that differ, with
            both values of the first.
    """
    text = read_text_uri(f"{exp_uri}/{SEARCH_FILE}")
    if text is None:
        # A nested search keeps one Tune experiment per outer fold; the first is there first.
        if not can_restore(f"{exp_uri}/outer-0" if nested else exp_uri):
            raise UserError(
                f"--resume: no search to continue at {exp_uri}; check --name and --storage"
            )
        return None
    record = json.loads(text)
    before, now = dict(record), search_record(spec, nested)
    before.setdefault("nested", None)  # a record from before --nested was in it
    before.pop(IMAGES_KEY, None)  # check_same_images compares those
    if not any(k.startswith(NEWER_KEYS) for k in before):
        before.update({k: v for k, v in now.items() if k.startswith(NEWER_KEYS)})
    # A setting added to distmed after the search started is absent from its record; at its
    # default it keeps the behaviour the search ran with (new keys default to the old way).
    defaults = _default_record(spec, nested)
    before.update(
        {k: v for k, v in now.items() if k not in before and k in defaults and v == defaults[k]}
    )
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if differ:
        first = differ[0]
        raise UserError(
            f"--resume: {exp_uri} was started with other settings ({len(differ)} differ: "
            f"{shorten(differ)}; {first} was {shorten(before.get(first))}, now "
            f"{shorten(now.get(first))}); resume with the same space file and --set values, "
            "or start a new --name"
        )
    return record


def _default_record(spec: SearchSpaceFile, nested: int | None) -> dict[str, Any]:
    """`search_record` with every base and search setting at distmed's default, no space."""
    blank = spec.model_copy(
        update={"base": type(spec.base)(), "search": type(spec.search)(), "space": {}}
    )
    return search_record(blank, nested)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}
