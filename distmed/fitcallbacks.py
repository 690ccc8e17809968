"""The Ray Train callbacks distmed hands to a fit, and the console line of an epoch report.

Ray Train runs a fit's callbacks on its controller, an actor process that unpickles them, so
it imports this module once per fit (once per trial of a search). The controller imports
torch and `ray.train.torch` anyway; this module adds only the callbacks' own needs. They
once lived in `cv.py`, `search.py` and `refit.py`, whose imports (scikit-learn, scipy, Optuna,
the data package) cost every fit's controller ~1.3-1.8 CPU-s more on a 2-core AMD EPYC
(`python -c "import ray.train.torch, distmed.search"` 5.6 CPU-s, with `distmed.cv` 5.0,
against 3.7-3.9 with this module; `tests/test_fitcallbacks.py` keeps them out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray.train
from ray.tune.integration.ray_train import TuneReportCallback

from distmed.failures import raised_user_error


def format_epoch(
    metrics: Mapping[str, Any], epochs: int | None = None, seconds: float | None = None
) -> str:
    """One console line for an epoch report (`loop.epoch_metrics`'s keys), without a prefix.

    E.g. "epoch 3/10: CV ROC-AUC 0.8123 ± 0.0210, train loss 0.4100, 12 s". The AUC part
    appears only when the report has one (a refit has no validation data); `epochs` adds
    the "/N" and `seconds` the wall time. Both the search's trial lines and the refit's
    lines use it, so the two read alike.
    """
    total = f"/{epochs}" if epochs is not None else ""
    parts = []
    if "cv_roc_auc" in metrics:
        std = metrics.get("cv_roc_auc_std", math.nan)
        parts.append(f"CV ROC-AUC {metrics['cv_roc_auc']:.4f} ± {std:.4f}")
    parts.append(f"train loss {metrics.get('train_loss', math.nan):.4f}")
    if seconds is not None:
        parts.append(f"{seconds:.0f} s")
    return f"epoch {metrics.get('epoch')}{total}: {', '.join(parts)}"


class StopOnUserError(ray.train.UserCallback):
    """Ends a fit at a worker's `UserError` instead of retrying it `scaling.max_failures`
    times. Ray Train retries every failure of the worker group, but bad input fails every
    attempt the same way (a streamed file that cannot be decoded, a weights file): each retry
    restarted the workers and printed another traceback before the one line. An exception
    raised by a callback ends the controller's step as a `ControllerError`, which Ray
    Train's failure policy does not retry; the `UserError` inside it is the CLI's one line
    (`failures.user_error_cause` walks `controller_failure`).
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            raised = raised_user_error(error)
            if raised is not None:
                raise raised


class ReportToTune(TuneReportCallback):
    """Train's epoch reports to the trial, each with `extra` metrics added (the model size
    for a two-objective search: Tune requires every objective in every result)."""

    def __init__(self, extra: dict[str, Any]) -> None:
        super().__init__()
        self.extra = extra

    def after_report(self, run_context, metrics, checkpoint):
        with_extra = [{**metrics[0], **self.extra}, *metrics[1:]] if metrics else metrics
        super().after_report(run_context, with_extra, checkpoint)


class RefitEpochLines(ray.train.UserCallback):
    """One line per refit epoch for the console: "refit epoch 3/10: train loss 0.4100, 12 s".

    During the search, Tune brings each epoch to the driver (`search.EpochLines`); the
    refit runs outside Tune, and Ray Train calls this on its controller, an actor whose
    output reaches the console only with --verbose (`log_to_driver`). So each line goes to
    `send` (a Ray queue's `put`; `refit.relay_lines` prints it in the driver). The seconds
    are those since the previous report; the first also covers starting the workers.
    """

    def __init__(
        self, epochs: int, send: Callable[[str], Any], clock: Callable[[], float] = time.time
    ) -> None:
        self.epochs = epochs
        self.send = send
        self.clock = clock  # wall time: set here, read on the controller (same node)
        self._last = clock()

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: ray.train.Checkpoint | None,
    ) -> None:
        """`metrics[i]`: what rank i reported (`loop.epoch_metrics`); rank 0's is shown."""
        now = self.clock()
        self.send(f"refit {format_epoch(metrics[0], self.epochs, now - self._last)}")
        self._last = now
