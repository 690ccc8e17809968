"""Does the search earn its compute? Random search, Optuna's TPE with its defaults, and TPE
as distmed configures it (`search.sampler`), each with and without ASHA, on BreastMNIST and
PneumoniaMNIST at 28 px, several seeds, through the real `distmed.tune` CLI.

    python -m benchmarks.search                      # everything (planned for ~2 h on 2 cores)
    python -m benchmarks.search --plan               # what would run and its estimated time
    python -m benchmarks.search --seeds 0 --datasets breastmnist   # a slice
    python -m benchmarks.search --resume             # continue interrupted searches
        # (and keep the searches the results file records: an earlier session's, whose
        # --workdir is gone; each run there carries the machine and commit it ran on)

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
import functools
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine_info, machine_line, markdown_table, write_subset_npz
from benchmarks.medmnist import SHARED, SPACE, load_run, merged, run_tune

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
    # grace_period is unused without ASHA; pinned so that a change of the shipped space's
    # default (1 -> 2 on 2026-12-05) does not make --resume refuse a search started before it.
    "fifo": {"type": "none", "grace_period": 1},
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
# The planning figure for a trial on a 400-image pool, 2 folds, 3 epochs at 28 px, two
# trials sharing 2 cores, Ray Tune's and Train's start-up included: measured 28-47 trial-s
# (a search's mean, over the 36 searches of BENCHMARKS.md part 8, 2-core AVX2 hosts; the
# first plan's 16 was a guess 2.5x too low).
PLANNED_TRIAL_S = 40.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = search_plan(args.datasets, args.seeds, args.methods)
    print(plan_text(plan, args), flush=True)
    if args.plan:
        return 0
    # Searches finished in an earlier session, on another machine maybe, whose --workdir is
    # gone: the results file keeps each one whole (its trials, timing and machine).
    keep = args.resume or args.report_only
    recorded = recorded_runs(RESULTS / "search_methods.json", args) if keep else {}
    ran = False  # whether a search ran here: only then is this machine the file's to record
    if not args.report_only:
        for dataset in args.datasets:
            data = subset_for(dataset, args)
            for _, method, seed in (p for p in plan if p[0] == dataset):
                if (name := run_name(dataset, method, seed)) in recorded:
                    print(f"[search] {name}: recorded, kept")
                    continue
                run_one(data, dataset, method, seed, args)
                ran = True
                # After every search: a stopped benchmark keeps what it finished. A fault in
                # the bookkeeping must not end the searches still to run (the final report,
                # or --report-only, then shows it).
                try:
                    report(recorded | finished_runs(args.workdir), args)
                except Exception as error:  # noqa: BLE001
                    print(f"[search] interim report failed: {error!r}", flush=True)
    report(recorded | finished_runs(args.workdir), args, ran_here=ran)
    return 0


# The settings every search of one benchmark shares: runs recorded under others are not merged.
# (Data sets, seeds and methods are slices of one benchmark.)
SHARED_SETTINGS = ("trials", "concurrent", "pool", "epochs")


def recorded_runs(path: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The finished searches the results file at `path` records, by run name, each with the
    machine it ran on (the file's own for runs recorded before runs carried theirs); empty when
    there is no file. Raises SystemExit when the file's shared settings differ from `args`."""
    import json

    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    theirs = {k: recorded["settings"].get(k) for k in SHARED_SETTINGS}
    ours = {k: getattr(args, k) for k in SHARED_SETTINGS}
    if theirs != ours:
        raise SystemExit(
            f"{path}: recorded with {theirs}, this run has {ours}: rerun with those settings, "
            "or move the file away to start a new benchmark"
        )
    return {name: {"machine": recorded["machine"], **run} for name, run in recorded["runs"].items()}


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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip finished searches (in --workdir or recorded in the results file) and continue "
        "interrupted ones (others start afresh)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the results from the searches finished in --workdir",
    )
    parser.add_argument(
        "--lock",
        type=Path,
        default=Path("/tmp/distmed-ray.lock"),
        help="held (flock) while each search runs: one Ray cluster on the machine at a time",
    )
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
    """One search (skipped when `--resume` finds it finished); its run, timing and method."""
    import json

    import yaml

    name = run_name(dataset, method, seed)
    out = args.workdir / "runs" / name
    timing_path = args.workdir / f"timing-{name}.json"
    if args.resume and finished(out):
        print(f"[search] {name}: finished before, kept", flush=True)
        return finished_run(args.workdir, name)
    space = args.workdir / f"space-{name}.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text(yaml.safe_dump(space_spec(dataset, method, seed, args), sort_keys=False))
    started = time.perf_counter()
    # The subset's --data comes after run_tune's own (the full file): argparse keeps the last.
    extra = ("--data", str(data))
    resume = args.resume and out.is_dir()  # an interrupted search continues, a new one starts
    machine = machine_info()  # this search's: the code it imports is the tree's now
    timing = run_tune(name, space, dataset, args.workdir, resume, extra=extra, lock=args.lock)
    timing_path.write_text(json.dumps({**timing, "machine": machine}))
    print(f"[search] {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return finished_run(args.workdir, name)


_RUN_NAME = re.compile(
    r"^(?P<dataset>[a-z]+)-(?P<sampler>[a-z_]+)-(?P<scheduler>[a-z]+)-seed(?P<seed>\d+)$"
)


def finished(run_dir: Path) -> bool:
    """Whether the search in `run_dir` ended: an interrupted one has a summary too."""
    import json

    path = run_dir / "summary.json"
    return path.is_file() and not json.loads(path.read_text()).get("interrupted", False)


def finished_run(workdir: Path, name: str) -> dict[str, Any]:
    """A finished search of this benchmark under `workdir`: its trials, summary and timing."""
    import json

    match = _RUN_NAME.match(name)
    if match is None:
        raise ValueError(f"{name}: not a run name of this benchmark")
    dataset, seed = match["dataset"], int(match["seed"])
    method = f"{match['sampler']}+{match['scheduler']}"
    run = load_run(workdir, dataset, f"{match['sampler']}-{match['scheduler']}-seed{seed}")
    timing_path = workdir / f"timing-{name}.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    return {**run, **timing, "method": method, "seed": seed}


def finished_runs(workdir: Path) -> dict[str, dict[str, Any]]:
    """Every finished search of this benchmark in `workdir`, by run name: the results cover
    all slices run into it (`--seeds`, `--datasets` runs one after another)."""
    runs = {}
    for summary in sorted((workdir / "runs").glob("*/summary.json")):
        name = summary.parent.name
        match = _RUN_NAME.match(name)
        if (
            match
            and f"{match['sampler']}+{match['scheduler']}" in METHODS
            and finished(summary.parent)
        ):
            runs[name] = finished_run(workdir, name)
    return runs


# --------------------------------------------------------------------------- the numbers

# The costs a search is measured in, by the trial's key that holds each: epochs trained (the
# primary measure: it does not depend on what else the machine runs), the Train worker's
# process CPU seconds (hardly moved by load), and trial wall-seconds (Tune's time_total_s,
# which a shared machine inflates).
COSTS = {"epochs": "epochs", "cpu_s": "cpu_s", "trial_s": "time_s"}
COST_LABELS = {
    "epochs": "epochs",
    "cpu_s": "worker CPU-s",
    "trial_s": "trial-s",
}


def cost_curve(trials: list[dict[str, Any]], key: str) -> list[dict[str, float]]:
    """After each trial (start order): the cumulative cost in `key` and the best completed
    CV ROC-AUC so far (a trial ASHA stopped scored after fewer epochs: no result). The
    curve ends before the first trial whose cost is unknown (None or NaN)."""
    points, best, spent = [], -math.inf, 0.0
    for trial in trials:
        cost = trial.get(key)
        if cost is None or not math.isfinite(float(cost)):
            break
        spent += float(cost)
        if trial["status"] == "completed" and math.isfinite(trial["cv_roc_auc"]):
            best = max(best, trial["cv_roc_auc"])
        points.append({"cost": round(spent, 2), "best": best})
    return points


def cost_to_reach(trials: list[dict[str, Any]], target: float, key: str) -> float | None:
    """Cost in `key` (summed in start order) until the best completed CV ROC-AUC so far is at
    least `target`; None if it never is (or a cost on the way is unknown)."""
    for point in cost_curve(trials, key):
        if point["best"] >= target:
            return point["cost"]
    return None


def seconds_to_reach(trials: list[dict[str, Any]], target: float) -> float | None:
    """Trial-seconds to reach `target` (`cost_to_reach` in Tune's time_total_s)."""
    return cost_to_reach(trials, target, "time_s")


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


def where_cost_goes(trials: list[dict[str, Any]]) -> dict[str, float | None]:
    """One search's spending: the share of trials stopped early, epochs trained, trial-seconds
    per epoch; the median trial's seconds to its first report (Train worker start-up, data
    and model set-up, the first epoch) and per later epoch, and the share of all trial-seconds
    spent before first reports; the median trial's worker CPU-s to its first report and per
    later epoch (a first report that took far more seconds than CPU-s waited for the CPUs)."""
    import statistics

    def finite(value: Any) -> bool:
        return value is not None and math.isfinite(float(value))

    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    timed = [t for t in trials if finite(t["time_s"])]
    epochs = sum(t["epochs"] for t in timed)
    seconds = sum(t["time_s"] for t in timed)
    firsts = [t for t in timed if finite(t.get("first_report_s"))]
    later = [t for t in firsts if t["epochs"] > 1]
    cpu_later = [t for t in later if finite(t.get("cpu_s")) and finite(t.get("first_report_cpu_s"))]
    return {
        "stopped_early": sum(t["status"] == "stopped" for t in trials) / max(1, len(trials)),
        "epochs": epochs,
        "trial_s_per_epoch": seconds / epochs if epochs else None,
        "first_report_s": median([t["first_report_s"] for t in firsts]),
        "later_epoch_s": median(
            [(t["time_s"] - t["first_report_s"]) / (t["epochs"] - 1) for t in later]
        ),
        "first_report_share": (
            sum(t["first_report_s"] for t in firsts) / seconds
            if seconds and len(firsts) == len(timed)
            else None
        ),
        "first_report_cpu_s": median(
            [t["first_report_cpu_s"] for t in firsts if finite(t.get("first_report_cpu_s"))]
        ),
        "later_epoch_cpu_s": median(
            [(t["cpu_s"] - t["first_report_cpu_s"]) / (t["epochs"] - 1) for t in cpu_later]
        ),
    }


WHERE = (
    "stopped_early",
    "epochs",
    "trial_s_per_epoch",
    "first_report_s",
    "later_epoch_s",
    "first_report_share",
    "first_report_cpu_s",
    "later_epoch_cpu_s",
)


def summarise(runs: dict[str, dict[str, Any]], datasets: list[str], seeds: list[int]) -> dict:
    """Per data set and method, over seeds: each cost (`COSTS`) to reach the same seed's
    reference's final best, each total cost, the final best and where the cost goes; and per
    cost the target method's median over the reference's median."""
    out: dict[str, Any] = {}
    for dataset in datasets:
        per_method: dict[str, Any] = {}
        for method in METHODS:
            reach: dict[str, list[float]] = {c: [] for c in COSTS}
            total: dict[str, list[float]] = {c: [] for c in COSTS}
            finals: list[float] = []
            goes: list[dict[str, float | None]] = []
            for seed in seeds:
                run = runs.get(run_name(dataset, method, seed))
                ref = runs.get(run_name(dataset, REFERENCE, seed))
                if run is None or ref is None or ref["best_cv_roc_auc"] is None:
                    continue
                finals.append(run["best_cv_roc_auc"])
                goes.append(where_cost_goes(run["trials"]))
                for cost, key in COSTS.items():
                    curve = cost_curve(run["trials"], key)
                    if len(curve) == len(run["trials"]):  # every trial's cost known
                        total[cost].append(curve[-1]["cost"] if curve else 0.0)
                    spent = cost_to_reach(run["trials"], ref["best_cv_roc_auc"], key)
                    if spent is not None:
                        reach[cost].append(spent)
            per_method[method] = {
                **{f"{c}_to_reference_best": spread(v) for c, v in reach.items()},
                **{f"total_{c}": spread(v) for c, v in total.items()},
                "final_best_cv_roc_auc": spread(finals),
                "where_cost_goes": {
                    k: spread([g[k] for g in goes if g[k] is not None]) for k in WHERE
                },
                "seeds": len(finals),
            }
        ratios = {}
        for cost in COSTS:
            ref_c = per_method[REFERENCE][f"{cost}_to_reference_best"]["median"]
            target_c = per_method[TARGET_METHOD][f"{cost}_to_reference_best"]["median"]
            ratios[cost] = target_c / ref_c if ref_c and target_c is not None else None
        out[dataset] = {
            "methods": per_method,
            "target_over_reference": ratios,
            "target_over_reference_per_seed": per_seed_ratios(runs, dataset, seeds),
        }
    return out


def per_seed_ratios(
    runs: dict[str, dict[str, Any]], dataset: str, seeds: list[int]
) -> dict[str, Any]:
    """Per cost, each seed's ratio of the target method's cost to reach the reference's final
    best to the reference's own (inf where the target never reaches it), and their median:
    the figure the target (at most 1/3) is judged by, as a seed that misses counts."""
    import statistics

    out: dict[str, Any] = {}
    for cost, key in COSTS.items():
        per_seed: dict[str, float] = {}
        for seed in seeds:
            run = runs.get(run_name(dataset, TARGET_METHOD, seed))
            ref = runs.get(run_name(dataset, REFERENCE, seed))
            if run is None or ref is None or ref["best_cv_roc_auc"] is None:
                continue
            target = ref["best_cv_roc_auc"]
            ref_c = cost_to_reach(ref["trials"], target, key)
            run_c = cost_to_reach(run["trials"], target, key)
            if ref_c:
                per_seed[str(seed)] = math.inf if run_c is None else run_c / ref_c
        values = list(per_seed.values())
        out[cost] = {
            "seeds": per_seed,  # inf (null in the JSON file): never reached
            "seeds_not_reaching": [k for k, v in per_seed.items() if v == math.inf],
            "median": statistics.median(values) if values else None,
        }
    return out


def _median_range(s: dict[str, Any], digits: int) -> str:
    if s["median"] is None:
        return "not reached"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f} - {s['max']:.{digits}f})"


def results_table(dataset: str, summary: dict[str, Any]) -> str:
    rows = []
    for method, s in summary["methods"].items():
        if not s["seeds"]:
            continue  # not run
        sampler, scheduler = method.split("+")
        final = s["final_best_cv_roc_auc"]
        rows.append(
            [
                f"{LABELS[sampler]} + {LABELS[scheduler]}",
                *(_median_range(s[f"{c}_to_reference_best"], 0) for c in COSTS),
                f"{s['epochs_to_reference_best']['n']}/{s['seeds']}",
                "-" if final["median"] is None else _median_range(final, 4),
                "-"
                if s["total_epochs"]["median"] is None
                else f"{s['total_epochs']['median']:.0f}",
            ]
        )
    headers = [
        f"{dataset}: method",
        *(f"{COST_LABELS[c]} to random's final best" for c in COSTS),
        "seeds reaching it",
        "final best CV ROC-AUC",
        "epochs in all",
    ]
    return markdown_table(headers, rows)


def _shown(
    values: dict[str, float | None],
    key: str,
    digits: int = 1,
    scale: float = 1.0,
    suffix: str = "",
) -> str:
    value = values[key]
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def cost_table(dataset: str, summary: dict[str, Any]) -> str:
    """Where each method's cost goes (medians over seeds of each search's figures)."""
    rows = []
    for method, s in summary["methods"].items():
        if not s["seeds"]:
            continue
        sampler, scheduler = method.split("+")
        w = {k: s["where_cost_goes"][k]["median"] for k in WHERE}
        show = functools.partial(_shown, w)
        rows.append(
            [
                f"{LABELS[sampler]} + {LABELS[scheduler]}",
                show("stopped_early", 0, 100, "%"),
                show("epochs", 0),
                show("trial_s_per_epoch"),
                f"{show('first_report_s')} / {show('later_epoch_s')}",
                show("first_report_share", 0, 100, "%"),
                f"{show('first_report_cpu_s')} / {show('later_epoch_cpu_s')}",
            ]
        )
    headers = [
        f"{dataset}: method",
        "trials stopped early",
        "epochs in all",
        "trial-s per epoch",
        "trial-s: to 1st report / per later epoch",
        "trial-s before 1st reports",
        "worker CPU-s: to 1st report / per later epoch",
    ]
    return markdown_table(headers, rows)


def plot_curves(runs: dict[str, dict[str, Any]], datasets: list[str], path: Path) -> Path:
    """Best-so-far CV ROC-AUC against cumulative epochs (top) and trial-seconds (bottom), a
    column per data set, a line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("epochs", "cumulative epochs trained"), ("trial_s", "cumulative trial-seconds")]
    fig, axes = plt.subplots(
        len(panels), len(datasets), figsize=(6 * len(datasets), 8), squeeze=False
    )
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for column, dataset in enumerate(datasets):
        for row, (cost, xlabel) in enumerate(panels):
            ax = axes[row][column]
            labelled: set[str] = set()
            for key, run in sorted(runs.items()):
                if not key.startswith(f"{dataset}-"):
                    continue
                curve = [
                    p for p in cost_curve(run["trials"], COSTS[cost]) if math.isfinite(p["best"])
                ]
                sampler, scheduler = run["method"].split("+")
                label = None
                if run["method"] not in labelled:
                    labelled.add(run["method"])
                    label = f"{LABELS[sampler]} + {LABELS[scheduler]}"
                ax.step(
                    [p["cost"] for p in curve],
                    [p["best"] for p in curve],
                    where="post",
                    color=colours[run["method"]],
                    linestyle="-" if scheduler == "asha" else "--",
                    alpha=0.7,
                    label=label,
                )
            ax.set(title=f"{dataset} 28 px", xlabel=xlabel, ylabel="best completed CV ROC-AUC")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(
    runs: dict[str, dict[str, Any]], args: argparse.Namespace, ran_here: bool = True
) -> None:
    """Results of every finished search in `runs`: the JSON file, the figure, the tables.

    `ran_here`: False when no search ran in this process (`--report-only`, or `--resume`
    with every search recorded): the file then keeps the machine it recorded, since this
    one measured nothing (each search's own machine is in its run record either way)."""
    import json

    from benchmarks.common import write_result

    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in runs.values())]
    seeds = sorted({r["seed"] for r in runs.values()})
    if not runs:
        print("[search] no finished search to report", flush=True)
        return
    machine = machine_info()
    path = RESULTS / "search_methods.json"
    if not ran_here and path.is_file():
        machine = json.loads(path.read_text())["machine"]
    summary = summarise(runs, datasets, seeds)
    plot = plot_curves(runs, datasets, RESULTS / "search_methods.png")
    settings = {k: getattr(args, k) for k in SHARED_SETTINGS}
    methods = [m for m in METHODS if any(r["method"] == m for r in runs.values())]
    write_result(
        "search_methods",
        {
            "machine": machine,
            "settings": {**settings, "methods": methods, "datasets": datasets, "seeds": seeds},
            "reference": REFERENCE,
            "target_method": TARGET_METHOD,
            "summary": summary,
            "runs": runs,
            "plot": plot.name,
        },
    )
    print(machine_line(machine))
    for dataset in datasets:
        print(results_table(dataset, summary[dataset]))
        print(cost_table(dataset, summary[dataset]))
        ratios = summary[dataset]["target_over_reference_per_seed"]
        print(f"{dataset}: {TARGET_METHOD} / {REFERENCE}, cost to reach, per seed: {ratios}")


if __name__ == "__main__":
    raise SystemExit(main())
