"""After the search: refit the chosen config on all training data (one Ray Train run),
relay its epoch lines to the console, and read the best trial's fold models back.

`distmed.pipeline.finalize` turns what this returns into `best_model.pt`
(`savedmodel.save_model`) and scores the test split once (`inference.evaluate_test`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import ray.exceptions
import ray.train
import ray.util.queue
import torch

from distmed.artifacts import latest_checkpoint
from distmed.config import ExperimentConfig
from distmed.cv import FoldPlan, fit_folds
from distmed.fitcallbacks import RefitEpochLines
from distmed.resources import WorkerLayout
from distmed.worker import STATE_FILE

log = logging.getLogger(__name__)


class LineQueue(Protocol):
    """A `ray.util.queue.Queue` as `relay_lines` uses it (a `queue.Queue` in tests)."""

    def get(self) -> str | None: ...

    def put(self, item: str | None) -> None: ...


def show_line(line: str) -> None:
    """Print a refit epoch line, indented like the trials' epoch lines."""
    print(f"  {line}", flush=True)


def refit_epochs(stop_epochs: list[int]) -> int:
    """Epochs for the final fit: the mean of the epochs the folds stopped at."""
    return max(1, round(float(np.mean(stop_epochs))))


def refit(
    cfg: ExperimentConfig,
    plan: FoldPlan,
    layout: WorkerLayout,
    storage: str,
    run_name: str,
    epochs: int,
    show: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train `cfg` on every image the plan's folds use for `epochs` epochs; returns the
    model state. That is the whole CV pool, or, inside a nested search, the outer fold's
    training part (its folds never touch the outer validation images).

    `show` gets one line per epoch ("refit epoch 3/10: train loss 0.4100, 12 s") as the
    fit goes, in this process (see `RefitEpochLines`).
    """
    final_cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"epochs": epochs, "patience": None})}
    )
    first = plan.folds[0]
    everything = sorted(set(first["train"]) | set(first["val"]))
    single = replace(plan, folds=[{"train": everything, "val": []}])
    if show is None:
        result = fit_folds(final_cfg, single, layout, storage, run_name)
    else:
        # Lines cross from Ray Train's controller (an actor) to this process in a Ray
        # queue; an actor that asks for no CPU never waits behind the refit's workers.
        lines = ray.util.queue.Queue(actor_options={"num_cpus": 0})
        try:
            with relay_lines(lines, show):
                callbacks = [RefitEpochLines(epochs, lines.put)]
                result = fit_folds(final_cfg, single, layout, storage, run_name, callbacks)
        finally:
            with contextlib.suppress(Exception):  # never hide the fit's own error behind this
                lines.shutdown(force=True)  # the fit is over: nothing more will be sent
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    return state["folds"][0]["model"]


@contextlib.contextmanager
def relay_lines(lines: LineQueue, show: Callable[[str], None]) -> Iterator[None]:
    """While open, `show` every line put on `lines` (by any process), in order.

    On leaving, everything sent before is shown first: the end marker queues behind it.
    """

    def pump() -> None:
        try:
            while (line := lines.get()) is not None:
                show(line)
        except ray.exceptions.RayError:  # the queue's actor went away (Ray shut down)
            return

    thread = threading.Thread(target=pump, name="refit-lines", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(ray.exceptions.RayError):  # Ray is gone: so is the pump
            lines.put(None)
        thread.join(timeout=30)


def final_fold_states(run_uri: str, epochs_done: int) -> list[dict[str, torch.Tensor]]:
    """The fold models (weights only) in the final checkpoint of a trial's Train run.

    Empty when the checkpoint is gone (a search from before fold models were kept) or is
    not the one of the trial's last epoch (`epochs_done`), so stale weights never pass for
    the models that produced the CV score.
    """
    folder = latest_checkpoint(run_uri)
    if folder is None:
        return []
    with ray.train.Checkpoint(folder).as_directory() as local:
        state = torch.load(Path(local) / STATE_FILE, map_location="cpu", weights_only=True)
    if int(state["epoch"]) != epochs_done:
        log.warning(
            "the last checkpoint of %s is from epoch %s, not %d: fold models not kept",
            run_uri,
            state["epoch"],
            epochs_done,
        )
        return []
    return [fold["model"] for fold in state["folds"]]
