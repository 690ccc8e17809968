"""The search a `--name` was started with, kept with its results, so `--resume` continues it.

Tune restores a search's sampled parameters, but every trial's other settings come from the
space file given to the resumed command. An edited file (more epochs, a new range) would
silently mix two searches in one results table, and, with `--nested`, two procedures in one
estimate. So the first run records what decides the trials, and a resume with anything else
is refused. Where a run may differ on resume: `data.root`, `data.cache_dir` and
`data.decode_workers` (the same images, moved or decoded elsewhere), `scaling.*` (another
machine) and `tracking.*` (loggers).
"""

from __future__ import annotations

import json
from typing import Any

from distmed.artifacts import read_text_uri, write_text_uri
from distmed.errors import UserError, shorten
from distmed.space import SearchSpaceFile

SEARCH_FILE = "search_space.json"
MAY_DIFFER_ON_RESUME = (
    "base.data.root",
    "base.data.cache_dir",
    "base.data.decode_workers",
    "base.scaling.",
    "base.tracking.",
)


def search_record(spec: SearchSpaceFile) -> dict[str, Any]:
    """What decides the trials, as dotted keys -> JSON values."""
    whole = {
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


def record_search(exp_uri: str, spec: SearchSpaceFile) -> None:
    """Keep a new search's record beside its results (just before its first trial)."""
    text = json.dumps(search_record(spec), indent=1, sort_keys=True)
    write_text_uri(f"{exp_uri}/{SEARCH_FILE}", text)


def check_same_search(exp_uri: str, spec: SearchSpaceFile) -> None:
    """Refuse to resume `exp_uri` with settings other than those it started with.

    A search recorded before this file existed is resumed unchecked.

    Raises:
        UserError: one line naming the keys that differ, with both values of the first.
    """
    text = read_text_uri(f"{exp_uri}/{SEARCH_FILE}")
    if text is None:
        return
    before, now = json.loads(text), search_record(spec)
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if differ:
        first = differ[0]
        raise UserError(
            f"--resume: {exp_uri} was started with other settings ({len(differ)} differ: "
            f"{shorten(differ)}; {first} was {shorten(before.get(first))}, now "
            f"{shorten(now.get(first))}); resume with the same space file and --set values, "
            "or start a new --name"
        )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}
