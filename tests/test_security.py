"""Untrusted files load safely and nothing we ship exposes Ray's dashboard beyond localhost.

A source scan (with `ast`, so comments and strings do not count): every `torch.load` passes
`weights_only=True`, YAML is read with `safe_load` only, and no pickle/eval/exec is used.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from distmed.errors import UserError
from distmed.model import read_state_dict

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "distmed").rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_untrusted_files_are_loaded_safely(path: Path):
    tree = ast.parse(path.read_text())
    for call, name in _calls(tree):
        where = f"{path.name}:{call.lineno} {name}"
        if name == "torch.load":
            flags = {k.arg: ast.unparse(k.value) for k in call.keywords}
            assert flags.get("weights_only") == "True", where
        assert name not in {"yaml.load", "yaml.unsafe_load", "yaml.full_load"}, where
        assert name not in {"eval", "exec"}, where
        assert not name.startswith(("pickle.", "cloudpickle.")), where
        if name == "np.load":
            flags = {k.arg: ast.unparse(k.value) for k in call.keywords}
            assert flags.get("allow_pickle", "False") == "False", where
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert "pickle" not in imported, path.name


def test_user_yaml_is_read_only_through_the_bounded_loader():
    # yaml.safe_load has no bound on alias expansion; distmed.yamlfile does. The one other
    # reader is resources.py, of Ray's own cluster bootstrap file on the head node.
    for path in SOURCES:
        for call, name in _calls(ast.parse(path.read_text())):
            if name in {"yaml.safe_load", "yaml.load_all", "yaml.safe_load_all"}:
                assert path.name == "resources.py", f"{path.name}:{call.lineno} {name}"


class Payload:
    """Stands for what a malicious checkpoint carries instead of tensors."""


def test_a_pickled_object_in_a_weights_file_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(UserError, match="evil.pt") as info:
        read_state_dict(path, None)
    assert len(str(info.value).splitlines()) == 1


def test_ray_dashboard_is_never_bound_beyond_localhost():
    for path in SOURCES:
        for call, name in _calls(ast.parse(path.read_text())):
            if name == "ray.init":
                hosts = [ast.unparse(k.value) for k in call.keywords if k.arg == "dashboard_host"]
                assert all(h in {"'127.0.0.1'", "'localhost'"} for h in hosts), path.name
    for path in sorted((REPO / "cluster").glob("*.y*ml")):
        for host in re.findall(r"--dashboard-host[= ]+(\S+)", path.read_text()):
            assert host.strip("'\"") in {"127.0.0.1", "localhost"}, f"{path.name}: {host}"
