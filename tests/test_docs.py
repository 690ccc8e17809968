"""The docs cannot drift from the code: the generated config page is current, every config key
is described, the quick-start commands run as written, the site builds with `--strict`, and the
README stays a short front door whose links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from distmed import configdoc

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_LIMIT = 8192  # bytes

# A fenced block right after `<!-- docs-test: run -->` is run; one right after
# `<!-- docs-test: output -->` lists lines the run block before it must print.
MARKED_BLOCK = re.compile(r"<!-- docs-test: (run|output) -->\s*\n```[a-z]*\n(.*?)\n```", re.DOTALL)


def test_the_config_page_is_the_generated_one():
    committed = (DOCS / "config.md").read_text(encoding="utf-8")
    assert committed == configdoc.render(), (
        "docs/config.md is stale: run `python -m distmed.configdoc > docs/config.md`"
    )


def test_every_config_key_has_a_description():
    assert configdoc.undescribed() == [], "add Field(description=...) in distmed/config.py"


def test_the_generator_writes_type_bounds_default_and_description():
    class Inner(BaseModel):
        rate: float = Field(0.5, gt=0, le=1, description="a rate | with a bar")
        mode: str | None = None
        depth: Annotated[int, Field(ge=0)] | Literal["all"] = Field(3, description="stages")

    class Outer(BaseModel):
        inner: Inner = Inner()

    page = configdoc.render(Outer)
    assert "## `inner`" in page
    assert "| `inner.rate` | number, > 0, <= 1 | `0.5` | a rate \\| with a bar |" in page
    assert "| `inner.mode` | text or none | none |  |" in page
    assert "| `inner.depth` | integer >= 0 or `all` | `3` | stages |" in page
    assert configdoc.undescribed(Outer) == ["inner.mode"]


def quickstart_blocks() -> list[tuple[str, list[str]]]:
    """(command block, expected output lines) for every block marked to run, in order."""
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    blocks: list[tuple[str, list[str]]] = []
    for kind, body in MARKED_BLOCK.findall(text):
        if kind == "run":
            blocks.append((body, []))
        else:
            assert blocks, "an output block must follow a run block"
            blocks[-1][1].extend(line.strip() for line in body.splitlines() if line.strip())
    return blocks


def test_quickstart_marks_blocks_to_run():
    # Without marked blocks the test below would check nothing.
    blocks = quickstart_blocks()
    assert len(blocks) >= 2
    assert all(expected for _, expected in blocks)


@pytest.mark.parametrize("index", range(len(quickstart_blocks())))
def test_quickstart_block_runs_as_written(index, tmp_path):
    # As a user after `source .venv/bin/activate`: this interpreter's console commands first
    # on PATH, from the repository root. The data cache is the test's own.
    command, expected = quickstart_blocks()[index]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DISTMED_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = [line.strip() for line in output.splitlines()]
    missing = [line for line in expected if line not in lines]
    assert not missing, f"{command!r} did not print {missing}:\n{output}"


def test_the_site_builds_strict(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "config" / "index.html").is_file()


def test_readme_is_a_short_front_door():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move manual content into docs/"


def test_readme_relative_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert relative, "the README links its docs"
    missing = [t for t in relative if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def _layout_rows() -> dict[str, str]:
    """docs/development.md's package layout table: first cell (backticked names) -> the row."""
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    table = text.split("## Package layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {cell: line for line in rows for cell in [line.split("|")[1]]}


def test_the_package_layout_table_names_every_module():
    """Each module of `distmed/` is named in the layout table: a top-level module in a row's
    first cell, a sub-package's module in its package's row (`data/`: `index`, ...)."""
    rows = _layout_rows()
    first_cells = " ".join(rows)
    unnamed = []
    for path in sorted((ROOT / "distmed").rglob("*.py")):
        relative = path.relative_to(ROOT / "distmed")
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if len(relative.parts) == 1:
            named = f"`{path.name}`" in first_cells
        else:
            package = f"`{relative.parts[0]}/`"
            row = next((line for cell, line in rows.items() if package in cell), "")
            named = f"`{path.stem}`" in row
        if not named:
            unnamed.append(str(relative))
    assert not unnamed, f"docs/development.md's package layout table lacks {unnamed}"
