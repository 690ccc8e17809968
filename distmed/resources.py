"""The Ray session and the worker layout: start or join Ray, decide CPUs/GPUs per worker.

A request that cannot fit the cluster is refused here with a clear message; Ray itself
would wait for the resources forever. "The cluster" includes the nodes an autoscaler may
still add (GPU nodes that scale from zero show no GPU until a trial asks for one).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import ray
import yaml

from distmed import _ray_compat
from distmed.config import ScalingSection
from distmed.errors import UserError

log = logging.getLogger(__name__)
# CPU reserved by each Tune trial's own driver function: it only waits on its Train workers.
TRIAL_CPU = 0.01
# Default CPUs of a streamed run's GPU worker: its training loop and Ray Data's batch
# iterator (pinning, host-to-device). Decoding runs in Ray Data tasks on the node's other
# CPUs, so a worker that held its GPU's whole CPU share would starve its own input; Ray
# Train's own default is 1 CPU per worker. Not yet measured on a GPU (docs/data.md).
STREAM_GPU_WORKER_CPUS = 2.0
# Written by `ray up` on the head node: the node types the autoscaler may launch.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
# Set to 1 to keep the session folder (Ray's logs) of the local instance distmed started.
KEEP_SESSION_ENV = "DISTMED_KEEP_RAY_SESSION"


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


def start_ray(
    address: str | None = None, worker_logs: bool = True, num_cpus: int | None = None
) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one of our own.

    `worker_logs=False` keeps Ray's worker output off the console (the search prints its
    own per-epoch lines from the driver instead). `num_cpus` caps a local instance.
    """
    bound_ray_waits()
    # `ray job submit` runs us with RAY_ADDRESS set: that cluster is the one to join.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized() and address in (None, ray.get_runtime_context().gcs_address):
        return  # connected already (an embedding program, a test, our own local start)
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return
    # Ray Train's health check stays at Ray's 2 s: polling every 0.5 s cost ~10% of the
    # training rate on 2 cores (benchmarks/throughput.py); tests set it lower for short fits.
    try:
        if address:
            ray.init(address=address, log_to_driver=worker_logs)
        else:
            start_local_ray(worker_logs=worker_logs, num_cpus=num_cpus)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        target = f"the cluster at {address}" if address else "a local Ray instance"
        raise UserError(
            f"could not start or reach {target} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "check --address, or run 'ray status'"
        ) from exc


def start_local_ray(worker_logs: bool = True, num_cpus: int | None = None) -> str:
    """Start a new local Ray instance whose every process knows its address; returns it.

    Ray code that looks for "the" cluster without being given an address (the state API,
    and Ray Train's placement-group cleaner, which runs in an actor) fails with "Found
    multiple active Ray instances" when another instance runs on this host (a colleague's
    job, a second search), or finds the other one. The cleaner's failure leaks a finished
    trial's CPUs, and the refit then waits for them forever. Ray's processes inherit the
    environment of the node that starts them, so the GCS port is chosen first
    (RAY_GCS_SERVER_PORT, read by Ray's head node) and RAY_ADDRESS names it before the
    node starts. "local": never join whatever cluster last registered on this host.
    """
    host = ray.util.get_node_ip_address()
    previous = os.environ.get("RAY_ADDRESS")
    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{host}:{port}"
    try:
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            log_to_driver=worker_logs,
            include_dashboard=True,
            **_ray_compat.node_ip_init_kwargs(host),
        )
    except BaseException:
        _restore_env("RAY_ADDRESS", previous)
        raise
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    started = ray.get_runtime_context().gcs_address
    if started != os.environ["RAY_ADDRESS"]:  # never expected; the workers' copy is stale
        log.warning("Ray started at %s, not %s", started, os.environ["RAY_ADDRESS"])
        os.environ["RAY_ADDRESS"] = started
    # Registered after Ray's own exit hook, so it runs first: it stops the instance itself.
    session = Path(cast(Any, context).address_info["session_dir"])  # a RayContext: local
    atexit.register(stop_local_ray, session)
    return started


def stop_local_ray(session: Path) -> None:
    """Stop the local Ray instance `start_local_ray` started and remove its session folder.

    Ray leaves every session folder (`<RAY_TMPDIR or /tmp>/ray/session_<time>_<pid>`: logs,
    sockets, runtime environments; tens of MB each) behind for good. Only `session`, the
    folder of the instance this process started, is removed, never another instance's; and
    not when $DISTMED_KEEP_RAY_SESSION is 1 (Ray's logs wanted).
    """
    if ray.is_initialized():  # our instance: the process joins no other after starting it
        ray.shutdown(wait_for_processes=True)  # its processes stop writing to the folder
    if os.environ.get(KEEP_SESSION_ENV) == "1":
        return
    remove_session_folder(session)


def remove_session_folder(session: Path) -> None:
    """Remove a Ray session folder and the links beside it into it (`session_latest`,
    `prom_metrics_service_discovery.json`); links into another session stay."""
    for link in session.parent.iterdir():
        if link.is_symlink():
            target = session.parent / os.readlink(link)  # as given, or relative to the folder
            if target == session or session in target.parents:
                link.unlink()
    # Seen once under load (the concurrent-search test in CI): the folder outlived rmtree,
    # a Ray process still closing having written into it meanwhile. A few tries.
    for _ in range(3):
        shutil.rmtree(session, ignore_errors=True)
        if not session.exists():
            return
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


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
    try:
        found = _ray_compat.ray_address_from_environment("auto")  # Ray's own lookup
    except ConnectionError:
        found = None
    if not found:
        raise UserError(
            "--address auto: no Ray cluster is running on this host; start one with "
            "'ray start --head', or leave out --address for a local run"
        )
    return found


def plan_workers(
    cfg: ScalingSection, concurrent: int = 0, reserve_cpus: float = 0.0
) -> WorkerLayout:
    """The layout of one run; `concurrent` > 0 when it is one of that many Tune trials.

    Default CPUs per worker: the cluster's CPUs split evenly over all workers of all
    concurrent runs, so one local run gets every core. Inside Tune each trial's driver
    holds TRIAL_CPU, which is left out of the split so that the last worker still fits.
    `reserve_cpus` (a streamed run's decoding task, `stream.decode_reserve`) is left out on
    EVERY node, with the trials' slivers: the workers then hold at most the rest, so however
    Ray places them the free CPUs add up to `reserve_cpus` per node and one node at least
    has a decoding task's CPUs free (were every node short of it, the sum would be too).
    A cluster-wide reserve did not do that: 3 trials on 3 nodes of 2 CPUs took 1.65 CPUs a
    worker, left 0.34 free on each node, and the 1-CPU decoding tasks waited forever.
    """
    total = cluster_capacity()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    use_gpu = _want_gpu(cfg, gpus)
    workers = cfg.num_workers * max(1, concurrent)
    if use_gpu:
        _check_gpus(cfg, gpus)
    if cfg.cpus_per_worker is None and not use_gpu and workers > cpus:
        raise UserError(
            f"scaling.num_workers={cfg.num_workers} CPU workers need {workers} CPUs but the "
            f"cluster has {cpus:g}; lower --workers (or set scaling.cpus_per_worker to share)"
        )
    nodes = node_shapes()
    if reserve_cpus > 0:
        held = reserve_cpus + TRIAL_CPU * concurrent  # on each node
        shapes = [{**shape, "CPU": max(0.0, shape.get("CPU", 0.0) - held)} for shape in nodes]
        spare = sum(shape["CPU"] for shape in shapes)
    else:
        shapes, spare = nodes, cpus - TRIAL_CPU * concurrent
    per_worker = cfg.cpus_per_worker or _default_cpus(spare, workers, use_gpu, cfg, shapes)
    if use_gpu and reserve_cpus > 0 and cfg.cpus_per_worker is None:
        per_worker = min(per_worker, STREAM_GPU_WORKER_CPUS)  # the rest decodes for it
    if reserve_cpus > 0 and per_worker < 0.01:  # Ray refuses an empty bundle, in a traceback
        largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
        raise UserError(
            f"data.stream_decode_cpus={reserve_cpus:g} is kept free on every node for the "
            f"decoding tasks, which leaves the Train workers no CPU on nodes of {largest:g} "
            "CPUs; lower it (0.5 or 1) or add CPUs"
        )
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
    requested: int, num_samples: int, cfg: ScalingSection, reserve_cpus: float = 0.0
) -> int:
    """How many trials can train side by side: never more than the cluster's devices hold.

    Each trial's workers need their CPUs (and GPUs); the trial's own driver is idle while
    its workers train and reserves only a sliver of a CPU, so it never blocks them.
    `reserve_cpus` on every node stay out of every trial's reach (a streamed search's
    decoding tasks, `plan_workers`).
    """
    total = cluster_capacity()
    held = reserve_cpus * len(node_shapes()) if reserve_cpus > 0 else 0.0
    cpus, gpus = float(total.get("CPU", 0)) - held, float(total.get("GPU", 0))
    per_trial_cpus = cfg.num_workers * (cfg.cpus_per_worker or 1.0) + TRIAL_CPU
    fits = int(cpus // per_trial_cpus) if cfg.cpus_per_worker else int(cpus // cfg.num_workers)
    if _want_gpu(cfg, gpus):
        fits = min(fits, int(gpus // (cfg.num_workers * cfg.gpus_per_worker)))
    return max(1, min(requested, num_samples, fits))


def cluster_capacity() -> dict[str, float]:
    """The cluster's resources now, raised to the autoscaler's maximum where one is known."""
    total = {key: float(value) for key, value in ray.cluster_resources().items()}
    for key, value in _autoscaler_maximum().items():
        total[key] = max(total.get(key, 0.0), value)
    return total


def _autoscaler_maximum() -> dict[str, float]:
    """What the autoscaler could grow the cluster to; empty when nothing says so."""
    grown: dict[str, float] = {}
    for shape, count in _autoscaled_node_types():
        for key, value in shape.items():
            grown[key] = grown.get(key, 0.0) + value * count
    try:  # the same private source Ray Train's own start-up check reads (KubeRay, v2)
        reported = _ray_compat.autoscaler_max_resources()
    except Exception as exc:  # an optional hint: a GCS without it never breaks a run
        log.debug("no autoscaler maximum from the GCS: %s", exc)
        reported = {}
    for key, value in reported.items():
        grown[key] = max(grown.get(key, 0.0), float(value))
    return grown


def node_shapes() -> list[dict[str, float]]:
    """Resources of every node the cluster has, or of every node an autoscaler may run."""
    launchable = [
        shape for shape, count in _autoscaled_node_types() for _ in range(min(count, 1000))
    ]
    if launchable:  # the `ray up` config describes the whole cluster, head included
        return launchable
    return [
        {k: float(v) for k, v in node["Resources"].items()} for node in ray.nodes() if node["Alive"]
    ]


def _autoscaled_node_types() -> list[tuple[dict[str, float], int]]:
    """(resources, max count) of every node type of a `ray up` cluster, head included.

    Read from the head's bootstrap config (the driver of `ray job submit` runs on the head);
    an empty list where there is none, e.g. a local Ray or a manual `ray start` cluster.
    """
    path = BOOTSTRAP_CONFIG.expanduser()
    if not path.is_file():
        return []
    try:
        config: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
        head = config.get("head_node_type")
        types = config.get("available_node_types") or {}
        return [
            (
                {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                1 if name == head else int(spec.get("max_workers", 0)),
            )
            for name, spec in types.items()
        ]
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return []


def _check_gpus(cfg: ScalingSection, gpus: float) -> None:
    """Refuse GPU layouts that cannot run: too few GPUs, or DDP ranks sharing one GPU."""
    if cfg.num_workers * cfg.gpus_per_worker > gpus:
        raise UserError(
            f"scaling.num_workers={cfg.num_workers} x {cfg.gpus_per_worker:g} GPU needs "
            f"{cfg.num_workers * cfg.gpus_per_worker:g} GPUs but the cluster has {gpus:g}; "
            "lower --workers or --gpus-per-worker, or add GPU nodes"
        )
    if cfg.num_workers > 1 and cfg.gpus_per_worker < 1:
        # Two ranks of one run on the same GPU: NCCL aborts ("Duplicate GPU detected").
        raise UserError(
            f"scaling.gpus_per_worker={cfg.gpus_per_worker:g} with {cfg.num_workers} workers "
            "would put two DDP ranks on one GPU, which NCCL refuses; use whole GPUs per "
            "worker, or one worker per trial to pack trials onto a GPU"
        )


def _default_cpus(
    spare: float, workers: int, use_gpu: bool, cfg: ScalingSection, shapes: list[dict[str, float]]
) -> float:
    """An even share of the cluster's CPUs, cut so that the workers fit on its nodes
    (`shapes`: each node's resources, less what is reserved on it).

    A GPU worker gets at most its GPU share of the CPUs of the leanest GPU node, so every
    GPU of every node can be used. CPU workers get the largest share at which all of them
    can be placed, each on one node (one worker on a 2 + 1 CPU cluster: 2; two: 1 each).
    """
    share = _even_share(spare, workers)
    if use_gpu:
        per_gpu = [s.get("CPU", 0.0) / s["GPU"] for s in shapes if s.get("GPU", 0.0) > 0]
        limit = min(per_gpu) * cfg.gpus_per_worker if per_gpu else share
        return max(0.01, min(share, math.floor(limit * 100) / 100))
    return _fitting_share(share, workers, [s.get("CPU", 0.0) for s in shapes])


def _fitting_share(share: float, workers: int, node_cpus: list[float]) -> float:
    """The largest CPUs per worker, at most `share`, at which `workers` fit on the nodes."""
    candidates = {share} | {
        math.floor(cpus / count * 100) / 100
        for cpus in node_cpus
        for count in range(1, workers + 1)
    }
    for each in sorted((c for c in candidates if 0 < c <= share), reverse=True):
        if sum(math.floor(cpus / each + 1e-9) for cpus in node_cpus) >= workers:
            return each
    return share  # nothing fits: the checks that follow report it


def _even_share(cpus: float, workers: int) -> float:
    """CPUs per worker, rounded down to 0.01 so that all the shares always fit."""
    return math.floor(cpus / workers * 100) / 100


def _want_gpu(cfg: ScalingSection, gpus: float) -> bool:
    # `--cpu` arrives here as scaling.use_gpu=false (cli.overrides_from_args).
    if cfg.use_gpu is False:
        return False
    if cfg.use_gpu is True and gpus == 0:
        raise UserError(
            "scaling.use_gpu=true but Ray sees no GPU; use --cpu or scaling.use_gpu=auto"
        )
    return gpus > 0


def bound_ray_waits() -> None:
    """Bounds for the waits inside Ray that have none (or 10 minutes) by default.

    Set in the driver's environment before Ray Train or Tune start; Ray Train forwards its
    own variables to its controller. A value the user set is kept.
    - Ray Train gives a worker group 60 s to start, then retries without end: on a loaded
      2-core machine a worker can need longer, and a group that cannot get its CPUs never
      starts. 180 s per try, `cv.START_RETRIES` retries (`cv.fit_folds`), then an error.
    - Tune waits up to 600 s for a stopped trial to end before killing it: 10 s.
    """
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "10")


def wait_for_free_resources(layout: WorkerLayout, purpose: str) -> None:
    """Return once the cluster has `layout`'s CPUs and GPUs free, within a bound.

    Ray Train frees a finished or stopped run's placement group from a helper actor, which
    can lag or fail; a new fit (the refit after a search) would then wait for CPUs forever.
    Called when none of this driver's runs is active, so this job's placement groups that
    are still held are leftovers and are removed first. Other jobs' groups are never
    touched: if they hold the resources, this waits $DISTMED_RESOURCE_WAIT_S (default 120)
    seconds and then stops with one line saying what is missing.

    Raises:
        UserError: the resources did not become free in time.
    """
    removed = remove_leftover_placement_groups()
    if removed:
        log.info("removed %d placement group(s) left by finished trials", removed)
    need = {"CPU": layout.num_workers * layout.cpus_per_worker}
    if layout.use_gpu:
        need["GPU"] = layout.num_workers * layout.gpus_per_worker
    # Beyond what the cluster has now only an autoscaler can help: Ray Train asks it.
    total = ray.cluster_resources()
    need = {k: v for k, v in need.items() if v <= total.get(k, 0.0) + 1e-9}
    timeout = float(os.environ.get("DISTMED_RESOURCE_WAIT_S", "120"))
    deadline = time.monotonic() + timeout
    while True:
        free = ray.available_resources()
        missing = {k: v for k, v in need.items() if free.get(k, 0.0) + 1e-9 < v}
        if not missing:
            return
        if time.monotonic() > deadline:
            held = ", ".join(f"{free.get(k, 0.0):g} of {v:g} {k}" for k, v in missing.items())
            raise UserError(
                f"{purpose} needs {held} free after waiting {timeout:g} s: other Ray work on "
                "this cluster holds them ('ray status' shows it); stop it, then run again "
                "(a search: the same command with --resume keeps every finished trial)"
            )
        time.sleep(0.5)


def remove_leftover_placement_groups() -> int:
    """Remove the placement groups this driver's job still holds; returns how many.

    Only for when none of the job's runs is active. A placement group id ends with the id
    of the job that created it (`PlacementGroupID.of(job_id)` in Ray's ids), and actors
    (Tune trials, Train controllers) create theirs under their driver's job.
    """
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg_id, info in ray.util.placement_group_table().items():
        if info.get("state") == "REMOVED" or not pg_id.endswith(job):
            continue
        group = PlacementGroup(ray.PlacementGroupID.from_hex(pg_id))
        try:
            ray.util.remove_placement_group(group)
            removed += 1
        except Exception as exc:  # removed meanwhile by its owner: nothing left to free
            log.debug("placement group %s: %s", pg_id, exc)
    return removed


def keep_secrets_out_of_ray() -> None:
    """Stop Ray Tune from copying cloud credentials into its trial actors' runtime env.

    Ray Tune puts AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN /
    AWS_SECURITY_TOKEN into the `runtime_env` of every trial actor
    (`ray.tune.execution.class_cache`), and Ray's runtime-env agent writes every runtime env
    it creates, values included, into the session's `logs/runtime_env_agent.log`, which
    any user of the machine can read. Workers get credentials the way the rest of the node
    does instead: a local instance inherits this process's environment when it starts,
    and a cluster's nodes have their own (instance roles, their environment, `aws
    configure`). Ray keeps the names in a module-level set that it reads for every trial.
    """
    forwarded = _ray_compat.forwarded_env_vars()  # raises rather than skip the scrub
    forwarded.difference_update(name for name in list(forwarded) if is_secret_name(name))


def is_secret_name(name: str) -> bool:
    """True for environment variables that hold credentials (keys, tokens, passwords)."""
    upper = name.upper()
    return upper.startswith("AWS_") or any(
        word in upper for word in ("SECRET", "TOKEN", "PASSWORD", "API_KEY", "CREDENTIAL")
    )
