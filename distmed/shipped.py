"""The search spaces shipped inside the package, named without a path (`--space demo`).

They are package data: `distmed/search_spaces/` in an installed wheel; in a source checkout
that folder is a link to the repository's `search_spaces/`, so both name the same files.
"""

from __future__ import annotations

from pathlib import Path

SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"


def shipped_spaces() -> list[str]:
    """The names `--space NAME` accepts, sorted (e.g. demo, medmnist28, resnet, scratch)."""
    return sorted(path.stem for path in SPACES_DIR.glob("*.yaml"))


def space_path(given: str | Path) -> Path:
    """The file `given` names: itself when it is a file or looks like a path (a folder part
    or a suffix); else the shipped space of that name when there is one; else `given`
    unchanged, for the caller's "not found" message."""
    path = Path(given)
    if path.is_file() or len(path.parts) > 1 or path.suffix:
        return path
    shipped = SPACES_DIR / f"{path.name}.yaml"
    return shipped if shipped.is_file() else path


def not_found_hint() -> str:
    """What to say after "not found": the shipped names, which need no path."""
    names = ", ".join(shipped_spaces())
    return f"give a YAML path or a shipped name ({names})" if names else "give a YAML path"
