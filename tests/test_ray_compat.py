"""distmed._ray_compat: every private Ray name distmed uses exists in the pinned Ray, and no
other module reaches for one. No Ray instance is started."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from distmed import _ray_compat
from distmed.resources import keep_secrets_out_of_ray
from distmed.search import wait_until_tune_took_every_report

PACKAGE = Path(__file__).resolve().parents[1] / "distmed"


def _resolve(path: str):
    module, _, attributes = path.partition(":")
    found = importlib.import_module(module)
    for name in attributes.split("."):
        found = getattr(found, name)  # AttributeError names what Ray renamed
    return found


@pytest.mark.parametrize("name", _ray_compat.PRIVATE_NAMES)
def test_each_private_name_exists_in_the_installed_ray(name):
    owner, _, member = name.partition("#")
    found = _resolve(owner)
    if member:  # set on an instance, or read inside the function: its source must use it
        assert re.search(rf"\b{re.escape(member)}\b", inspect.getsource(found)), name


def test_the_compat_functions_reach_their_names_without_a_cluster():
    assert isinstance(_ray_compat.forwarded_env_vars(), set)
    assert isinstance(_ray_compat.worker_group_startup_timeout_error(), type)
    assert Path(_ray_compat.train_report_logger_name()).is_file()
    assert _ray_compat.node_ip_init_kwargs("10.0.0.1") == {"_node_ip_address": "10.0.0.1"}


def test_the_secret_scrub_empties_tunes_forwarded_names_of_credentials():
    forwarded = _ray_compat.forwarded_env_vars()
    saved = set(forwarded)
    forwarded.update({"AWS_SECRET_ACCESS_KEY", "MY_API_TOKEN", "DISTMED_HARMLESS"})
    try:
        keep_secrets_out_of_ray()
        assert "DISTMED_HARMLESS" in forwarded
        assert not {"AWS_SECRET_ACCESS_KEY", "MY_API_TOKEN"} & forwarded
    finally:
        forwarded.clear()
        forwarded.update(saved)


def test_a_ray_without_the_names_is_an_error_not_a_skipped_step(monkeypatch):
    from ray.tune.execution import class_cache

    with pytest.raises(AttributeError, match="_training_actor_item_queue"):
        wait_until_tune_took_every_report(SimpleNamespace(), timeout_s=1, settle_s=0)
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", ("AWS_SECRET_ACCESS_KEY",))
    with pytest.raises(TypeError, match="ENV_VARS_TO_PROPAGATE"):
        keep_secrets_out_of_ray()


def test_no_other_module_names_a_private_ray_name():
    private = re.compile(r"ray\.[\w.]*_(private|internal)\b|\._(trial_runs|get_client)\b")
    compat_only = {
        name.rpartition("#")[2].rpartition(".")[2]
        for name in _ray_compat.PRIVATE_NAMES
        if name.rpartition("#")[2].rpartition(".")[2].startswith("_")
    } - {  # an override's
        "_start_logging_actor",
        "_logger_actor_cls",
        "_remote_logger_class",
        "_signal_logging_actor_stop",
        "_trial_logging_actors",
    }
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_ray_compat.py":
            continue
        text = path.read_text()
        if private.search(text) or any(re.search(rf"\b{n}\b", text) for n in compat_only):
            offenders.append(path.name)
    assert offenders == []
