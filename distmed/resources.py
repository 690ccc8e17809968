"""The Ray session and the worker layout: start or join Ray, decide CPUs/GPUs per worker.

A request that cannot fit the cluster is refused here with a clear message; Ray itself
would wait for the resources forever.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

from distmed.config import ScalingSection
from distmed.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerLayout:
    """How one training run is spread: workers, devices, CPUs and torch threads each."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int
    max_failures: int = 0

    @property
    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return resources


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, or start a local one sized to this machine."""
    if ray.is_initialized():
        return
    # Quiet, fast start-up for the common local case; a user's own settings win.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, log_to_driver=True, include_dashboard=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        target = f"the cluster at {address}" if address else "a local Ray instance"
        raise UserError(
            f"could not start or reach {target} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "check --address, or run 'ray status'"
        ) from exc


def plan_workers(cfg: ScalingSection, force_cpu: bool = False) -> WorkerLayout:
    """Pick the layout for one run that uses the whole cluster (the `distmed.train` case)."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    use_gpu = _want_gpu(cfg, gpus, force_cpu)
    if use_gpu and cfg.num_workers > gpus:
        raise UserError(
            f"scaling.num_workers={cfg.num_workers} needs {cfg.num_workers} GPUs but the cluster "
            f"has {gpus:g}; lower --workers or add GPU nodes"
        )
    per_worker = cfg.cpus_per_worker or max(1.0, cpus // cfg.num_workers)
    if cfg.num_workers * per_worker > cpus:
        raise UserError(
            f"scaling.num_workers={cfg.num_workers} x {per_worker:g} CPU needs "
            f"{cfg.num_workers * per_worker:g} CPUs but the cluster has {cpus:g}; "
            "lower --workers or scaling.cpus_per_worker"
        )
    return WorkerLayout(
        num_workers=cfg.num_workers,
        use_gpu=use_gpu,
        cpus_per_worker=per_worker,
        gpus_per_worker=1.0 if use_gpu else 0.0,
        threads=max(1, int(per_worker)),
        max_failures=cfg.max_failures,
    )


def _want_gpu(cfg: ScalingSection, gpus: float, force_cpu: bool) -> bool:
    if force_cpu or cfg.use_gpu is False:
        return False
    if cfg.use_gpu is True and gpus == 0:
        raise UserError(
            "scaling.use_gpu=true but Ray sees no GPU; use --cpu or scaling.use_gpu=auto"
        )
    return gpus > 0
