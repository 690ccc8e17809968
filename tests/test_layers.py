"""The layer rule: front doors (`python -m` modules) are imported by nothing in distmed.

Read from the source with `ast` (no import, no Ray), like `test_loop.py`'s no-Ray check:
a library module that reaches into a front door drags its argparse, printing and exit
codes along, and front doors that import one another become a second, hidden API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import distmed

PACKAGE = Path(distmed.__file__).parent
FRONT_DOORS = {
    "distmed.tune",
    "distmed.train",
    "distmed.evaluate",
    "distmed.report",
    "distmed.predict",
    "distmed.export",
    "distmed.app",
    "distmed.cli",
    "distmed.__main__",  # `distmed <command>`: imports the others by name, when one is run
}
# Front doors may use the CLI helpers (argparse options, one-line errors); nothing else may.
CLI_USERS = FRONT_DOORS | {"distmed.data.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every distmed module `path` imports, `from distmed import x` counted as distmed.x."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("distmed")}


def violations() -> list[str]:
    """ "A imports front door B" for every such import; a front door may use `cli`."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for target in sorted(imported_modules(path) & FRONT_DOORS):
            if not (target == "distmed.cli" and importer in CLI_USERS):
                out.append(f"{importer} imports front door {target}")
    return out


def test_no_module_imports_a_front_door():
    assert violations() == []


def test_the_guard_sees_each_way_of_importing_a_front_door(tmp_path: Path):
    source = tmp_path / "x.py"
    source.write_text(
        "from distmed import tune\nimport distmed.report\nfrom distmed.cli import parse\n"
        "def f():\n    from distmed.predict import main\n"
    )
    found = imported_modules(source) & FRONT_DOORS
    assert found == {"distmed.tune", "distmed.report", "distmed.cli", "distmed.predict"}
