"""The Ray session and the worker layout: start or join Ray, decide CPUs/GPUs per worker.

A request that cannot fit the cluster is refused here with a clear message; Ray itself
would wait for the resources forever.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import ray

from distmed.config import ScalingSection
from distmed.errors import UserError

log = logging.getLogger(__name__)
# CPU reserved by each Tune trial's own driver function: it only waits on its Train workers.
TRIAL_CPU = 0.01


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


def start_ray(address: str | None = None, worker_logs: bool = True) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one of our own.

    `worker_logs=False` keeps Ray's worker output off the console (the search prints its
    own per-epoch lines from the driver instead).
    """
    # `ray job submit` runs us with RAY_ADDRESS set: that cluster is the one to join.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    if ray.is_initialized():  # an embedding program (or a test) has connected already
        return
    # Quiet, fast start-up for the common local case; a user's own settings win.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    try:
        if address:
            ray.init(address=address, log_to_driver=worker_logs)
        else:
            # "local": always a fresh instance of our own; without it Ray would join whatever
            # cluster last registered on this host, even a dead one. --address auto joins.
            ray.init(address="local", log_to_driver=worker_logs, include_dashboard=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        target = f"the cluster at {address}" if address else "a local Ray instance"
        raise UserError(
            f"could not start or reach {target} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "check --address, or run 'ray status'"
        ) from exc


def check_reachable(address: str) -> None:
    """Fail within seconds, in one line, when no Ray cluster answers at `address`.

    Left alone, `ray.init` retries an unreachable or silent address for minutes. A refused
    port fails at once; anything else is tried by a throw-away driver process that is
    stopped after $DISTMED_RAY_CONNECT_TIMEOUT_S (default 20) seconds.
    """
    target = _resolve_address(address)
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.5:6379)"
        )
    hint = "start one with 'ray start --head' or 'ray up', or check the address and any tunnel"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"--address {address}: no Ray cluster at {target} ({reason}); {hint}"
        ) from exc
    timeout = float(os.environ.get("DISTMED_RAY_CONNECT_TIMEOUT_S", "20"))
    probe = [sys.executable, "-c", _PROBE, address]
    try:
        subprocess.run(probe, timeout=timeout, capture_output=True, text=True, check=True)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"--address {address}: {target} accepts connections but did not answer as a Ray "
            f"cluster within {timeout:g} s; {hint}"
        ) from None
    except subprocess.CalledProcessError as exc:
        lines = [line for line in exc.stderr.splitlines() if line.strip()]
        raise UserError(
            f"--address {address}: could not join ({lines[-1][:200] if lines else 'no output'})"
            f"; {hint}"
        ) from None


# Joins and leaves the cluster at argv[1]; run in a child process so it can be timed out.
_PROBE = "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); ray.shutdown()"


def _resolve_address(address: str) -> str:
    if address.startswith("ray://"):
        return address.removeprefix("ray://").split("/", 1)[0]
    if address != "auto":
        return address
    from ray._private.services import get_ray_address_from_environment  # Ray's own lookup

    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    if not found:
        raise UserError(
            "--address auto: no Ray cluster is running on this host; start one with "
            "'ray start --head', or leave out --address for a local run"
        )
    return found


def plan_workers(cfg: ScalingSection, force_cpu: bool = False, concurrent: int = 0) -> WorkerLayout:
    """The layout of one run; `concurrent` > 0 when it is one of that many Tune trials.

    Default CPUs per worker: the cluster's CPUs split evenly over all workers of all
    concurrent runs, so one local run gets every core. Inside Tune each trial's driver
    holds TRIAL_CPU, which is left out of the split so that the last worker still fits.
    """
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    use_gpu = _want_gpu(cfg, gpus, force_cpu)
    workers = cfg.num_workers * max(1, concurrent)
    if use_gpu and cfg.num_workers * cfg.gpus_per_worker > gpus:
        raise UserError(
            f"scaling.num_workers={cfg.num_workers} x {cfg.gpus_per_worker:g} GPU needs "
            f"{cfg.num_workers * cfg.gpus_per_worker:g} GPUs but the cluster has {gpus:g}; "
            "lower --workers or --gpus-per-worker, or add GPU nodes"
        )
    if cfg.cpus_per_worker is None and not use_gpu and workers > cpus:
        raise UserError(
            f"scaling.num_workers={cfg.num_workers} CPU workers need {workers} CPUs but the "
            f"cluster has {cpus:g}; lower --workers (or set scaling.cpus_per_worker to share)"
        )
    spare = cpus - TRIAL_CPU * concurrent
    per_worker = cfg.cpus_per_worker or _even_share(spare, workers)
    if cfg.num_workers * per_worker > spare + 1e-9:
        raise UserError(
            f"scaling.num_workers={cfg.num_workers} x {per_worker:g} CPU needs "
            f"{cfg.num_workers * per_worker:g} CPUs but the cluster has {spare:g} free; "
            "lower --workers or scaling.cpus_per_worker"
        )
    return WorkerLayout(
        num_workers=cfg.num_workers,
        use_gpu=use_gpu,
        cpus_per_worker=per_worker,
        gpus_per_worker=cfg.gpus_per_worker if use_gpu else 0.0,
        threads=max(1, round(per_worker)),
        max_failures=cfg.max_failures,
    )


def concurrency_limit(
    requested: int, num_samples: int, cfg: ScalingSection, force_cpu: bool
) -> int:
    """How many trials can train side by side: never more than the cluster's devices hold.

    Each trial's workers need their CPUs (and GPUs); the trial's own driver is idle while
    its workers train and reserves only a sliver of a CPU, so it never blocks them.
    """
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    per_trial_cpus = cfg.num_workers * (cfg.cpus_per_worker or 1.0) + TRIAL_CPU
    fits = int(cpus // per_trial_cpus) if cfg.cpus_per_worker else int(cpus // cfg.num_workers)
    if _want_gpu(cfg, gpus, force_cpu):
        fits = min(fits, int(gpus // (cfg.num_workers * cfg.gpus_per_worker)))
    return max(1, min(requested, num_samples, fits))


def _even_share(cpus: float, workers: int) -> float:
    """CPUs per worker, rounded down to 0.01 so that all the shares always fit."""
    return math.floor(cpus / workers * 100) / 100


def _want_gpu(cfg: ScalingSection, gpus: float, force_cpu: bool) -> bool:
    if force_cpu or cfg.use_gpu is False:
        return False
    if cfg.use_gpu is True and gpus == 0:
        raise UserError(
            "scaling.use_gpu=true but Ray sees no GPU; use --cpu or scaling.use_gpu=auto"
        )
    return gpus > 0
