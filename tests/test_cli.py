"""The shared CLI plumbing: console entry points, `--model` checking, the device."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import torch

from distmed.cli import add_debug_option, add_model_option, model_path
from distmed.errors import UserError
from distmed.inference import choose_device

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
COMMANDS = {
    "distmed": "distmed.__main__",  # `distmed <command>`: the others by name
    "distmed-train": "distmed.train",
    "distmed-tune": "distmed.tune",
    "distmed-predict": "distmed.predict",
    "distmed-evaluate": "distmed.evaluate",
    "distmed-report": "distmed.report",
    "distmed-export": "distmed.export",
    "distmed-app": "distmed.app",
    "distmed-data": "distmed.data.__main__",
}


def test_each_console_command_is_the_main_of_its_python_m_module():
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts == {name: f"{module}:main" for name, module in COMMANDS.items()}
    for target in scripts.values():
        module_name, attr = target.split(":")
        main = getattr(importlib.import_module(module_name), attr)
        assert callable(main) and main.__name__ == "main", target


def test_model_option_is_required_and_checked(tmp_path):
    parser = argparse.ArgumentParser()
    add_model_option(parser)
    add_debug_option(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    missing = parser.parse_args(["--model", str(tmp_path / "nope.pt")])
    assert not missing.debug
    with pytest.raises(UserError, match=r"nope\.pt: no such file \(a best_model\.pt"):
        model_path(missing)
    saved = tmp_path / "best_model.pt"
    saved.write_bytes(b"")
    assert model_path(parser.parse_args(["--model", str(saved), "--debug"])) == saved


def test_choose_device_takes_the_gpu_unless_asked_for_the_cpu():
    assert choose_device(cpu=True) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device().type == expected
