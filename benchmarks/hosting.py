"""The same training code in a plain process, a Ray actor, a Ray Train worker, and beside Ray.

The throughput benchmark measured distmed's Ray Train path 10-33% below the plain loop at
most cells on an AVX-512 BF16 host. This benchmark holds the code fixed, distmed's own
`train_one_epoch` and `evaluate` over two folds in lockstep, as `distmed.worker.train_folds`
runs them, and changes only where it runs:
  process    a plain Python process, no Ray
  ray-actor  a Ray actor holding the CPUs, on a local cluster started as distmed starts one
  ray-train  the one worker of a Ray Train `TorchTrainer` (the process `distmed.train` trains in)
  beside-ray a plain process again, while an idle Ray Train run (the same local cluster, its
             helper actors and one waiting worker) is up next to it: what Ray's background
             costs a loop that is not in Ray at all
Every host runs in a process of its own, their order reversed every other round. A host's
rate is the median of its fold-epochs' images/s after the first (warm-up) fold-epoch.
Run from the repository root, one Ray cluster per host (hence the lock):
  flock /tmp/distmed-ray.lock .venv/bin/python -m benchmarks.hosting [--rounds 2]
Writes benchmarks/results/hosting.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    DEFAULT_SOURCE,
    REPO,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    median,
    peak_rss_mib,
    round_order,
    usable_cpus,
    write_result,
)
from benchmarks.throughput import run_logged

HOSTS = ("process", "ray-actor", "ray-train", "beside-ray")


@dataclass(frozen=True)
class HostSpec:
    """One fold loop: the model, the images per fold-epoch and where its result goes."""

    arch: str
    image_size: int
    batch_size: int
    steps: int  # training steps per fold-epoch; validation holds as many images
    epochs: int
    threads: int
    source: str
    cache_dir: str
    out: str
    dashboard: bool = True


# --------------------------------------------------------------------------- the measured code


def fold_loop(spec: HostSpec) -> None:
    """Two folds trained in lockstep with validation after each fold-epoch; writes `spec.out`.

    The folds come from `distmed.worker.build_fold`, as in the worker, without Ray's
    `prepare_model` / `prepare_data_loader`, which change nothing for one worker on a CPU.
    """
    import torch

    from benchmarks.loops import LoopSpec, experiment_config
    from distmed.cv import positive_index
    from distmed.data import build_cache, load_cached, scan_source
    from distmed.worker import (
        FoldData,
        build_fold,
        evaluate,
        resolve_amp,
        resolve_channels_last,
        train_one_epoch,
    )

    torch.set_num_threads(spec.threads)
    loop_spec = LoopSpec(spec.arch, spec.image_size, spec.batch_size, spec.threads)
    # cfg.train.epochs sizes the learning-rate schedule, as in the worker.
    cfg = experiment_config(loop_spec, Path(spec.source), Path(spec.cache_dir), spec.epochs)
    index = scan_source(cfg.data)
    images = load_cached(build_cache(index, cfg.data).pool_path)
    labels = np.asarray(index.pool.labels, dtype=np.int64)
    per_epoch = spec.steps * spec.batch_size
    if 3 * per_epoch > len(labels):
        raise SystemExit(
            f"{spec.source}: {len(labels)} pool images, {3 * per_epoch} needed (2 folds' "
            "training + validation); lower --steps or --batch-size"
        )
    device = torch.device("cpu")
    precision = resolve_amp(cfg.train.amp, device)
    channels_last = resolve_channels_last(cfg, device)
    order = np.random.default_rng(0).permutation(len(labels))
    val = order[2 * per_epoch : 3 * per_epoch]  # both folds validate on the same images
    folds = [
        build_fold(
            FoldData(
                i,
                order[i * per_epoch : (i + 1) * per_epoch],
                val,
                images,
                labels,
                len(index.class_names),
            ),
            cfg,
            device,
            precision,
            batch_size=spec.batch_size,
        )
        for i in range(2)
    ]
    positive = positive_index(cfg, index.class_names)
    rates = []
    for epoch in range(spec.epochs):
        torch.manual_seed(epoch)
        for fold in folds:
            rates.append(
                train_one_epoch(fold, device, precision, channels_last, positive)["images_per_s"]
            )
            evaluate(fold, device, precision, channels_last, positive)
    result = {
        "fold_epoch_images_per_s": rates,
        "precision": precision,
        "channels_last": channels_last,
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "peak_rss_mib": peak_rss_mib(),
    }
    Path(spec.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------- the hosts


class _Actor:
    def run(self, spec: HostSpec) -> None:
        fold_loop(spec)


def _train_worker(config: dict[str, Any]) -> None:
    fold_loop(HostSpec(**config))


def _idle_worker(config: dict[str, Any]) -> None:
    """Say the worker is up, then wait for the stop file (a 1 s poll: 1 wake-up a second)."""
    Path(config["ready"]).touch()
    while not Path(config["stop"]).exists():
        time.sleep(1)


def run_host(host: str, spec: HostSpec) -> None:
    """Run `fold_loop` in this process (alone or beside Ray), a Ray actor or a Ray Train worker."""
    if host == "process":
        fold_loop(spec)
        return
    if host == "beside-ray":
        with idle_ray_train(spec):
            fold_loop(spec)
        return
    import ray

    # As distmed.resources.start_ray starts a local cluster (dashboard included: Ray Train's
    # cleanup of stopped Tune trials needs it; `--no-dashboard` measures what it costs),
    # plus the repository on the workers' path for `benchmarks`.
    ray.init(
        address="local",
        include_dashboard=spec.dashboard,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    try:
        if host == "ray-actor":
            actor = ray.remote(num_cpus=spec.threads)(_Actor).remote()
            ray.get(actor.run.remote(spec))
        elif host == "ray-train":
            fit_one_worker(_train_worker, asdict(spec), spec)
        else:  # "idle-ray", the neighbour `idle_ray_train` starts
            ready, stop = idle_run_files(spec)
            fit_one_worker(_idle_worker, {"ready": str(ready), "stop": str(stop)}, spec)
    finally:
        ray.shutdown()


def fit_one_worker(train_fn: Any, config: dict[str, Any], spec: HostSpec) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        train_fn,
        train_loop_config=config,
        # 1 CPU reserved, `spec.threads` used: the controller needs a sliver of a CPU too.
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(Path(spec.out).parent / "ray-train")),
    ).fit()


def host_command(host: str, spec: HostSpec) -> list[str]:
    """This module run as one host (or as the idle Ray Train run) in a process of its own."""
    return [
        sys.executable,
        "-m",
        "benchmarks.hosting",
        "--host",
        host,
        "--spec",
        json.dumps(asdict(spec)),
    ]


def idle_run_files(spec: HostSpec) -> tuple[Path, Path]:
    """The idle run's worker touches the first once up; it ends once the second exists."""
    out = Path(spec.out)
    return out.with_suffix(".ready"), out.with_suffix(".stop")


@contextmanager
def idle_ray_train(spec: HostSpec, start_timeout_s: float = 180) -> Iterator[None]:
    """An idle Ray Train run in a process of its own, up (worker started) while the block runs."""
    ready, stop = idle_run_files(spec)
    with Path(spec.out).with_suffix(".idle-ray.log").open("w") as log:
        neighbour = subprocess.Popen(
            host_command("idle-ray", spec), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready.exists():
            if neighbour.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the idle Ray Train run did not start; see {log.name}")
            time.sleep(1)
        time.sleep(5)  # the run's helper actors start with or just after its worker
        yield
    finally:
        stop.touch()
        try:
            neighbour.wait(timeout=120)
        except subprocess.TimeoutExpired:
            neighbour.kill()


# --------------------------------------------------------------------------- rounds and results


def host_rate(rates: Sequence[float]) -> float:
    """A run's images/s: the median over its fold-epochs after the first (the warm-up)."""
    if len(rates) < 2:
        raise ValueError("one fold-epoch is all warm-up; run 2 epochs or more")
    return median(rates[1:])


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per host: each round's rate, their median, and that median over the process host's."""
    rates = {h: [host_rate(r["fold_epoch_images_per_s"]) for r in done] for h, done in runs.items()}
    baseline = median(rates["process"]) if rates.get("process") else None
    return [
        {
            "host": host,
            "round_images_per_s": values,
            "images_per_s": median(values),
            "vs_process": median(values) / baseline if baseline else None,
            "niceness": runs[host][0]["niceness"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[host]),
        }
        for host, values in rates.items()
    ]


def run_in_subprocess(host: str, spec: HostSpec, log: Path, timeout_s: float) -> dict[str, Any]:
    outcome = run_logged(host_command(host, spec), log, timeout_s)
    if "error" in outcome:
        raise SystemExit(f"{host}: {outcome['error']}")
    return {**json.loads(Path(spec.out).read_text()), "wall_s": outcome["wall_s"]}


def format_table(payload: dict[str, Any]) -> str:
    rows = [
        [
            row["host"],
            ", ".join(fmt(v) for v in row["round_images_per_s"]),
            fmt(row["images_per_s"]),
            fmt(row["vs_process"], 2, "x"),
            str(row["niceness"]),
            fmt(row["peak_rss_mib"], 0),
        ]
        for row in payload["hosts"]
    ]
    headers = ["host", "img/s by round", "img/s (median)", "vs process", "niceness", "peak MiB"]
    return "\n".join([machine_line(payload["machine"]), "", markdown_table(headers, rows)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hosting",
        description="distmed's fold loop in a plain process, a Ray actor, a Ray Train worker, "
        "and a plain process beside an idle Ray Train run.",
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="training steps per fold-epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--hosts", default=",".join(HOSTS), help=f"comma-separated subset of {','.join(HOSTS)}"
    )
    parser.add_argument(
        "--no-dashboard", action="store_true", help="start the Ray hosts' cluster without it"
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="MedMNIST .npz")
    parser.add_argument("--name", default="hosting", help="result file name")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per host run")
    # internal: one run of a host, or the idle Ray Train run `beside-ray` starts
    parser.add_argument("--host", choices=(*HOSTS, "idle-ray"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.host:
        run_host(args.host, HostSpec(**json.loads(args.spec)))
        return 0
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: give 1 or more")
    asked = set(args.hosts.split(","))
    if unknown := asked - set(HOSTS):
        raise SystemExit(f"--hosts: unknown {sorted(unknown)}; choose from {HOSTS}")
    hosts = [h for h in HOSTS if h in asked]
    machine = machine_info()  # before the rounds: its load average is the one they start at
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {h: [] for h in hosts}
    with tempfile.TemporaryDirectory(prefix="distmed-hosting-") as tmp:
        for number in range(args.rounds):
            for host in round_order(hosts, number):
                spec = HostSpec(
                    args.arch,
                    args.image_size,
                    args.batch_size,
                    args.steps,
                    args.epochs,
                    usable_cpus(),
                    str(args.source),
                    str(Path(tmp) / "cache"),
                    str(Path(tmp) / f"{host}-{number}.json"),
                    dashboard=not args.no_dashboard,
                )
                runs[host].append(
                    run_in_subprocess(host, spec, Path(tmp) / f"{host}.log", args.timeout)
                )
                rate = host_rate(runs[host][-1]["fold_epoch_images_per_s"])
                print(f"round {number + 1} {host}: {rate:.1f} img/s", flush=True)
    payload = {
        "benchmark": "hosting",
        "machine": machine,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "hosts": summarise(runs),
        "runs": runs,
        "total_wall_s": time.perf_counter() - started,
    }
    path = write_result(args.name, payload)
    print()
    print(format_table(payload))
    print(f"\n{path.relative_to(REPO)}; total {payload['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
