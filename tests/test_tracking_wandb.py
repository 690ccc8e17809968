"""W&B's Tune callback finishes every trial's run at the end of a search, a stopped one included."""

from __future__ import annotations

from pathlib import Path

import pytest

from distmed.config import WandbConfig
from distmed.tracking import wandb_callbacks

pytest.importorskip("wandb")


def test_every_running_trials_actor_is_told_to_finish_before_the_wait(tmp_path: Path, monkeypatch):
    """After a Ctrl-C Tune has not ended the running trials: their logging actors must be told
    to finish before the wait, or they sit on their queues until Ray kills them at the timeout
    (their last metrics lost). Ray's own wait runs after, with distmed's timeout."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    monkeypatch.delenv("DISTMED_WANDB_UPLOAD_TIMEOUT_S", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    (callback,) = wandb_callbacks(WandbConfig(project="p", mode="offline"), "g", tmp_path)
    events: list[tuple[str, object]] = []
    monkeypatch.setattr(
        WandbLoggerCallback,
        "_signal_logging_actor_stop",
        lambda self, trial: events.append(("told", trial)),
    )
    monkeypatch.setattr(
        WandbLoggerCallback,
        "_cleanup_logging_actors",
        lambda self, timeout=0, kill_on_timeout=False: events.append(("wait", timeout)),
    )
    callback._trial_logging_actors = {"running": object(), "ended": object()}

    callback.on_experiment_end(trials=[])

    assert events == [("told", "running"), ("told", "ended"), ("wait", 120)]


def test_a_trial_whose_queue_is_gone_does_not_stop_the_others(tmp_path: Path, monkeypatch, caplog):
    from ray.air.integrations.wandb import WandbLoggerCallback

    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb_callbacks sets it: restored after
    (callback,) = wandb_callbacks(WandbConfig(project="p", mode="offline"), "g", tmp_path)
    told: list[object] = []

    def signal(self, trial):
        if trial == "lost":
            raise RuntimeError("queue actor died")
        told.append(trial)

    monkeypatch.setattr(WandbLoggerCallback, "_signal_logging_actor_stop", signal)
    monkeypatch.setattr(WandbLoggerCallback, "_cleanup_logging_actors", lambda self, **kw: None)
    callback._trial_logging_actors = {"lost": object(), "fine": object()}

    callback.on_experiment_end(trials=[])

    assert told == ["fine"]
    assert "could not finish the run of trial lost: queue actor died" in caplog.text
