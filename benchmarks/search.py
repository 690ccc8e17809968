"""Does the search earn its compute? Random search, Optuna's TPE with its defaults, and TPE
as distmed configures it (`search.sampler`), each with and without ASHA, on BreastMNIST and
PneumoniaMNIST at 28 px, several seeds, through the real `distmed.tune` CLI.

    python -m benchmarks.search                      # everything (planned for ~2 h on 2 cores)
    python -m benchmarks.search --plan               # what would run and its estimated time
    python -m benchmarks.search --seeds 0 --datasets breastmnist   # a slice
    python -m benchmarks.search --resume             # continue interrupted searches

Every search has the same budget (`--trials`, default 24, `--concurrent` 2 at a time) on a
fixed subset of each data set's CV pool (`--pool` images, 2 folds, 3 epochs: the subset and
the short training are what size the whole benchmark to about 2 hours; the comparison is of
searches, not of final models). The reference is random search without ASHA with the same
seed on the same data: its final best CV ROC-AUC is the target. Per method, as the median
over seeds with its spread (min - max):
  - trial-seconds to reach the target: the trials' `time_s` summed in start order until the
    best completed CV ROC-AUC so far is at least the target (a stopped trial's score is not a
    result); a seed that never reaches it counts as not reached, and the median is over the
    seeds that did, with their number;
  - the final best CV ROC-AUC.
Results: `benchmarks/results/search_methods.json` and `search_methods.png` (best-so-far
against trial-seconds, one line per method and seed).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine_info, machine_line, markdown_table, write_subset_npz
from benchmarks.medmnist import SHARED, SPACE, best_so_far, load_run, merged, run_tune

DATASETS = ("breastmnist", "pneumoniamnist")
# Optuna's TPESampler() as distmed built it before `search.sampler` existed: 10 random
# start-up trials, independent parameters, running trials ignored.
OPTUNA_DEFAULTS = {
    "n_startup_trials": 10,
    "constant_liar": False,
    "multivariate": False,
    "group": False,
}
SAMPLERS: dict[str, dict[str, Any]] = {
    "random": {"algorithm": "random"},
    "tpe_default": {"algorithm": "tpe", "sampler": OPTUNA_DEFAULTS},
    "tpe_configured": {"algorithm": "tpe"},  # `search.sampler`'s defaults: auto
}
SCHEDULERS: dict[str, dict[str, Any]] = {
    "asha": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "fifo": {"type": "none"},
}
METHODS = [f"{s}+{c}" for s in SAMPLERS for c in SCHEDULERS]
REFERENCE = "random+fifo"
TARGET_METHOD = "tpe_configured+asha"
LABELS = {
    "random": "random",
    "tpe_default": "TPE (Optuna defaults)",
    "tpe_configured": "TPE (distmed's sampler)",
    "asha": "ASHA",
    "fifo": "no early stopping",
}
# The planning figure, not a measurement: a trial on a 400-image pool, 2 folds, 3 epochs
# at 28 px, two trials sharing 2 cores, including Ray Train's per-fold worker start-up.
PLANNED_TRIAL_S = 16.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = search_plan(args.datasets, args.seeds, args.methods)
    print(plan_text(plan, args), flush=True)
    if args.plan:
        return 0
    runs: dict[str, dict[str, Any]] = {}
    for dataset in args.datasets:
        data = subset_for(dataset, args)
        for _, method, seed in (p for p in plan if p[0] == dataset):
            runs[run_name(dataset, method, seed)] = run_one(data, dataset, method, seed, args)
    report(runs, args)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--trials", type=int, default=24, help="trials per search")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once")
    parser.add_argument("--pool", type=int, default=400, help="CV pool images per data set")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--plan", action="store_true", help="print the plan, run nothing")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "distmed-bench-search",
        help="where the searches write their runs (outside the repository)",
    )
    parser.add_argument("--resume", action="store_true", help="continue interrupted searches")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the plan


def search_plan(
    datasets: list[str], seeds: list[int], methods: list[str] = METHODS
) -> list[tuple[str, str, int]]:
    """(data set, method, seed) of every search, in the order run: a seed's methods one
    after another, so a drift of the machine falls on every method alike."""
    return [(d, m, s) for d in datasets for s in seeds for m in methods]


def plan_text(plan: list[tuple[str, str, int]], args: argparse.Namespace) -> str:
    trials = len(plan) * args.trials
    hours = trials * PLANNED_TRIAL_S / args.concurrent / 3600
    return (
        f"[search] {len(plan)} searches ({len(args.methods)} methods x {len(args.seeds)} seed(s) x "
        f"{len(args.datasets)} data set(s)), {args.trials} trials each, {args.concurrent} at a "
        f"time: {trials} trials, about {hours:.1f} h at a planned {PLANNED_TRIAL_S:g} "
        "trial-seconds a trial (ASHA's stopped trials take less)"
    )


def run_name(dataset: str, method: str, seed: int) -> str:
    return f"{dataset}-{method.replace('+', '-')}-seed{seed}"


def space_spec(dataset: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The shipped 28 px space with this benchmark's budget, the method and every seed."""
    import yaml

    sampler, scheduler = method.split("+")
    spec = yaml.safe_load(SPACE.read_text())
    return merged(
        spec,
        {
            "base": {
                "train": {"epochs": args.epochs, "seed": seed},
                "cv": {"folds": 2, "seed": seed},
            },
            "search": {
                "num_samples": args.trials,
                "max_concurrent": args.concurrent,
                "seed": seed,
                "scheduler": SCHEDULERS[scheduler],
                **SAMPLERS[sampler],
            },
        },
    )


def subset_for(dataset: str, args: argparse.Namespace) -> Path:
    return write_subset_npz(
        SHARED / f"{dataset}.npz", args.workdir / "data" / f"{dataset}.npz", args.pool
    )


# --------------------------------------------------------------------------- running


def run_one(
    data: Path, dataset: str, method: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    import yaml

    name = run_name(dataset, method, seed)
    space = args.workdir / f"space-{name}.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text(yaml.safe_dump(space_spec(dataset, method, seed, args), sort_keys=False))
    started = time.perf_counter()
    # The subset's --data comes after run_tune's own (the full file): argparse keeps the last.
    extra = ("--data", str(data))
    timing = run_tune(name, space, dataset, args.workdir, args.resume, extra=extra)
    out = args.workdir / "runs" / name
    run = load_run(args.workdir, dataset, f"{method.replace('+', '-')}-seed{seed}")
    print(f"[search] {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return {**run, **timing, "method": method, "seed": seed, "run_dir": str(out)}


# --------------------------------------------------------------------------- the numbers


def seconds_to_reach(trials: list[dict[str, Any]], target: float) -> float | None:
    """Trial-seconds (summed in start order) until the best completed CV ROC-AUC so far is
    at least `target`; None if it never is."""
    for point in best_so_far(trials):
        if point["best"] >= target:
            return point["time_s"]
    return None


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min and max of `values` (None when empty) and how many there are."""
    import statistics

    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(runs: dict[str, dict[str, Any]], datasets: list[str], seeds: list[int]) -> dict:
    """Per data set and method: seconds to reach the reference's final best, and the final
    best, over seeds; and the target's ratio of its median seconds to the reference's."""
    out: dict[str, Any] = {}
    for dataset in datasets:
        per_method: dict[str, Any] = {}
        for method in METHODS:
            reach, finals, total = [], [], []
            for seed in seeds:
                run = runs.get(run_name(dataset, method, seed))
                ref = runs.get(run_name(dataset, REFERENCE, seed))
                if run is None or ref is None or ref["best_cv_roc_auc"] is None:
                    continue
                finals.append(run["best_cv_roc_auc"])
                total.append(sum(t["time_s"] for t in run["trials"]))
                seconds = seconds_to_reach(run["trials"], ref["best_cv_roc_auc"])
                if seconds is not None:
                    reach.append(seconds)
            per_method[method] = {
                "seconds_to_reference_best": spread(reach),
                "final_best_cv_roc_auc": spread(finals),
                "total_trial_seconds": spread(total),
                "seeds": len(finals),
            }
        ref_s = per_method[REFERENCE]["seconds_to_reference_best"]["median"]
        target_s = per_method[TARGET_METHOD]["seconds_to_reference_best"]["median"]
        ratio = target_s / ref_s if ref_s and target_s is not None else None
        out[dataset] = {"methods": per_method, "target_over_reference_seconds": ratio}
    return out


def results_table(dataset: str, summary: dict[str, Any]) -> str:
    rows = []
    for method, s in summary["methods"].items():
        reach, final = s["seconds_to_reference_best"], s["final_best_cv_roc_auc"]
        sampler, scheduler = method.split("+")
        reached = (
            "not reached"
            if reach["median"] is None
            else f"{reach['median']:.0f} ({reach['min']:.0f} - {reach['max']:.0f})"
        )
        best = (
            "-"
            if final["median"] is None
            else f"{final['median']:.4f} ({final['min']:.4f} - {final['max']:.4f})"
        )
        rows.append(
            [
                f"{LABELS[sampler]} + {LABELS[scheduler]}",
                reached,
                f"{reach['n']}/{s['seeds']}",
                best,
            ]
        )
    headers = [
        f"{dataset}: method",
        "trial-s to random's final best, median (min - max)",
        "seeds reaching it",
        "final best CV ROC-AUC, median (min - max)",
    ]
    return markdown_table(headers, rows)


def plot_curves(runs: dict[str, dict[str, Any]], datasets: list[str], path: Path) -> Path:
    """Best-so-far CV ROC-AUC against cumulative trial-seconds, a panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for key, run in runs.items():
            if not key.startswith(f"{dataset}-"):
                continue
            curve = [p for p in best_so_far(run["trials"]) if math.isfinite(p["best"])]
            sampler, scheduler = run["method"].split("+")
            ax.step(
                [p["time_s"] for p in curve],
                [p["best"] for p in curve],
                where="post",
                color=colours[run["method"]],
                alpha=0.7,
                label=f"{LABELS[sampler]} + {LABELS[scheduler]}" if run["seed"] == 0 else None,
            )
        ax.set(
            title=f"{dataset} 28 px",
            xlabel="cumulative trial-seconds",
            ylabel="best completed CV ROC-AUC so far",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    from benchmarks.common import write_result

    machine = machine_info()
    summary = summarise(runs, args.datasets, args.seeds)
    plot = plot_curves(runs, args.datasets, RESULTS / "search_methods.png")
    settings = {k: v for k, v in vars(args).items() if k not in ("workdir", "plan", "resume")}
    write_result(
        "search_methods",
        {
            "machine": machine,
            "settings": settings,
            "reference": REFERENCE,
            "summary": summary,
            "runs": runs,
            "plot": plot.name,
        },
    )
    print(machine_line(machine))
    for dataset in args.datasets:
        print(results_table(dataset, summary[dataset]))
        ratio = summary[dataset]["target_over_reference_seconds"]
        print(f"{dataset}: {TARGET_METHOD} / {REFERENCE} median trial-seconds: {ratio}")


if __name__ == "__main__":
    raise SystemExit(main())
