"""Injected faults through Ray: a killed Train worker, a killed trial, a killed search driver.

Each test really kills a process (SIGKILL, as the OOM killer or a lost spot node would) and
checks that what was finished is kept and the rest resumes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import write_image_folder

from distmed import tune
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


def test_search_survives_a_killed_trial_and_a_killed_driver(ray_session, tmp_path: Path):
    """Trial 1 finishes; trial 2's worker is killed (no retries: the trial errors); the
    driver is SIGKILLed during trial 3; --resume keeps 1 and 2 and finishes 3."""
    data = write_image_folder(tmp_path / "data", {"neg": 12, "pos": 12}, size=16)
    space = _search_space(tmp_path, data)
    address = ray_session.get_runtime_context().gcs_address
    argv = ["--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "exp"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "distmed.tune", *argv, "--address", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        first = _read_until(driver, lines, r"trial (\S+) completed: CV ROC-AUC (\S+)")
        second = _read_until(driver, lines, r"trial (\S+) epoch 1:")
        [victim] = _wait_for(_train_workers, "trial 2's worker").values()
        os.kill(victim, signal.SIGKILL)
        _read_until(driver, lines, rf"trial {second[1]} errored")
        third = _read_until(driver, lines, r"trial (\S+) epoch 1:")
        assert len({first[1], second[1], third[1]}) == 3
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
        driver.stdout.close()

    started = time.monotonic()
    assert tune.main([*argv, "--resume"]) == 0
    resume_s = time.monotonic() - started
    rows = {r["trial_id"]: r for r in _read_csv(tmp_path / "runs" / "exp" / "trials.csv")}
    assert sorted(rows) == sorted([first[1], second[1], third[1]])  # each trial once
    assert rows[first[1]]["status"] == "completed"
    assert float(rows[first[1]]["cv_roc_auc"]) == pytest.approx(float(first[2]), abs=1e-4)
    assert rows[second[1]]["status"] == "errored" and rows[second[1]]["error"]
    assert rows[third[1]]["status"] == "completed"
    summary = json.loads((tmp_path / "runs" / "exp" / "summary.json").read_text())
    assert summary["trials_by_status"]["errored"] == 1
    assert summary["trials_by_status"]["completed"] == 2
    print(f"resume took {resume_s:.1f} s")


def _search_space(tmp_path: Path, data: Path) -> Path:
    spec = {
        "base": {
            "data": {"root": str(data), "image_size": 16},
            "model": {"weights": "none"},
            "train": {"epochs": 2, "batch_size": 8, "amp": "off"},
            "cv": {"folds": 2},
            "scaling": {"max_failures": 0},  # a killed worker ends its trial
        },
        "search": {"num_samples": 3, "max_concurrent": 1, "seed": 0, "scheduler": {"type": "none"}},
        "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _read_until(process: subprocess.Popen, lines: list[str], pattern: str) -> re.Match:
    """Read the driver's output until a line matches; fail with what it printed."""
    for line in process.stdout:
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    pytest.fail(f"driver ended before printing {pattern!r}:\n{''.join(lines[-40:])}")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))
