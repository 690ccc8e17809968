"""Search efficiency and quality on real MedMNIST data, through the real `distmed.tune` CLI.

    python -m benchmarks.medmnist                      # all parts (~2.2 h on 2 cores)
    python -m benchmarks.medmnist --only search        # PneumoniaMNIST: TPE + ASHA vs random
    python -m benchmarks.medmnist --only quality       # the tuned BreastMNIST run
    python -m benchmarks.medmnist --only quality --resume   # continue an interrupted one
    python -m benchmarks.medmnist --only stem          # BreastMNIST's best config, small stem
    python -m benchmarks.medmnist --only stem-search   # BreastMNIST again, the stem searched too
    python -m benchmarks.medmnist --only long-search   # ... 20 trials, every stage trained
    python -m benchmarks.medmnist --only long-search-seed1  # ... the same, every seed 1

Search efficiency: on PneumoniaMNIST, `search_spaces/medmnist28.yaml` (TPE + ASHA) against
random search with the same trial budget and seed (`search.algorithm=random`, no early
stopping): best CV ROC-AUC against trials and against cumulative trial time, trials per hour
and the fraction stopped early. Quality: the refit best model of the TPE + ASHA search on
each data set, scored once on the official test split, next to the MedMNIST v2 numbers.
Stem: the BreastMNIST search's best configuration again with the small-image stem (`model.stem:
small`, as in MedMNIST's own 28 px ResNets), scored by the same cross-validation; of the two,
the one with the higher CV ROC-AUC is the one the quality table selects (never the test).
Later BreastMNIST searches (`LATER_SEARCHES`), each separate, its refit best model scored once
on the test split: `stem-search` puts `model.stem` into the space, otherwise the same settings;
`long-search` also trains every stage (random init: no frozen stages) and runs 20 trials;
`long-search-seed1` is `long-search` with every seed changed, a replicate.
Results: `benchmarks/results/search_efficiency.json`, `quality.json`, `quality-<search>.json`
and a PNG of the curves.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import fcntl
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from benchmarks.common import (
    REPO,
    RESULTS,
    CpuSnapshot,
    SessionCpu,
    machine_info,
    machine_line,
    markdown_table,
    write_result,
)

LABELS = {"tpe_asha": "TPE + ASHA", "random": "random search"}
SHARED = REPO.parent / "shared" / "data"
SPACE = REPO / "search_spaces" / "medmnist28.yaml"
# MedMNIST v2 (Yang et al., Scientific Data 2023), Table 3: test ROC-AUC / accuracy.
PUBLISHED = {
    "pneumoniamnist": {
        "ResNet-18 (28)": (0.944, 0.854),
        "Google AutoML Vision": (0.991, 0.946),
    },
    "breastmnist": {
        "ResNet-18 (28)": (0.901, 0.863),
        "Google AutoML Vision": (0.919, 0.861),
    },
}


# BreastMNIST has 624 training images (PneumoniaMNIST 5,232): a fold trains on ~416, so a
# batch of 64 would take 6 steps an epoch. Smaller batches and 30 epochs give it ~400 steps
# (MedMNIST's own ResNet-18 trained 100 epochs); 3 folds, and ASHA waits 5 epochs before
# judging, as a score after 1-2 epochs on 208 validation images is noise.
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "breastmnist": {
        "base": {"train": {"epochs": 30, "batch_size": 32}, "cv": {"folds": 3}},
        "search": {"scheduler": {"grace_period": 5}},
        "space": {"train.batch_size": {"choice": [16, 32]}},
    },
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    runs: dict[str, dict[str, Any]] = {}
    if args.only in (None, "search"):
        for method in ("tpe_asha", "random"):
            runs[f"pneumoniamnist/{method}"] = run_search("pneumoniamnist", method, args)
        report_search(runs, machine)
    if args.only in LATER_PARTS:  # own result files: no part above reruns
        report_later_search(run_search("breastmnist", LATER_PARTS[args.only], args), machine)
        return 0
    if args.only in (None, "quality", "stem"):
        if "pneumoniamnist/tpe_asha" not in runs:
            runs["pneumoniamnist/tpe_asha"] = load_run(args.workdir, "pneumoniamnist", "tpe_asha")
        if args.only == "stem":  # the search it starts from has finished before
            runs["breastmnist/tpe_asha"] = load_run(args.workdir, "breastmnist", "tpe_asha")
        else:
            runs["breastmnist/tpe_asha"] = run_search("breastmnist", "tpe_asha", args)
        if args.only != "quality":
            runs["breastmnist/small_stem"] = run_search("breastmnist", "small_stem", args)
        report_quality(runs, machine)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--only", choices=["search", "quality", "stem", *LATER_PARTS])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "distmed-bench",
        help="where the searches write their runs (outside the repository)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted searches in --workdir (`distmed.tune --resume`) instead of "
        "starting them again; finished trials are not rerun",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- running


def space_for(dataset: str, method: str, workdir: Path) -> Path:
    """The shipped space, with the data set's and the method's settings, as a file to run."""
    import yaml

    spec = merged(yaml.safe_load(SPACE.read_text()), DATASET_SETTINGS.get(dataset, {}))
    if method == "random":
        spec["search"]["algorithm"] = "random"
        spec["search"]["scheduler"] = {"type": "none"}
    if method == "small_stem":
        spec = with_small_stem(spec, load_run(workdir, dataset, "tpe_asha")["best_config"])
    if method in LATER_SEARCHES:
        spec = merged(spec, LATER_SEARCHES[method])
    path = workdir / f"space-{dataset}-{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# The first BreastMNIST search fixed the ImageNet stem and missed the target; the small stem
# then scored higher on the test split with a lower CV score (BENCHMARKS.md part 6). Putting
# the stem into the space lets CV, not the test split, choose it. `long_search` also drops
# `model.unfreeze` from the space: from random init a frozen stage keeps random weights, so
# trials with unfreeze < 5 were handicapped, not searched; and 20 trials let TPE model the
# space after Optuna's 10 random start-up trials (6 trials are random search).
# `long_search_seed1` is `long_search` again with every seed changed (sampler, folds, weights
# and batches): how much of its test score is that one draw.
_STEM = {"model.stem": {"choice": ["imagenet", "small"]}}
_LONG_SPACE = {**_STEM, "model.unfreeze": None}
LATER_SEARCHES: dict[str, dict[str, Any]] = {
    "stem_search": {"space": _STEM},
    "long_search": {"space": _LONG_SPACE, "search": {"num_samples": 20}},
    "long_search_seed1": {
        "space": _LONG_SPACE,
        "search": {"num_samples": 20, "seed": 1},
        "base": {"cv": {"seed": 1}, "train": {"seed": 1}},
    },
}
LATER_PARTS = {method.replace("_", "-"): method for method in LATER_SEARCHES}  # --only NAME


def with_small_stem(spec: dict[str, Any], best_config: dict[str, Any]) -> dict[str, Any]:
    """The search's best configuration with `model.stem: small`, as a run of one trial.

    The same folds, seed, epochs and refit as the search; only the stem differs. The space
    becomes a one-value choice of the stem, because `distmed.tune` needs a space.
    """
    out = copy.deepcopy(spec)
    for key in spec["space"]:
        section, name = key.split(".", 1)
        out["base"][section][name] = best_config[section][name]
    out["base"]["model"]["stem"] = "small"
    out["space"] = {"model.stem": {"choice": ["small"]}}
    out["search"].update(num_samples=1, scheduler={"type": "none"})
    return out


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied key by key: nested mappings merged, None deletes a key."""
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run_search(dataset: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One `python -m distmed.tune` run; its wall time, CPU use, trials and summary."""
    name = f"{dataset}-{method}"
    space = space_for(dataset, method, args.workdir)
    timing = run_tune(name, space, dataset, args.workdir, args.resume)
    run = load_run(args.workdir, dataset, method)
    run.update(timing, space_used=space.read_text())  # the exact file, to rerun it
    best = run["best_cv_roc_auc"]
    print(f"[medmnist] {name}: {timing['wall_s']:.0f} s, best CV {best:.4f}", flush=True)
    return run


def run_tune(
    name: str,
    space: Path,
    dataset: str,
    workdir: Path,
    resume: bool,
    extra: tuple[str, ...] = (),
    lock: Path | None = None,
) -> dict[str, Any]:
    """`python -m distmed.tune` on a MedMNIST file into `workdir/runs/NAME`, its output in
    `workdir/NAME.log`: wall seconds, the machine's busy CPU seconds and the disturbance.

    `lock`: a file held (flock(2), as `flock FILE command` takes it) while the search runs,
    so that no other Ray cluster starts on this machine meanwhile; the seconds spent
    waiting for it are `lock_wait_s`, not part of `wall_s`.
    """
    command = [
        sys.executable,
        "-m",
        "distmed.tune",
        "--space",
        str(space),
        "--data",
        str(SHARED / f"{dataset}.npz"),
        "--storage",
        str(workdir / "runs"),
        "--name",
        name,
        *extra,
        *(["--resume"] if resume else []),
    ]
    print(f"[medmnist] {name}: {' '.join(command[2:])}", flush=True)
    log_path = workdir / f"{name}.log"
    with held(lock) as lock_wait_s:
        start, started = CpuSnapshot.take(children=True), time.perf_counter()
        # A resumed search appends: the log then holds the interrupted part too.
        with log_path.open("a" if resume else "w") as log:
            returncode, session = _run_in_session(command, log)
        wall = time.perf_counter() - started
    if returncode != 0:
        raise SystemExit(f"{name} failed (exit {returncode}); see {log_path}")
    end = CpuSnapshot.take(children=True)
    return {
        "resumed": resume,  # then wall_s and machine_cpu_s cover only this part
        "lock_wait_s": lock_wait_s,
        "wall_s": round(wall, 1),
        "machine_cpu_s": round(end.busy - start.busy, 1),
        # Ray's processes are not our children: the search's session is sampled so that
        # only what other people's processes took counts as disturbance.
        "disturbance": end.others_since(start, session.total),
    }


def _run_in_session(command: list[str], log: IO[str]) -> tuple[int, SessionCpu]:
    """Run `command` as the leader of a session of its own, sampling its processes' CPU each
    second; a Ctrl-C here reaches it as distmed.tune's own Ctrl-C (it stops resumable)."""
    process = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    session = SessionCpu(process.pid)
    try:
        while True:
            try:
                return process.wait(timeout=1.0), session
            except subprocess.TimeoutExpired:
                session.sample()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        process.wait()
        raise


@contextlib.contextmanager
def held(lock: Path | None) -> Iterator[float]:
    """Hold `lock` exclusively (waiting for it; nothing when None); yields the seconds waited."""
    if lock is None:
        yield 0.0
        return
    waited = time.perf_counter()
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield round(time.perf_counter() - waited, 1)


def load_run(workdir: Path, dataset: str, method: str) -> dict[str, Any]:
    """Trials (in order) and the summary of a finished search under `workdir`."""
    out = workdir / "runs" / f"{dataset}-{method}"
    if not (out / "summary.json").is_file():
        # `--only quality` / `--only stem` build on searches run before, maybe on another host.
        raise SystemExit(
            f"{out}: no finished {dataset} search ({method}) here; run the part that makes it "
            "first (`--only search` for PneumoniaMNIST, `--only quality` for BreastMNIST), or "
            "give --workdir where it ran"
        )
    from distmed.summary import RunSummary

    summary = RunSummary.load(out / "summary.json")
    with (out / "trials.csv").open() as handle:
        trials = [
            {
                "trial_id": row["trial_id"],
                "status": row["status"],
                "epochs": int(row["epochs"] or 0),
                "time_s": float(row["time_s"] or "nan"),
                "cv_roc_auc": float(row["cv_roc_auc"] or "nan"),
            }
            for row in csv.DictReader(handle)
        ]
    for trial in trials:
        trial.update(trial_reports(out, trial["trial_id"]))
    return {
        "dataset": dataset,
        "method": method,
        "run_dir": str(out),
        "trials": trials,  # trials.csv lists them in start order
        "best_cv_roc_auc": summary.best_cv_roc_auc,
        "best_cv_roc_auc_std": summary.best_cv_roc_auc_std,
        "best_config": summary.best_config.model_dump(mode="json") if summary.best_config else None,
        "search_wall_time_s": summary.wall_time_s,
        "refit_epochs": summary.refit_epochs,
        "test_metrics": summary.test_metrics,
        "test_ci95": bootstrap_intervals(out),
    }


def trial_reports(run_dir: Path, trial_id: str) -> dict[str, float | None]:
    """From the trial's Tune results (`run_trial_<id>_*/result.json`, one report a line):
    `cpu_s`, its Train worker's process CPU seconds at the last report (`worker_cpu_s`;
    None where the worker did not report it), `first_report_cpu_s` the same at the first
    report, and `first_report_s`, the seconds to its first report (worker start-up, data
    and model set-up and the first epoch)."""
    import json

    found = sorted(run_dir.glob(f"run_trial_{trial_id}_*/result.json"))
    lines = found[0].read_text().splitlines() if found else []
    reports = [json.loads(line) for line in lines if line.strip()]
    if not reports:
        return {"cpu_s": None, "first_report_s": None, "first_report_cpu_s": None}
    cpu, first_cpu = reports[-1].get("worker_cpu_s"), reports[0].get("worker_cpu_s")
    return {
        "cpu_s": float(cpu) if cpu is not None else None,
        "first_report_s": float(reports[0].get("time_this_iter_s", math.nan)),
        "first_report_cpu_s": float(first_cpu) if first_cpu is not None else None,
    }


def bootstrap_intervals(out: Path, predictions: str = "") -> dict[str, list[float]] | None:
    """95% bootstrap intervals of the test metrics, as in the run's report (seed 0), from
    the run's saved test predictions (`predictions`: that file's name, the refit's if "")."""
    import numpy as np

    from distmed.inference import TEST_PREDICTIONS
    from distmed.savedmodel import SavedModel

    path = out / (predictions or TEST_PREDICTIONS)
    if not path.is_file():
        return None
    task = SavedModel.load(out / "best_model.pt").task
    with np.load(path, allow_pickle=False) as saved:
        intervals = task.bootstrap(saved["labels"], saved["probs"])
    return {name: [round(low, 4), round(high, 4)] for name, (low, high) in intervals.items()}


# --------------------------------------------------------------------------- search efficiency


def best_so_far(trials: list[dict[str, Any]]) -> list[dict[str, float]]:
    """After each trial: cumulative trial seconds and the best completed CV ROC-AUC so far.

    Only completed trials count as a result: a trial ASHA stopped has a score measured after
    fewer epochs, which is not comparable (the same rule `distmed.tune` picks the best by).
    """
    points, best, elapsed = [], -math.inf, 0.0
    for number, trial in enumerate(trials, start=1):
        elapsed += trial["time_s"]
        if trial["status"] == "completed" and math.isfinite(trial["cv_roc_auc"]):
            best = max(best, trial["cv_roc_auc"])
        points.append({"trials": number, "time_s": round(elapsed, 1), "best": best})
    return points


def search_stats(run: dict[str, Any]) -> dict[str, Any]:
    trials = run["trials"]
    trial_s = sum(t["time_s"] for t in trials)
    stopped = sum(t["status"] == "stopped" for t in trials)
    return {
        "num_trials": len(trials),
        "trial_time_s": round(trial_s, 1),
        "trials_per_hour": round(len(trials) / (trial_s / 3600), 1),
        "fraction_stopped_early": round(stopped / len(trials), 3),
        "epochs_trained": sum(t["epochs"] for t in trials),
        "best_cv_roc_auc": run["best_cv_roc_auc"],
        "curve": best_so_far(trials),
    }


def report_search(runs: dict[str, dict[str, Any]], machine: dict[str, Any]) -> None:
    stats = {key.split("/")[1]: search_stats(run) for key, run in runs.items()}
    plot = plot_curves(stats, RESULTS / "search_efficiency.png")
    write_result(
        "search_efficiency",
        {
            "machine": machine,
            "dataset": "pneumoniamnist",
            "space": str(SPACE.relative_to(REPO)),
            "repeats": 1,
            "methods": {m: {**s, "run": runs[f"pneumoniamnist/{m}"]} for m, s in stats.items()},
            "plot": plot.name,
        },
    )
    print(machine_line(machine))
    print(search_table(stats))


def search_table(stats: dict[str, dict[str, Any]]) -> str:
    rows = []
    for method, s in stats.items():
        halfway = s["curve"][len(s["curve"]) // 2 - 1]
        rows.append(
            [
                LABELS[method],
                f"{s['best_cv_roc_auc']:.4f}",
                f"{halfway['best']:.4f} after {halfway['trials']}",
                f"{s['trial_time_s'] / 60:.1f}",
                f"{s['trials_per_hour']:.0f}",
                f"{s['epochs_trained']}",
                f"{100 * s['fraction_stopped_early']:.0f}%",
            ]
        )
    headers = [
        "search",
        "best CV ROC-AUC",
        "best at half budget",
        "trial time (min)",
        "trials/hour",
        "epochs trained",
        "stopped early",
    ]
    return markdown_table(headers, rows)


def plot_curves(stats: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for method, s in stats.items():
        curve = [p for p in s["curve"] if math.isfinite(p["best"])]
        label = LABELS[method]
        axes[0].step([p["trials"] for p in curve], [p["best"] for p in curve], where="post")
        axes[1].step([p["time_s"] / 60 for p in curve], [p["best"] for p in curve], where="post")
        axes[0].lines[-1].set_label(label)
    axes[0].set_xlabel("trials")
    axes[1].set_xlabel("cumulative trial time (min, 2 CPU cores)")
    for ax in axes:
        ax.set_ylabel("best CV ROC-AUC so far")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("PneumoniaMNIST 28 px: best completed trial, same budget and seed")
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- quality


MODEL_LABELS = {
    "tpe_asha": "distmed (TPE + ASHA, refit, random init, CPU)",
    "small_stem": "distmed (that best config + small stem, refit, random init, CPU)",
    "stem_search": "distmed (TPE + ASHA, stem in the space, refit, random init, CPU)",
    "long_search": "distmed (TPE + ASHA, 20 trials, stem in the space, all stages trained, "
    "refit, random init, CPU)",
    "long_search_seed1": "distmed (TPE + ASHA, 20 trials, stem in the space, all stages "
    "trained, every seed 1, refit, random init, CPU)",
}


def report_quality(runs: dict[str, dict[str, Any]], machine: dict[str, Any]) -> None:
    # The random search is a search-efficiency baseline, not a candidate model.
    rows = {key: quality_row(run) for key, run in runs.items() if run["method"] in MODEL_LABELS}
    mark_selected_by_cv(rows)
    write_result("quality", {"machine": machine, "space": str(SPACE.relative_to(REPO)), **rows})
    print(machine_line(machine))
    print(quality_table(rows))


def report_later_search(run: dict[str, Any], machine: dict[str, Any]) -> None:
    """A later BreastMNIST search: its own file, beside the first search's quality.json."""
    key = f"breastmnist/{run['method']}"
    row = quality_row(run)
    row["selected_by_cv"] = True  # the best trial of its own search
    write_result(
        f"quality-{run['method'].replace('_', '-')}",  # quality-stem-search.json, ...
        {"machine": machine, "space_used": run["space_used"], key: row},
    )
    print(machine_line(machine))
    print(quality_table({key: row}))


def mark_selected_by_cv(rows: dict[str, dict[str, Any]]) -> None:
    """Of each data set's candidate models, flag the one with the best CV ROC-AUC.

    The choice never looks at the test split: its scores are reported for every candidate,
    but only the selected one counts as distmed's result.
    """
    for dataset in {row["dataset"] for row in rows.values()}:
        ours = [key for key, row in rows.items() if row["dataset"] == dataset]
        chosen = max(ours, key=lambda key: rows[key]["best_cv_roc_auc"])
        for key in ours:
            rows[key]["selected_by_cv"] = key == chosen


def quality_row(run: dict[str, Any]) -> dict[str, Any]:
    test = run["test_metrics"]
    return {
        "dataset": run["dataset"],
        "method": run["method"],
        "test_roc_auc": test["roc_auc"],
        "test_accuracy": test["accuracy"],
        "test_ci95": run["test_ci95"],
        "test_samples": test["num_samples"],
        "best_cv_roc_auc": run["best_cv_roc_auc"],
        "best_config": run["best_config"],
        # Tune's own time per trial, which a resumed trial carries on: the search's compute.
        "trial_time_s": round(sum(t["time_s"] for t in run["trials"]), 1),
        "wall_s": run.get("wall_s"),
        "machine_cpu_s": run.get("machine_cpu_s"),
        "resumed": run.get("resumed", False),
        "published": PUBLISHED[run["dataset"]],
        "run_dir": run["run_dir"],
    }


def quality_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = []
    for dataset in sorted({row["dataset"] for row in rows.values()}, key=list(PUBLISHED).index):
        for row in (r for r in rows.values() if r["dataset"] == dataset):
            chosen = " **selected by CV**" if row.get("selected_by_cv") else ""
            lines.append(
                [
                    dataset,
                    MODEL_LABELS[row["method"]] + chosen,
                    f"{row['best_cv_roc_auc']:.4f}",
                    with_ci(row["test_roc_auc"], row["test_ci95"], "roc_auc"),
                    with_ci(row["test_accuracy"], row["test_ci95"], "accuracy"),
                    f"{row['trial_time_s'] / 60:.0f} min",
                    _run_time(row),
                ]
            )
        for name, (auc, acc) in PUBLISHED[dataset].items():
            lines.append([dataset, f"MedMNIST v2: {name}", "", f"{auc:.3f}", f"{acc:.3f}", "", ""])
    headers = [
        "data set",
        "model",
        "CV ROC-AUC",
        "test ROC-AUC (95% CI)",
        "test accuracy (95% CI)",
        "trial time",
        "this command: wall (machine CPU)",
    ]
    return markdown_table(headers, lines)


def _run_time(row: dict[str, Any]) -> str:
    if not row.get("wall_s"):
        return "-"
    text = f"{row['wall_s'] / 60:.0f} min"
    if row.get("machine_cpu_s"):
        text += f" ({row['machine_cpu_s'] / 60:.0f} CPU-min)"
    return text + (", resumed part only" if row.get("resumed") else "")


def with_ci(value: float, intervals: dict[str, list[float]] | None, name: str) -> str:
    if not intervals:
        return f"{value:.3f}"
    low, high = intervals[name]
    return f"{value:.3f} ({low:.3f}–{high:.3f})"


if __name__ == "__main__":
    sys.exit(main())
