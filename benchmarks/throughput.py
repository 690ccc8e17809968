"""Training throughput and peak memory: distmed through Ray Train vs without Ray vs ImageFolder.

For each cell (ResNet, image size, batch) three paths run back to back on the same machine:
  ray          `python -m distmed.train` (the product path: Ray Train, 1 worker, 2-fold CV,
               2 epochs, `train.amp=auto`); steady-state images/s is the median of the
               workers' per-epoch training rates without the first epoch of the first fold.
  plain        the same model, precision, memory format and cached tensors in a plain loop.
  imagefolder  ImageFolder + PIL + transforms every epoch, fp32, NCHW, on PNGs of the same data.
Run from the repository root, one Ray cluster per host (hence the lock):
  flock /tmp/distmed-ray.lock .venv/bin/python -m benchmarks.throughput [--quick] [--only ...]
`--rounds N` runs every path N times per cell in alternating order (medians over the rounds):
on a shared VM whose speed drifts between runs, that is what a Ray-vs-plain ratio needs.
Writes benchmarks/results/throughput.json (after every cell) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_SOURCE,
    REPO,
    SUBSET_VAL,
    CpuSnapshot,
    SessionCpu,
    fmt,
    log_tail,
    machine_info,
    machine_line,
    markdown_table,
    median,
    pool_of,
    read_npz,
    round_order,
    usable_cpus,
    write_png_folder,
    write_result,
    write_subset_npz,
)
from benchmarks.loops import LoopBudget

PATHS = ("ray", "plain", "imagefolder")
# The order they run in: the Ray run is sized from the plain loop's step time.
RUN_ORDER = ("plain", "imagefolder", "ray")
# Images in the pool that the in-process loops cycle through (they reshuffle per pass).
LOOP_POOL = 1024
FOLDS = 2
EPOCHS = 2


@dataclass(frozen=True)
class Cell:
    arch: str
    image_size: int
    batch_size: int

    @property
    def id(self) -> str:
        return f"{self.arch}@{self.image_size}/b{self.batch_size}"

    @property
    def slug(self) -> str:
        return f"{self.arch}-{self.image_size}-b{self.batch_size}"


@dataclass(frozen=True)
class RayBudget:
    """How the Ray run is sized: training steps per fold-epoch, fitted to `epoch_seconds`.

    The step time comes from the plain loop of the same cell (same work per step); with
    2 folds x 2 epochs, 3 fold-epochs are measured, so even `min_steps=1` times 3 steps.
    """

    epoch_seconds: float = 4.0
    min_steps: int = 1


# Issue #7: ResNet-18 and -50 at 64 and 224 px, plus ResNet-18 at 128 px (the acceptance
# criterion is stated at 128 and 224 px), batch 32 and 128; cheap cells first.
FULL_CELLS = tuple(
    Cell(arch, size, batch)
    for arch, size in (
        ("resnet18", 64),
        ("resnet50", 64),
        ("resnet18", 128),
        ("resnet18", 224),
        ("resnet50", 224),
    )
    for batch in (32, 128)
)
QUICK_CELLS = (Cell("resnet18", 64, 16),)
FULL_BUDGET = (LoopBudget(), RayBudget())
QUICK_BUDGET = (
    LoopBudget(repeat_seconds=0.0, cell_seconds=1.0, min_steps=2, max_repeats=2),
    RayBudget(epoch_seconds=0.0, min_steps=1),
)


@dataclass(frozen=True)
class Workspace:
    """Temporary inputs shared by all cells: the source, its loop pool as .npz and as PNGs."""

    root: Path
    source: Path
    loop_npz: Path
    png_root: Path
    cache_dir: Path
    threads: int
    timeout_s: float

    @classmethod
    def create(cls, root: Path, source: Path, threads: int, timeout_s: float) -> Workspace:
        loop_npz = write_subset_npz(source, root / "loop-pool.npz", LOOP_POOL)
        png_root = write_png_folder(*pool_of(loop_npz), root / "loop-pool-png")
        return cls(root, source, loop_npz, png_root, root / "cache", threads, timeout_s)


# --------------------------------------------------------------------------- one cell


def run_cell(
    cell: Cell,
    work: Workspace,
    budget: tuple[LoopBudget, RayBudget],
    paths: Sequence[str],
    rounds: int = 1,
) -> dict[str, Any]:
    """All selected paths of one cell, back to back, so their ratios share the conditions.

    With `rounds` > 1 every path runs that many times, the order reversed every other round
    (plain, ray, ray, plain, ...), so a drift of this shared machine during the cell falls
    on both paths alike; each path's rate is then its median over the rounds.
    """
    loop_budget, ray_budget = budget
    started = time.perf_counter()
    result: dict[str, Any] = {
        "cell": cell.id,
        **asdict(cell),
        "load_average_at_start": list(os.getloadavg()),
    }
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in RUN_ORDER if p in paths}
    steps = None
    for number in range(rounds):
        for path in round_order(list(runs), number):
            if path != "ray":
                runs[path].append(run_loop_process(path, cell, work, loop_budget))
                continue
            if steps is None:  # sized once, from the first plain run, so every round matches
                plain = runs.get("plain", [None])[0]
                steps = ray_steps(cell, plain, ray_budget, work.source)
            runs[path].append(run_ray_cli(cell, work, steps))
    result.update({path: combine_rounds(done) for path, done in runs.items()})
    result["ratios"] = ratios(result)
    if rounds > 1:
        result["round_ratios"] = [ratios({p: d[i] for p, d in runs.items()}) for i in range(rounds)]
    result["cell_wall_s"] = time.perf_counter() - started
    return result


def combine_rounds(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's runs of a cell as one entry: the median rate, the worst disturbance."""
    measured = [r for r in done if "images_per_s" in r]
    if len(done) == 1 or not measured:
        return done[0]
    worst = {k: max(r[k] for r in measured) for k in ("other_cores", "steal_cores")}
    return {
        **measured[0],  # settings and counts, which every round shares
        **worst,
        "images_per_s": median([r["images_per_s"] for r in measured]),
        "round_images_per_s": [r.get("images_per_s") for r in done],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in measured),
        "rounds": done,
    }


def run_loop_process(kind: str, cell: Cell, work: Workspace, budget: LoopBudget) -> dict[str, Any]:
    """`python -m benchmarks.loops KIND ...` in a process of its own (its own peak memory)."""
    out = work.root / f"{kind}-{cell.slug}.json"
    data = work.loop_npz if kind == "plain" else work.png_root
    command = [
        sys.executable,
        "-m",
        "benchmarks.loops",
        kind,
        f"--arch={cell.arch}",
        f"--image-size={cell.image_size}",
        f"--batch-size={cell.batch_size}",
        f"--threads={work.threads}",
        f"--data={data}",
        f"--cache-dir={work.cache_dir}",
        f"--budget={json.dumps(asdict(budget))}",
        f"--out={out}",
    ]
    outcome = run_logged(command, out.with_suffix(".log"), work.timeout_s)
    if "error" in outcome:
        return outcome
    return {**json.loads(out.read_text()), "process_wall_s": outcome["wall_s"]}


def ray_steps(cell: Cell, plain: dict[str, Any] | None, budget: RayBudget, source: Path) -> int:
    """Training steps per fold-epoch for the Ray run, from the plain loop's step time."""
    # The subset's training images number FOLDS * steps * batch (see run_ray_cli).
    most = max(1, len(read_npz(source)["train_images"]) // (FOLDS * cell.batch_size))
    if not plain or "images_per_s" not in plain:
        return min(most, budget.min_steps)  # no step time measured: the smallest run
    step_s = cell.batch_size / plain["images_per_s"]
    return min(most, max(budget.min_steps, math.ceil(budget.epoch_seconds / step_s)))


def run_ray_cli(cell: Cell, work: Workspace, steps: int) -> dict[str, Any]:
    """The product path: `python -m distmed.train` on a pool sized to `steps` per fold-epoch."""
    # 2-fold CV: each fold trains on about half the pool; the few val images on top absorb
    # the stratified split's rounding so that every fold still holds `steps` full batches.
    num_pool = FOLDS * steps * cell.batch_size + SUBSET_VAL
    npz = write_subset_npz(work.source, work.root / f"ray-{cell.slug}.npz", num_pool)
    output = work.root / f"ray-{cell.slug}"
    overrides = {
        "model.weights": "none",
        "model.arch": cell.arch,
        "data.image_size": cell.image_size,
        "data.cache_dir": work.cache_dir,
        "train.batch_size": cell.batch_size,
        "train.epochs": EPOCHS,
        "train.amp": "auto",
        "cv.folds": FOLDS,
    }
    command = [sys.executable, "-m", "distmed.train", "--data", str(npz), "--output", str(output)]
    command.append("--cpu")  # CPU numbers even where a GPU is visible, like the other paths
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    outcome = run_logged(command, work.root / f"ray-{cell.slug}.log", work.timeout_s)
    if "error" in outcome:
        return outcome
    try:
        summary = summarise_cv_result(json.loads((output / "cv_result.json").read_text()))
    except (OSError, KeyError, ValueError) as exc:
        return {"error": f"unreadable cv_result.json: {type(exc).__name__}: {exc}"}
    finally:
        shutil.rmtree(output, ignore_errors=True)  # checkpoints hold 2 models + optimisers
    return {
        **summary,
        "pool_images": num_pool,
        "steps_per_fold_epoch": steps,
        "cli_wall_s": outcome["wall_s"],
        "other_cores": outcome["other_cores"],
        "steal_cores": outcome["steal_cores"],
        "while_training": outcome.get("while_training"),
        "command": " ".join(command[1:]),
    }


def summarise_cv_result(result: dict[str, Any]) -> dict[str, Any]:
    """Steady-state images/s from the epoch records; the first fold-epoch is the warm-up."""
    rates = [
        (fold_number, record["epoch"], record["train_images_per_s"])
        for fold_number, fold in enumerate(result["folds"])
        for record in fold["history"]
    ]
    measured = [rate for fold, epoch, rate in rates if (fold, epoch) != (0, 1)]
    if not measured:
        raise ValueError("no fold-epoch after the warm-up; raise train.epochs or cv.folds")
    return {
        "images_per_s": median(measured),
        "epoch_images_per_s": measured,
        "warmup_epoch_images_per_s": [
            rate for fold, epoch, rate in rates if (fold, epoch) == (0, 1)
        ],
        "measured_fold_epochs": len(measured),
        "precision": result["precision"],
        "channels_last": result["channels_last"],
        "world_size": result["world_size"],
        "peak_rss_mib": result["peak_rss_mib"],  # the Ray worker's ru_maxrss (KiB / 1024)
        "cli_internal_wall_s": result["wall_time_s"],  # from config load to result, no imports
    }


def run_logged(
    command: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a benchmark process with its output in `log`; {'wall_s', ...} or {'error'}.

    The process leads a session of its own: a timeout or Ctrl-C stops it together with the
    Ray processes it started (a stray cluster would disturb every later cell), and the
    CPU that those use is told apart from other people's (see `SessionCpu`). `env`: the
    process's environment (default: this one's).
    """
    before = CpuSnapshot.take()
    with log.open("w") as handle:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    session = SessionCpu(process.pid)
    deadline = before.wall + timeout_s
    try:
        while (returncode := _wait(process, 1.0)) is None:
            session.sample()
            if time.perf_counter() > deadline:
                stop_group(process)
                return {"error": f"timed out after {timeout_s:g} s; log tail:\n{log_tail(log)}"}
    except BaseException:
        stop_group(process)
        raise
    if returncode != 0:
        return {"error": f"exit status {returncode}; log tail:\n{log_tail(log)}"}
    after = CpuSnapshot.take()
    outcome = {"wall_s": after.wall - before.wall, **after.others_since(before, session.total)}
    if session.training_wall:  # a Ray run: what Ray's other processes took while it trained
        outcome["while_training"] = session.training_summary()
    return outcome


def _wait(process: subprocess.Popen, seconds: float) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group we started (SIGKILL after 15 s), then reap the leader."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """distmed/ImageFolder and Ray/plain, from the images/s measured in this cell."""
    rate = {p: result.get(p, {}).get("images_per_s") for p in PATHS}
    out = {}
    if rate["ray"] and rate["imagefolder"]:
        out["distmed_over_imagefolder"] = rate["ray"] / rate["imagefolder"]
    if rate["plain"] and rate["imagefolder"]:
        out["plain_over_imagefolder"] = rate["plain"] / rate["imagefolder"]
    if rate["ray"] and rate["plain"]:
        out["ray_over_plain"] = rate["ray"] / rate["plain"]
        out["ray_overhead"] = 1 - rate["ray"] / rate["plain"]
    return out


# --------------------------------------------------------------------------- tables


def format_tables(payload: dict[str, Any]) -> str:
    """Markdown for BENCHMARKS.md: rates and ratios, memory and wall time, then the counts."""
    cells = payload["cells"]
    rates = [
        [
            c["cell"],
            _precision(c),
            _rate(c, "ray"),
            _rate(c, "plain"),
            _rate(c, "imagefolder"),
            fmt(c["ratios"].get("distmed_over_imagefolder"), 2, "x"),
            fmt(c["ratios"].get("ray_over_plain"), 2, "x"),
        ]
        for c in cells
    ]
    costs = [
        [
            c["cell"],
            *(fmt(c.get(p, {}).get("peak_rss_mib"), 0) for p in PATHS),
            fmt(c.get("ray", {}).get("cli_wall_s"), 0),
        ]
        for c in cells
    ]
    counts = [[c["cell"], *(_count(c, p) for p in PATHS)] for c in cells]
    errors = [f"- {c['cell']} {p}: {c[p]['error']}" for c in cells for p in PATHS if _failed(c, p)]
    parts = [
        f"Machine: {machine_line(payload['machine'])}",
        f"Threads: {payload['settings']['threads']} (what the one Ray worker uses here)",
        "",
        markdown_table(
            (
                "cell",
                "distmed precision",
                "distmed via Ray img/s",
                "plain loop img/s",
                "ImageFolder fp32 img/s",
                "distmed / ImageFolder",
                "Ray / plain",
            ),
            rates,
        ),
        "",
        markdown_table(
            (
                "cell",
                "peak RSS MiB, Ray worker",
                "plain",
                "ImageFolder",
                "CLI wall s (Ray start, 2 folds x 2 epochs, validation, checkpoints)",
            ),
            costs,
        ),
        "",
        markdown_table(("cell", "Ray: what was timed", "plain", "ImageFolder"), counts),
        "",
        NOTES,
    ]
    if rounds := _rounds_table(cells):
        parts += ["", rounds, "", ROUNDS_NOTES]
    if errors:
        parts += ["", "Failed:", *errors]
    return "\n".join(parts)


NOTES = (
    "img/s: medians. Ray: per-epoch training rate timed inside the Ray worker, median over "
    "the fold-epochs after the first (warm-up) one. plain / ImageFolder: median over repeats "
    "of consecutive timed steps after one warm-up step, data loading included. Every path "
    "applies the default training augmentation (hflip, rotation up to 10 degrees): distmed in "
    "batch on tensors, ImageFolder per image in PIL. Peak RSS: the Ray worker holds both "
    "folds' models and optimisers (folds train in lockstep), the in-process loops one. "
    "others / steal: average cores that other processes / the hypervisor took while the path "
    "was timed (for Ray: over the whole CLI run, Ray's own processes not counted); well above "
    "0 means a disturbed number."
)


ROUNDS_NOTES = (
    "By round: each path's rate in every round (the order reversed every other round), the "
    "Ray / plain ratio of each round, and the cores that Ray's other processes (the driver, "
    "controller, helper actors, raylet, GCS, dashboard) used in the sampling intervals where "
    "the Ray Train worker kept at least one core busy, with the busiest of them."
)


def _rounds_table(cells: Sequence[dict[str, Any]]) -> str | None:
    rows = []
    for c in cells:
        if "round_ratios" not in c:
            continue
        by_round = [
            ", ".join(fmt(rate) for rate in c.get(p, {}).get("round_images_per_s", []))
            for p in ("ray", "plain")
        ]
        ray_over_plain = ", ".join(fmt(r.get("ray_over_plain"), 2) for r in c["round_ratios"])
        rows.append([c["cell"], *by_round, ray_over_plain, _background(c.get("ray", {}))])
    if not rows:
        return None
    headers = (
        "cell",
        "Ray img/s by round",
        "plain img/s by round",
        "Ray / plain by round",
        "Ray's other processes while training: cores (busiest)",
    )
    return markdown_table(headers, rows)


def _background(ray: dict[str, Any]) -> str:
    runs = ray.get("rounds", [ray])
    seen = [r["while_training"] for r in runs if r.get("while_training")]
    if not seen:
        return "-"
    cores = ", ".join(f"{s['others_cores']:.2f}" for s in seen)
    busiest = max(seen[0]["busiest_others"].items(), key=lambda item: item[1], default=None)
    return cores + (f" ({busiest[0]} {busiest[1]:.2f})" if busiest else "")


def _precision(cell: dict[str, Any]) -> str:
    source = cell.get("ray") if "precision" in cell.get("ray", {}) else cell.get("plain", {})
    if "precision" not in source:
        return "-"
    precision = "fp32" if source["precision"] == "off" else source["precision"]
    return precision + (" + channels_last" if source["channels_last"] else "")


def _rate(cell: dict[str, Any], path: str) -> str:
    return "failed" if _failed(cell, path) else fmt(cell.get(path, {}).get("images_per_s"))


def _failed(cell: dict[str, Any], path: str) -> bool:
    return "error" in cell.get(path, {})


def _count(cell: dict[str, Any], path: str) -> str:
    entry = cell.get(path)
    if not entry or "error" in entry:
        return "-"
    others = f"; others {entry['other_cores']:.2f} cores, steal {entry['steal_cores']:.2f}"
    rounds = f" x {len(entry['rounds'])} rounds" if "rounds" in entry else ""
    if path == "ray":
        return (
            f"{entry['steps_per_fold_epoch']} steps x {entry['measured_fold_epochs']} "
            f"fold-epochs{rounds} (pool {entry['pool_images']}){others}"
        )
    return f"{entry['steps_per_repeat']} steps x {entry['repeats']} repeats{rounds}{others}"


# --------------------------------------------------------------------------- entry point


def select_cells(cells: Sequence[Cell], patterns: Sequence[str]) -> list[Cell]:
    """Cells whose id (e.g. resnet18@224/b32) matches any glob; all when none is given."""
    wanted = [p.strip() for item in patterns for p in item.split(",") if p.strip()]
    if not wanted:
        return list(cells)
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in wanted)]
    if not chosen:
        known = ", ".join(c.id for c in cells)
        raise SystemExit(f"--only {' '.join(wanted)}: no cell matches; cells: {known}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Training images/s and peak memory: distmed via Ray Train, the same loop "
        "without Ray, and an ImageFolder fp32 baseline.",
    )
    parser.add_argument("--quick", action="store_true", help="one tiny cell: a smoke test")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="cells to run, e.g. 'resnet18@224/*' or resnet50@64/b32 (repeatable, commas)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)} (default: all)",
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="MedMNIST .npz")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of the in-process loops (default: usable CPUs, which is what "
        "distmed gives its one Ray worker on a local cluster)",
    )
    parser.add_argument(
        "--ray-epoch-seconds",
        type=float,
        help=f"target length of one Ray fold-epoch (default {RayBudget.epoch_seconds:g}); "
        "longer ones time more steps per fold-epoch for big cells",
    )
    parser.add_argument(
        "--loop-seconds",
        type=float,
        help=f"timed seconds per cell of each in-process loop (default "
        f"{LoopBudget.cell_seconds:g}), in up to {LoopBudget.max_repeats} repeats",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of every path per cell, in alternating order; rates are medians over them",
    )
    parser.add_argument("--name", help="result file name (default throughput[-quick])")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark process")
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep the temporary folder (logs, data)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        raise SystemExit(f"--paths: unknown {sorted(unknown)}; choose from {PATHS}")
    cells = select_cells(QUICK_CELLS if args.quick else FULL_CELLS, args.only)
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    if args.ray_epoch_seconds is not None:
        budget = (budget[0], replace(budget[1], epoch_seconds=args.ray_epoch_seconds))
    if args.loop_seconds is not None:
        loop = replace(budget[0], cell_seconds=args.loop_seconds)
        budget = (replace(loop, repeat_seconds=loop.cell_seconds / loop.max_repeats), budget[1])
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: give 1 or more")
    threads = args.threads or usable_cpus()
    name = args.name or ("throughput-quick" if args.quick else "throughput")
    payload: dict[str, Any] = {
        "benchmark": "throughput",
        "machine": machine_info(),
        "settings": {
            "source": str(args.source),
            "threads": threads,
            "paths": paths,
            "loop_budget": asdict(budget[0]),
            "ray_budget": asdict(budget[1]),
            "loop_pool_images": LOOP_POOL,
            "ray_folds": FOLDS,
            "ray_epochs": EPOCHS,
            "quick": args.quick,
            "rounds": args.rounds,
        },
        "cells": [],
    }
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="distmed-bench-"))
    try:
        work = Workspace.create(tmp, args.source, threads, args.timeout)
        for number, cell in enumerate(cells, 1):
            print(f"[{number}/{len(cells)}] {cell.id} ...", flush=True)
            payload["cells"].append(run_cell(cell, work, budget, paths, args.rounds))
            print(_progress(payload["cells"][-1], time.perf_counter() - started), flush=True)
            write_result(name, payload)  # after every cell: a killed run keeps what it measured
    finally:
        if args.keep_temp:
            print(f"kept {tmp} (logs, data, caches)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    payload["machine"]["load_average_at_end"] = list(os.getloadavg())
    payload["total_wall_s"] = time.perf_counter() - started
    path = write_result(name, payload)
    print()
    print(format_tables(payload))
    print(f"\n{path.relative_to(REPO)}; total {payload['total_wall_s']:.0f} s")
    return 1 if any(_failed(c, p) for c in payload["cells"] for p in PATHS) else 0


def _progress(cell: dict[str, Any], elapsed: float) -> str:
    parts = [f"{p} {_rate(cell, p)}" for p in PATHS if p in cell]
    return f"    img/s: {', '.join(parts)}; cell {cell['cell_wall_s']:.0f} s, total {elapsed:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
