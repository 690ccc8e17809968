"""Shipped search spaces by name (`--space demo`, `--config demo`), a path still first."""

from __future__ import annotations

from pathlib import Path

import pytest

from distmed.config import load_config
from distmed.errors import UserError
from distmed.shipped import SPACES_DIR, shipped_spaces, space_path
from distmed.space import load_space

REPO = Path(__file__).resolve().parents[1]


def test_the_package_folder_is_the_repositorys_search_spaces():
    assert SPACES_DIR.resolve() == (REPO / "search_spaces").resolve()
    assert {"demo", "resnet", "medmnist28"} <= set(shipped_spaces())


def test_a_name_without_a_path_is_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert space_path("demo") == SPACES_DIR / "demo.yaml"
    assert load_space("demo") == load_space(REPO / "search_spaces" / "demo.yaml")
    assert load_config("demo") == load_config(REPO / "search_spaces" / "demo.yaml")


def test_a_file_or_a_path_is_never_replaced_by_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text("x")  # a file in the working folder wins
    assert space_path("demo") == Path("demo")
    assert space_path("sub/demo") == Path("sub/demo")
    assert space_path("demo.yml") == Path("demo.yml")


def test_an_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"nosuch not found: check --space; .*demo, .*resnet"):
        load_space("nosuch")
    with pytest.raises(UserError, match=r"nosuch not found: check --config; .*demo"):
        load_config("nosuch")


def test_the_flagship_offline_is_one_line_naming_the_weights_and_both_fixes(
    tmp_path, monkeypatch, capsys
):
    from distmed.tune import main

    # An empty TORCH_HOME: nothing cached, so torchvision must download (the network is closed).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("DISTMED_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["--space", "resnet", "--data", "demo", "--storage", str(tmp_path / "runs")]
    assert main([*argv, "--name", "offline"]) == 2
    captured = capsys.readouterr()
    [line] = [x for x in captured.err.splitlines() if x.strip()]
    assert line.startswith("error: model.weights=imagenet: could not download")
    assert "internet" in line and "model.weights=PATH model.weights_sha256=HEX" in line
    assert "Traceback" not in captured.err + captured.out
