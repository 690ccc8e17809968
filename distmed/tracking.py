"""Weights & Biases: one W&B run per trial, from the Tune driver, only when asked for.

Tune's `WandbLoggerCallback` receives each trial's results on the driver (rank 0's metrics,
forwarded by Ray Train), so no worker talks to W&B. Without a project no W&B code runs.
The API key stays in the environment: it is never put into configs, logs or results, nor
into a Ray runtime environment (Ray's runtime-env agent logs those in plain text): the
logging actor reads it from its node (a local instance inherits the driver's environment;
on a cluster, set WANDB_API_KEY on the head node or run `wandb login` there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distmed.config import WandbConfig
from distmed.errors import UserError


def wandb_callbacks(cfg: WandbConfig, group: str, run_dir: Path) -> list[Any]:
    """`[WandbLoggerCallback]` for `cfg.project`, grouped by experiment; `[]` when unset.

    W&B's files (offline runs included) go under `run_dir`, beside the search results.
    """
    if not cfg.project:
        return []
    # Tune's logging actors may have been started with another environment (an existing
    # cluster), so the mode travels explicitly rather than through WANDB_MODE.
    mode = cfg.mode or os.environ.get("WANDB_MODE") or "online"
    os.environ["WANDB_MODE"] = mode  # the callback's API-key lookup is skipped when offline
    try:
        import wandb  # noqa: F401  (the callback imports it lazily; fail here, clearly)
    except ImportError as exc:
        raise UserError(
            "tracking.wandb.project is set but wandb is not installed: pip install wandb"
        ) from exc
    return [
        _callback_class()(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            # Trial configs only hold sampled hyperparameters: nothing secret to exclude,
            # but keep Ray's bookkeeping keys out of the W&B config panel.
            excludes=["time_this_iter_s", "checkpoint_path"],
            upload_checkpoints=False,
            mode=mode,
            dir=str(run_dir),
            # At the end (or a Ctrl-C) Tune waits this long for uploads, not 30 minutes;
            # what is not uploaded by then stays in run_dir for `wandb sync`.
            upload_timeout=int(os.environ.get("DISTMED_WANDB_UPLOAD_TIMEOUT_S", "30")),
        )
    ]


def _callback_class() -> type:
    """Tune's `WandbLoggerCallback`, minus the API key in its logging actor's runtime env."""
    import ray
    from ray.air.integrations.wandb import WandbLoggerCallback
    from ray.air.util.node import _force_on_current_node

    class NodeKeyWandbLoggerCallback(WandbLoggerCallback):
        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            if not self._remote_logger_class:  # Ray's own would add env_vars={WANDB_API_KEY}
                self._remote_logger_class = ray.remote(
                    num_cpus=0,
                    **_force_on_current_node(),
                    max_restarts=-1,
                    max_task_retries=-1,
                )(self._logger_actor_cls)
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    return NodeKeyWandbLoggerCallback
