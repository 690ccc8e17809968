"""`bash dev.sh gpu-check`: distmed's CUDA path end to end on one GPU, in a few minutes.

Stages, each one result file `benchmarks/results/gpu-STAGE.json` (and `gpu-check.json` for
all): the tests marked `gpu`; one `distmed.train` with 2 folds on the demo data; one 2-trial
`distmed.tune` packing both trials on the GPU (`--gpus-per-worker 0.5`); a throughput table
(distmed's training step against plain PyTorch loops over the same tensors, ResNet-18/-50 at
224 px). With $OUT set, the results and the stages' log are copied there as well. Without
CUDA it prints one line and exits 0: there is nothing to check.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import string
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    REPO,
    fmt,
    log_tail,
    machine_info,
    machine_line,
    markdown_table,
    usable_cpus,
    write_result,
)
from benchmarks.loops import LoopBudget, LoopSpec, build_plain_step, cycle, measure

NO_CUDA = "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check"
STAGES = ("tests", "train", "tune", "throughput", "epochs")
# Seconds each stage's process may run; all four are sized to finish in under 5 minutes.
TIMEOUTS = {"tests": 150.0, "train": 150.0, "tune": 240.0}
STAGES_LOG = "gpu-check-stages.log"
# The subprocesses' environment: quiet, offline Ray; workers import this checkout's distmed.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
}
DEMO_RUN = ("--config", "search_spaces/demo.yaml", "--data", "demo")
# Small runs on the demo data: 2 folds x 2 epochs at 32 px.
SMALL = ("cv.folds=2", "train.epochs=2", "data.image_size=32")
THROUGHPUT_ARCHS = ("resnet18", "resnet50")
THROUGHPUT_SIZE = 224
THROUGHPUT_BATCH = 64
# Generated 224 px images per whole-epoch cell (`run_epochs_stage`).
EPOCH_IMAGES = 5000
# Untimed warm-up steps (cuDNN's kernel search, allocator, loader start), then 3 rounds.
THROUGHPUT_BUDGET = LoopBudget(
    repeat_seconds=1.0, cell_seconds=3.0, min_steps=5, max_repeats=3, warmup_steps=8
)
LOOPS = ("distmed", "plain_fp32", "plain_same")
SAFE_NAME = frozenset(string.ascii_letters + string.digits + "._-")


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Check distmed on a CUDA GPU: gpu tests, a 2-fold train, a 2-trial "
        "search packed on one GPU, and a throughput table. Without CUDA: says so, exits 0.",
    )
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (default: all)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if not stages:
        raise SystemExit(f"--stages: name at least one of {','.join(STAGES)}")
    if unknown := set(stages) - set(STAGES):
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {STAGES}")
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="distmed-gpu-check-"))
    env = stage_env(work)
    runners: dict[str, Callable[[Path, dict[str, str]], dict[str, Any]]] = {
        "tests": run_tests_stage,
        "train": run_train_stage,
        "tune": run_tune_stage,
        "throughput": run_throughput_stage,
        "epochs": run_epochs_stage,
    }
    summary: dict[str, Any] = {
        "check": "gpu-check",
        "machine": {**machine_info(), **gpu_info()},
        "stages": {},
    }
    print(f"gpu-check on {summary['machine']['gpu_name']}; {machine_line(summary['machine'])}")
    print(f"stages: {', '.join(stages)}", flush=True)
    written: dict[str, Path] = {}
    try:
        for stage in stages:
            began = time.perf_counter()
            print(f"[{stage}] ...", flush=True)
            try:
                result = runners[stage](work, env)
            except Exception as exc:  # a stage that breaks must not hide the others' results
                result = {"ok": False, "problems": [f"{type(exc).__name__}: {exc}"]}
            result["wall_s"] = round(time.perf_counter() - began, 1)
            written[stage] = write_result(f"gpu-{stage}", {"machine": summary["machine"], **result})
            summary["stages"][stage] = {
                k: result[k] for k in ("ok", "problems", "wall_s") if k in result
            }
            print(stage_line(stage, result), flush=True)
            if not result["ok"] and stage in ("tests", "train", "tune"):
                print(log_tail(work / f"{stage}.log", 25), flush=True)
            # After every stage, so that a run stopped from outside keeps what it measured.
            summary["ok"] = all(s["ok"] for s in summary["stages"].values())
            summary["total_wall_s"] = round(time.perf_counter() - started, 1)
            written["check"] = write_result("gpu-check", summary)
            stages_log = collect_logs(work, stages, REPO / "runs" / STAGES_LOG)
            if os.environ.get("OUT"):
                copy_out([*written.values(), stages_log], Path(os.environ["OUT"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu-check {'passed' if summary['ok'] else 'FAILED'} in {summary['total_wall_s']:.0f} s")
    print("results: " + ", ".join(str(p.relative_to(REPO)) for p in written.values()))
    if os.environ.get("OUT"):
        print(f"copied there and to $OUT, with {STAGES_LOG}")
    return 0 if summary["ok"] else 1


def stage_env(work: Path) -> dict[str, str]:
    """This environment plus Ray's quiet offline settings, a private cache and our checkout."""
    env = {**os.environ, **{k: v for k, v in RAY_ENV.items() if k not in os.environ}}
    env["DISTMED_CACHE"] = str(work / "cache")
    path = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def gpu_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu_name": props.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }


def stage_line(stage: str, result: dict[str, Any]) -> str:
    status = "ok" if result["ok"] else "FAILED: " + "; ".join(result.get("problems", []))
    return f"[{stage}] {status} ({result['wall_s']:.0f} s)"


# --------------------------------------------------------------------------- stages


def run_tests_stage(work: Path, env: dict[str, str]) -> dict[str, Any]:
    """`pytest -m gpu`: every test must pass; a skip on a GPU machine is a failure too."""
    from benchmarks.throughput import run_logged

    report = work / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider"]
    command += ["-q", "-rA", f"--junitxml={report}", "tests/test_gpu.py"]
    outcome = run_logged(command, work / "tests.log", TIMEOUTS["tests"], env)
    tests = read_junit(report) if report.is_file() else []
    return {**check_tests(tests, outcome), "command": " ".join(command[1:]), "tests": tests}


def read_junit(path: Path) -> list[dict[str, str]]:
    """(name, outcome, message) of every test case in a pytest JUnit XML report."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = tag, (found.get("message") or "")[:300]
                break
        cases.append({"name": case.get("name", ""), "outcome": outcome, "message": message})
    return cases


def check_tests(tests: list[dict[str, str]], outcome: dict[str, Any]) -> dict[str, Any]:
    problems = [f"{t['name']} {t['outcome']}: {t['message']}" for t in tests]
    problems = [p for p, t in zip(problems, tests, strict=True) if t["outcome"] != "passed"]
    if not tests:
        problems.append(
            "no gpu test ran" + (f" ({outcome['error']})" if "error" in outcome else "")
        )
    elif "error" in outcome and not problems:
        problems.append(outcome["error"].splitlines()[0])
    passed = sum(t["outcome"] == "passed" for t in tests)
    return {"ok": not problems, "problems": problems, "passed": passed, "collected": len(tests)}


def train_command(output: Path) -> list[str]:
    command = [sys.executable, "-m", "distmed.train", *DEMO_RUN, "--output", str(output)]
    for item in SMALL:
        command += ["--set", item]
    return command


def run_train_stage(work: Path, env: dict[str, str]) -> dict[str, Any]:
    """`distmed.train` with 2 folds: it must have trained on cuda, in the expected precision."""
    from benchmarks.throughput import run_logged
    from distmed.loop import resolve_amp

    output = work / "train"
    command = train_command(output)
    outcome = run_logged(command, work / "train.log", TIMEOUTS["train"], env)
    expected = resolve_amp("auto", torch.device("cuda"))
    result_path = output / "cv_result.json"
    cv_result = json.loads(result_path.read_text()) if result_path.is_file() else None
    return {
        **check_train(cv_result, outcome, expected),
        "command": " ".join(command[1:]),
        "expected_precision": expected,
    }


def check_train(
    cv_result: dict[str, Any] | None, outcome: dict[str, Any], expected_precision: str
) -> dict[str, Any]:
    """Problems with a GPU `cv_result.json`, and the facts worth keeping from it."""
    if cv_result is None:
        return {"ok": False, "problems": [outcome.get("error", "no cv_result.json written")]}
    problems = []
    if cv_result.get("device") != "cuda":
        problems.append(f"trained on {cv_result.get('device')!r}, not 'cuda'")
    if cv_result.get("precision") != expected_precision:
        problems.append(
            f"precision {cv_result.get('precision')!r}, expected {expected_precision!r} "
            "(train.amp=auto on this GPU)"
        )
    if len(cv_result.get("folds", [])) != 2:
        problems.append(f"{len(cv_result.get('folds', []))} folds in cv_result.json, expected 2")
    if not math.isfinite(cv_result.get("mean_roc_auc", math.nan)):
        problems.append("mean ROC-AUC is not finite")
    if "error" in outcome:
        problems.append(outcome["error"].splitlines()[0])
    rates = [r["train_images_per_s"] for f in cv_result.get("folds", []) for r in f["history"]]
    return {
        "ok": not problems,
        "problems": problems,
        "device": cv_result.get("device"),
        "precision": cv_result.get("precision"),
        "channels_last": cv_result.get("channels_last"),
        "world_size": cv_result.get("world_size"),
        "mean_roc_auc": cv_result.get("mean_roc_auc"),
        "epoch_images_per_s": rates,
        "cli_internal_wall_s": cv_result.get("wall_time_s"),
    }


def tune_command(storage: Path) -> list[str]:
    command = [sys.executable, "-m", "distmed.tune", "--space", "search_spaces/demo.yaml"]
    command += ["--data", "demo", "--storage", str(storage), "--name", "gpu-check"]
    command += ["--num-samples", "2", "--max-concurrent", "2", "--gpus-per-worker", "0.5"]
    for item in SMALL:
        command += ["--set", item]
    return command


def run_tune_stage(work: Path, env: dict[str, str]) -> dict[str, Any]:
    """A 2-trial search, both trials at once on the one GPU (half a GPU per worker)."""
    from benchmarks.throughput import run_logged

    storage = work / "tune"
    command = tune_command(storage)
    log = work / "tune.log"
    outcome = run_logged(command, log, TIMEOUTS["tune"], env)
    summary_path = storage / "gpu-check" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    text = log.read_text(errors="replace") if log.is_file() else ""
    plan = next((line for line in text.splitlines() if "trials on" in line), "")
    return {**check_tune(summary, plan, outcome), "command": " ".join(command[1:])}


def check_tune(
    summary: dict[str, Any] | None, plan: str, outcome: dict[str, Any]
) -> dict[str, Any]:
    """Problems with the packed search: its plan line, `summary.json` and the refit's test."""
    problems = []
    # distmed.tune's plan line: "2 trials on demo (...), 2 at a time, 1 worker(s) x 8 CPU + 0.5 GPU"
    if "2 at a time" not in plan or "+ 0.5 GPU" not in plan:
        problems.append(f"the search was not planned as 2 trials at once on 0.5 GPU each: {plan!r}")
    if summary is None:
        problems.append(outcome.get("error", "no summary.json written").splitlines()[0])
        return {"ok": False, "problems": problems, "plan": plan}
    counts = summary.get("trials_by_status", {})
    if summary.get("num_trials") != 2 or counts.get("errored", 0) or counts.get("diverged", 0):
        problems.append(f"{summary.get('num_trials')} trials, by status {counts}; expected 2 fine")
    scaling = summary.get("best_config", {}).get("scaling", {})
    if scaling.get("gpus_per_worker") != 0.5:
        problems.append(f"best config's scaling is {scaling}, not 0.5 GPU per worker")
    if "test_metrics" not in summary:
        problems.append("no test_metrics: the refit or the test evaluation did not finish")
    if "error" in outcome:
        problems.append(outcome["error"].splitlines()[0])
    return {
        "ok": not problems,
        "problems": problems,
        "plan": plan.strip(),
        "trials_by_status": counts,
        "best_cv_roc_auc": summary.get("best_cv_roc_auc"),
        "test_metrics": summary.get("test_metrics"),
        "cli_internal_wall_s": summary.get("wall_time_s"),
    }


# --------------------------------------------------------------------------- throughput


def run_throughput_stage(work: Path, env: dict[str, str]) -> dict[str, Any]:
    """distmed's step vs plain loops on this GPU, over the same cached demo tensors.

    Every loop reads the same decoded 224 px demo pool through a DataLoader with the same
    worker processes and pinned memory; cuDNN picks its kernels once (`benchmark`), as
    the Ray Train worker sets it on CUDA.
    """
    from distmed.loop import loader_workers

    os.environ["DISTMED_CACHE"] = env["DISTMED_CACHE"]  # the demo folder, in this process
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    threads = usable_cpus()
    workers = loader_workers(device, threads)
    cells = []
    for arch in THROUGHPUT_ARCHS:
        spec = LoopSpec(arch, THROUGHPUT_SIZE, THROUGHPUT_BATCH, threads)
        cell: dict[str, Any] = {**asdict(spec), "loader_workers": workers}
        for loop in LOOPS:
            cell[loop] = time_gpu_loop(loop, spec, work / "cache", device, workers)
            print(f"    {arch} {loop}: {fmt(cell[loop].get('images_per_s'))} img/s", flush=True)
        cell["ratios"] = gpu_ratios(cell)
        cells.append(cell)
    problems = [
        f"{c['arch']} {loop}: {c[loop]['error']}"
        for c in cells
        for loop in LOOPS
        if "error" in c[loop]
    ]
    payload = {"ok": not problems, "problems": problems, "cells": cells}
    payload["budget"] = asdict(THROUGHPUT_BUDGET)
    print(format_gpu_table(payload), flush=True)
    return payload


def run_epochs_stage(work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Whole epochs (data included) from the cache and from the stream, ResNet-18 and -50 at
    224 px, data wait and step time apart (`benchmarks.epochs`)."""
    import ray

    from benchmarks import epochs

    os.environ["DISTMED_CACHE"] = env["DISTMED_CACHE"]
    cells = []
    for arch in THROUGHPUT_ARCHS:
        argv = ["--device", "cuda", "--arch", arch, "--size", str(THROUGHPUT_SIZE)]
        argv += ["--images", str(EPOCH_IMAGES), "--workdir", str(work / f"epochs-{arch}")]
        cell = epochs.run(epochs.build_parser().parse_args(argv))
        for source in ("cache", "stream"):
            last = cell[source][-1]  # the first epoch pays cuDNN's kernel search
            rate, wait, step = last["images_per_s"], last["data_wait_s"], last["step_s"]
            line = f"{fmt(rate)} img/s, data wait {wait:.1f} s, steps {step:.1f} s"
            print(f"    {arch} {source}: {line}", flush=True)
        cells.append(cell)
    ray.shutdown()
    return {"ok": True, "problems": [], "cells": cells}


def time_gpu_loop(
    loop: str, spec: LoopSpec, cache_dir: Path, device: torch.device, workers: int
) -> dict[str, Any]:
    """Images/s and peak GPU memory of one loop; warm-up excluded (see THROUGHPUT_BUDGET)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        if loop == "distmed":
            step, facts = build_plain_step(spec, Path("demo"), cache_dir, device, workers)
        else:
            step, facts = build_torch_step(spec, cache_dir, device, workers, loop == "plain_same")
        timed = measure(step, spec.batch_size, THROUGHPUT_BUDGET, sync=torch.cuda.synchronize)
    except Exception as exc:  # out of memory, a loader that died: this loop's row says so
        return {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
    finally:
        step = None  # noqa: F841 - drops the loader iterator and its worker processes
        gc.collect()
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {**facts, **timed, "peak_gpu_mib": round(peak, 1)}


def build_torch_step(
    spec: LoopSpec, cache_dir: Path, device: torch.device, workers: int, same_recipe: bool
) -> tuple[Callable[[], None], dict[str, Any]]:
    """A hand-written PyTorch loop over the same cached tensors, without distmed's step.

    torchvision's model, AdamW, cross-entropy and ImageNet normalisation on the GPU, with
    the same loader settings; fp32 NCHW, or (`same_recipe`) distmed's precision and memory
    format. No augmentation: distmed's batched augmentation is part of what its step costs.
    """
    import numpy as np
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader

    from benchmarks.loops import experiment_config
    from distmed.data import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        CachedImageDataset,
        build_cache,
        load_cached,
        scan_source,
    )
    from distmed.loop import autocast, resolve_amp

    cfg = experiment_config(spec, Path("demo"), cache_dir)
    index = scan_source(cfg.data)
    images = load_cached(build_cache(index, cfg.data).pool_path)
    labels = index.pool.labels
    dataset = CachedImageDataset(images, labels, np.arange(len(labels)))
    loader = DataLoader(
        dataset,
        batch_size=spec.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=True,
    )
    precision = resolve_amp(cfg.train.amp, device) if same_recipe else "off"
    memory_format = torch.channels_last if same_recipe else torch.contiguous_format
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        spec.arch, weights=None, num_classes=len(index.class_names)
    )
    model = model.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    batches = cycle(loader)

    def step() -> None:
        batch_images, batch_labels, _ = next(batches)
        inputs = batch_images.to(device, non_blocking=True).float().div(255)
        inputs = ((inputs.expand(-1, 3, -1, -1) - mean) / std).contiguous(
            memory_format=memory_format
        )
        with autocast(device, precision):
            loss = loss_fn(model(inputs), batch_labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    facts = {
        "precision": precision,
        "channels_last": same_recipe,
        "pool_images": len(labels),
    }
    return step, facts


def gpu_ratios(cell: dict[str, Any]) -> dict[str, float]:
    """distmed's images/s over each plain loop's, where both were measured."""
    rate = {loop: cell.get(loop, {}).get("images_per_s") for loop in LOOPS}
    out = {}
    for plain in ("plain_fp32", "plain_same"):
        if rate["distmed"] and rate[plain]:
            out[f"distmed_over_{plain}"] = rate["distmed"] / rate[plain]
    return out


def format_gpu_table(payload: dict[str, Any]) -> str:
    rows = []
    for c in payload["cells"]:
        distmed = c["distmed"]
        recipe = distmed.get("precision", "-")
        recipe = ("fp32" if recipe == "off" else recipe) + (
            " + channels_last" if distmed.get("channels_last") else ""
        )
        rows.append(
            [
                f"{c['arch']}@{c['image_size']}/b{c['batch_size']}",
                recipe,
                *(fmt(c[loop].get("images_per_s")) for loop in LOOPS),
                fmt(c["ratios"].get("distmed_over_plain_fp32"), 2, "x"),
                fmt(c["ratios"].get("distmed_over_plain_same"), 2, "x"),
                " / ".join(fmt(c[loop].get("peak_gpu_mib"), 0) for loop in LOOPS),
            ]
        )
    headers = (
        "cell",
        "distmed recipe",
        "distmed step img/s",
        "plain fp32 img/s",
        "plain, same recipe img/s",
        "distmed / plain fp32",
        "distmed / plain same recipe",
        "peak GPU MiB (distmed / fp32 / same)",
    )
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------- files


def collect_logs(work: Path, stages: Sequence[str], dest: Path) -> Path:
    """The subprocess stages' logs, one after another, in one file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w") as out:
        for stage in stages:
            log = work / f"{stage}.log"
            if log.is_file():
                out.write(f"===== {stage} =====\n{log.read_text(errors='replace')}\n")
    return dest


def copy_out(paths: Sequence[Path], out: Path, limit: int = 7) -> list[Path]:
    """Copy result files into `out` (at most `limit`: the device returns 8 files, one is the
    console log); names keep only letters, digits and '._-'."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in list(paths)[:limit]:
        name = "".join(ch if ch in SAFE_NAME else "_" for ch in path.name)
        target = out / name
        shutil.copyfile(path, target)
        copied.append(target)
    return copied


if __name__ == "__main__":
    sys.exit(main())
