"""Weights & Biases: one W&B run per trial, from the Tune driver, only when asked for.

Tune's `WandbLoggerCallback` receives each trial's results on the driver (rank 0's metrics,
forwarded by Ray Train), so no worker talks to W&B. Without a project no W&B code runs.
The API key stays in the environment: it is never put into configs, logs or results.
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
        from ray.air.integrations.wandb import WandbLoggerCallback
    except ImportError as exc:
        raise UserError(
            "tracking.wandb.project is set but wandb is not installed: pip install wandb"
        ) from exc
    return [
        WandbLoggerCallback(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            # Trial configs only hold sampled hyperparameters: nothing secret to exclude,
            # but keep Ray's bookkeeping keys out of the W&B config panel.
            excludes=["time_this_iter_s", "checkpoint_path"],
            upload_checkpoints=False,
            mode=mode,
            dir=str(run_dir),
        )
    ]
