"""The built wheel installs and runs outside the repository (offline, in about 30 s).

Built with `pip wheel` from a copy of the sources (the checkout gets no build/ or egg-info
folders), installed with `--no-deps --no-index` into a fresh venv in tmp_path. That venv
reaches the dependencies through a `.pth` line naming this interpreter's site-packages:
nothing is downloaded, and a `.pth` line adds a folder to the path without running the
`.pth` files inside it, so an editable install of distmed there stays inert; the test checks
that `distmed` is imported from the venv. Its commands then run from a folder outside the
repository, without PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "distmed", "search_spaces")


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh venv, an environment without PYTHONPATH, a work folder outside the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["DISTMED_CACHE"] = str(tmp / "cache")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():  # symlinks=True: distmed/search_spaces stays a link
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        elif (REPO / name).is_file():
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(tmp / "dist"), str(source)], tmp, env)  # fmt: skip
    [wheel] = (tmp / "dist").glob("distmed-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    own = _run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], tmp, env)
    own_site = Path(own.strip())
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (own_site / "distmed-test-deps.pth").write_text("\n".join(deps) + "\n")
    install = ["install", "--no-deps", "--no-index", "--no-compile", str(wheel)]
    _run([*pip, "--python", str(python), *install], tmp, env)
    work = tmp / "elsewhere"
    work.mkdir()
    return venv, env, work


def test_the_wheel_installs_distmed_and_its_search_spaces_into_the_venv(installed):
    venv, env, work = installed
    code = (
        "import distmed, distmed.shipped as s; print(distmed.__file__); print(s.shipped_spaces())"
    )
    where, names = _run([str(venv / "bin" / "python"), "-c", code], work, env).splitlines()
    assert Path(where).resolve().is_relative_to(venv.resolve())
    assert not Path(where).resolve().is_relative_to(REPO)
    shipped = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))
    assert names.strip() == str(shipped)


def test_distmed_version_from_the_installed_command(installed):
    venv, env, work = installed
    out = _run([str(venv / "bin" / "distmed"), "--version"], work, env)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{out.split()[1]}"' in pyproject
    assert out.startswith("distmed ")


def test_a_shipped_space_by_name_and_the_demo_data_without_the_repository(installed):
    venv, env, work = installed
    dry = _run([str(venv / "bin" / "distmed"), "tune", "--space", "demo", "--dry-run"], work, env)
    assert "root: demo" in dry and "optim.lr" in dry
    inspected = _run([str(venv / "bin" / "distmed"), "data", "demo"], work, env)
    assert "lesion" in inspected and "normal" in inspected
    assert list((Path(env["DISTMED_CACHE"])).glob("demo-v*/train/lesion/*.png"))
    assert sorted(p.name for p in work.iterdir()) == []  # nothing written where it ran
