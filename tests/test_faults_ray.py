"""Injected faults through Ray: a killed Train worker, a killed trial, a killed search driver.

Each test really kills a process (SIGKILL, as the OOM killer or a lost spot node would) and
checks that what was finished is kept and the rest resumes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_image_folder

from distmed.config import ExperimentConfig
from distmed.cv import cross_validate, prepare_data
from distmed.data import scan_source
from distmed.resources import plan_workers

pytestmark = pytest.mark.ray


def _train_workers() -> dict[str, int]:
    """Live Ray Train worker actors: actor id -> process id."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return {a.actor_id: a.pid for a in actors}


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _config(data: Path, max_failures: int) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "data": {"root": str(data), "image_size": 32},
            "model": {"weights": "none"},
            "train": {"epochs": 4, "batch_size": 8, "amp": "off", "seed": 3},
            "cv": {"folds": 2},
            "scaling": {"max_failures": max_failures},
        }
    )


def test_killed_worker_resumes_from_its_checkpoint_and_matches_a_clean_run(
    ray_session, tmp_path: Path
):
    data = write_image_folder(tmp_path / "data", {"neg": 24, "pos": 24}, size=32)
    cfg = _config(data, max_failures=1)
    prepared = prepare_data(cfg, scan_source(cfg.data))
    layout = plan_workers(cfg.scaling)
    clean = cross_validate(cfg, prepared.plan, layout, tmp_path / "clean", "run")

    outcome: dict[str, object] = {}

    def faulty_run() -> None:
        try:
            outcome["result"] = cross_validate(cfg, prepared.plan, layout, tmp_path / "f", "run")
        except Exception as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=faulty_run)
    thread.start()
    first = _wait_for(_train_workers, "the Train worker to start")
    _wait_for(lambda: list((tmp_path / "f").rglob("state.pt")), "the epoch-1 checkpoint")
    [victim] = first.values()
    os.kill(victim, signal.SIGKILL)  # mid-run: after epoch 1's checkpoint, before the end
    replacement = _wait_for(
        lambda: {k: v for k, v in _train_workers().items() if k not in first},
        "a replacement worker",
    )
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert victim not in replacement.values()

    resumed = outcome["result"]
    assert [f.stop_epoch for f in resumed.folds] == [4, 4]
    assert resumed.fold_aucs == pytest.approx(clean.fold_aucs, abs=1e-6)
    for ours, theirs in zip(resumed.folds, clean.folds, strict=True):
        losses = [r["train_loss"] for r in ours.history]
        assert losses == pytest.approx([r["train_loss"] for r in theirs.history], rel=1e-4)
