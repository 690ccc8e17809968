"""What the architecture table and the training recipe buy: fresh searches over
`search_spaces/backbones.yaml` on PneumoniaMNIST and BreastMNIST at 28 px on a CPU, and an
ablation of each recipe element on BreastMNIST, through the real CLIs.

    python -m benchmarks.quality --plan              # what would run, its size; runs nothing
    python -m benchmarks.quality                     # everything (planned for ~1 h on 2 idle cores)
    python -m benchmarks.quality --only ablation     # one part (search-pneumoniamnist,
                                                     # search-breastmnist, ablation)
    python -m benchmarks.quality --round 2           # the second plan: ResNet-18 with the
                                                     # 28 px stem, no ablation (~3.5 h)

Protocol. Everything that decides the outcome is written to the results file before the
first command runs, so before any test split is read: each search's exact space file (the
backbones space with the data set's settings), its trial budget and seeds, the ablation's
configurations and seeds, and the published rows compared against. Each search's
CV-selected model (its best trial refit on train + val) is then scored once on the official
test split by `distmed.tune` itself, and compared with MedMNIST v2's from-scratch 28 px rows
(Yang et al., Scientific Data 2023, Table 3) and with distmed's earlier search
(benchmarks/BENCHMARKS.md). The ablation cross-validates one fixed configuration
(`python -m distmed.train`, CV only, no test split) with each recipe element switched on
alone, same folds and seeds, and reports CV ROC-AUC and wall time per element.
Results: `benchmarks/results/quality-backbones.json` (round 2: `quality-r2.json`), rewritten
after each part. A round is a plan written once; a later round says in its plan (`why`) what
it changed after the earlier rounds' results and which test scores had been read by then.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    REPO,
    RESULTS,
    git_commit,
    machine_info,
    markdown_table,
    write_result,
)
from benchmarks.medmnist import SHARED, load_run, merged, run_tune

SPACES_DIR = "search_spaces"
SPACE = REPO / SPACES_DIR / "backbones.yaml"
RESULT_NAME = "quality-backbones"
DATASETS = ("pneumoniamnist", "breastmnist")
METHOD = "backbones"  # the run folder: runs/<dataset>-backbones (medmnist.load_run's layout)
# Test ROC-AUC on the official test split: MedMNIST v2 Table 3 (from scratch, 28 px), and
# distmed's earlier ResNet-18 search (BENCHMARKS.md, 'Quality').
PUBLISHED = {
    "pneumoniamnist": {
        "MedMNIST v2 ResNet-18 (28)": 0.944,
        "MedMNIST v2 ResNet-50 (28)": 0.948,
        "distmed before (ResNet-18 search)": 0.955,
    },
    "breastmnist": {
        "MedMNIST v2 ResNet-18 (28)": 0.901,
        "MedMNIST v2 ResNet-50 (28)": 0.857,
        "distmed before (ResNet-18 search)": 0.875,
    },
}
# Per data set: what makes a search fit about 40 minutes. PneumoniaMNIST (5,232 train + val
# images) as search_spaces/medmnist28.yaml trains it (2 folds, 3 epochs); BreastMNIST (624)
# needs more steps per trial (3 folds of ~416 training images, batch 32, 12 epochs), as
# benchmarks/medmnist.py found. 8 trials give each of the 4 archs two on average (the first
# run's 6 left MobileNet and EfficientNet with one each).
SEARCH_SETTINGS: dict[str, dict[str, Any]] = {
    "pneumoniamnist": {
        "base": {"train": {"epochs": 3}},
        # Grace 2: the first epoch is the warm-up (optim.warmup_epochs: 1); the first run
        # judged 5 of 6 trials on it.
        "search": {"num_samples": 8, "scheduler": {"grace_period": 2}},
        "space": {},
    },
    "breastmnist": {
        "base": {"train": {"epochs": 12, "batch_size": 32}, "cv": {"folds": 3}},
        "search": {"num_samples": 8, "scheduler": {"grace_period": 4}},
        "space": {"train.batch_size": {"choice": [16, 32]}},
    },
}
# Measured minutes per trial on 2 idle cores (BENCHMARKS.md: 6 PneumoniaMNIST trials of 3
# epochs took 18.6 min with refit; BreastMNIST ~8 min a 30-epoch trial), scaled to these
# settings; ResNet-50 trials cost ~2x a ResNet-18's. An estimate, printed as one.
MINUTES_PER_TRIAL = {"pneumoniamnist": 3.5, "breastmnist": 3.5}
MINUTES_PER_ABLATION_RUN = 1.5

# Round 2 (2026-12-06), written after round 1's results (BENCHMARKS.md part 9) and before any
# of its own runs. What changed and why, from round 1's CV side only:
# - ResNet-18, the arch round 1's CV selected on both sets, with the 28 px stem of MedMNIST
#   v2's own ResNets (3x3 conv, stride 1, no max-pool: `model.stem: small`), the reference
#   this benchmark compares with; the ImageNet stem leaves a 1x1 map at layer4 at 28 px.
# - BreastMNIST 30 epochs: at 12, ASHA stopped 6 of 8 trials at CV 0.52-0.65.
# - Focal loss and mixup out of the space: each lowered CV in round 1's ablation (-0.017,
#   -0.012); the search's other recipe keys (label smoothing, EMA) stay searched.
# Disclosed in the results file: the small stem's BreastMNIST test scores (part 6, post hoc
# searches) were read before this plan was written.
ROUND2_WHY = (
    "ResNet-18 (round 1's CV choice on both sets) with MedMNIST v2's 28 px stem "
    "(model.stem: small); BreastMNIST 30 epochs (round 1: 6 of 8 trials stopped at 12); focal "
    "loss and mixup out of the space (round 1's ablation: both lowered CV). Test scores of "
    "small-stem BreastMNIST searches (BENCHMARKS.md part 6, post hoc) were read before this plan."
)
# Keys of the backbones space that round 2 drops (None) or fixes in its base.
ROUND2_DROPPED: dict[str, Any] = {"model.arch": None, "train.loss": None, "train.mixup_alpha": None}
ROUND2_SETTINGS: dict[str, dict[str, Any]] = {
    "pneumoniamnist": {
        "base": {"model": {"arch": "resnet18", "stem": "small"}, "train": {"epochs": 3}},
        "search": {"num_samples": 6, "scheduler": {"grace_period": 2}},
        "space": dict(ROUND2_DROPPED),
    },
    "breastmnist": {
        "base": {
            "model": {"arch": "resnet18", "stem": "small"},
            "train": {"epochs": 30, "batch_size": 32},
            "cv": {"folds": 3},
        },
        "search": {"num_samples": 6, "scheduler": {"grace_period": 8}},
        "space": {**ROUND2_DROPPED, "train.batch_size": {"choice": [16, 32]}},
    },
}
# The small stem runs layer1 at 28x28 instead of 7x7: ~16x a round-1 ResNet-18's compute per
# image. Measured in round 2's first trial (AVX2 host, a helper's tests beside it): 5.7-6.7 min
# per PneumoniaMNIST epoch (2 folds of 2,616 images), 18 min for 3 epochs; BreastMNIST's epoch
# (3 folds of 416) is ~1/4 of that, so ~30-40 min for 30 epochs, and ASHA's stopped trials
# (8 or 16 epochs) less. The plan as first written said 4.5 and 5.0, scaled wrongly from
# ImageNet-stem trials; an estimate is not part of what a continued plan must match.
ROUND2_MINUTES_PER_TRIAL = {"pneumoniamnist": 15.0, "breastmnist": 20.0}


@dataclass(frozen=True)
class Round:
    """One pre-registered quality run: its results file, its run folders
    (`runs/<dataset>-<method>`), its per-set settings and whether it runs the ablation."""

    result_name: str
    method: str
    settings: dict[str, dict[str, Any]]
    minutes_per_trial: dict[str, float]
    ablation: bool
    why: str


ROUNDS = {
    1: Round(RESULT_NAME, METHOD, SEARCH_SETTINGS, MINUTES_PER_TRIAL, True, "the first plan"),
    2: Round("quality-r2", "r2", ROUND2_SETTINGS, ROUND2_MINUTES_PER_TRIAL, False, ROUND2_WHY),
}

ABLATION_DATASET = "breastmnist"
# One fixed configuration (the backbones base at BreastMNIST's settings, ResNet-18); each row
# switches one element on. Same cv.seed and train.seed everywhere.
ABLATION_BASE = [
    "model.arch=resnet18",
    "train.epochs=12",
    "train.batch_size=32",
    "cv.folds=3",
    "optim.lr=0.001",
]
ABLATION_ROWS: dict[str, list[str]] = {
    "baseline (recipe off)": [],
    "label smoothing 0.1": ["train.label_smoothing=0.1"],
    "focal loss (gamma 2)": ["train.loss=focal"],
    "mixup 0.2": ["train.mixup_alpha=0.2"],
    "cutmix 1.0": ["train.cutmix_alpha=1.0"],
    "EMA 0.9": ["train.ema_decay=0.9"],
    "layer-wise lr decay 0.7": ["optim.layer_decay=0.7"],
    "accumulate 2 batches (16 x 2)": ["train.batch_size=16", "train.accumulate_steps=2"],
    "RandAugment (2 ops, M 9)": ["data.augment.policy=randaugment"],
    "TrivialAugmentWide": ["data.augment.policy=trivialaugment"],
    "random resized crop (scale 0.7)": ["data.augment.crop_scale=0.7"],
    "intensity jitter (0.2 each)": [
        "data.augment.brightness=0.2",
        "data.augment.contrast=0.2",
        "data.augment.gamma=0.2",
    ],
    "balanced sampler": ["train.sampler=balanced"],
    "TTA flips (validation)": ["data.augment.tta=flips"],
}
SEEDS = (0,)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result_name = ROUNDS[args.round].result_name
    plan = build_plan(args)
    check_plan(plan)
    print(plan_text(plan))
    if args.plan:
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    payload = continued_payload(plan) if args.only else None
    if payload is None:
        payload = {"plan": plan, "searches": {}, "ablation": {}}
        # Written before the first command: nothing about the outcome is chosen after this.
        path = write_result(result_name, payload)
        print(f"[quality] plan written to {path}", flush=True)
    for dataset in DATASETS:
        if args.only in (None, f"search-{dataset}"):
            payload["searches"][dataset] = run_search(dataset, plan, args)
            write_result(result_name, payload)
    if args.only in (None, "ablation"):
        for name, item in plan["ablation"]["runs"].items():
            payload["ablation"][name] = run_ablation(name, item, args)
            write_result(result_name, payload)
    print(report(payload))
    return 0


def continued_payload(plan: dict[str, Any]) -> dict[str, Any] | None:
    """The results file of the run this `--only` continues: its plan (written before that
    run's first command) and its other parts kept. None when there is none, or when its
    plan's searches or ablation differ from today's (then the part runs under a new plan)."""
    path = RESULTS / f"{ROUNDS[plan.get('round', 1)].result_name}.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    before = payload.get("plan", {})
    same = all(
        _decisive(before.get(k)) == _decisive(plan[k])
        for k in ("searches", "ablation", "published_test_roc_auc")
    )
    if not same:
        return None
    print(f"[quality] continuing {path} (plan written {before.get('written_utc')})", flush=True)
    return payload


def _decisive(part: Any) -> Any:
    """A plan part without its time estimates (`estimated_min`), with the space file named
    from the repository's root and each data file by its name: an estimate corrected after a
    measurement, the folder the checkout lay in when the plan was written (a worktree, a
    clone) or the one the shared data lies in on this host decides nothing about the outcome,
    so none of them makes a new plan."""
    if isinstance(part, dict):
        return {
            k: Path(v).name if k == "data" and isinstance(v, str) else _decisive(v)
            for k, v in part.items()
            if k != "estimated_min"
        }
    if isinstance(part, str) and f"/{SPACES_DIR}/" in part:
        return part[part.index(f"/{SPACES_DIR}/") + 1 :]
    return part


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    parser.add_argument("--plan", action="store_true", help="print the plan; run nothing")
    parser.add_argument(
        "--only", choices=[*(f"search-{d}" for d in DATASETS), "ablation"], help="one part"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="ablation")
    parser.add_argument(
        "--workdir", type=Path, default=REPO / "runs" / "quality", help="spaces, runs, logs"
    )
    parser.add_argument("--resume", action="store_true", help="continue interrupted searches")
    parser.add_argument(
        "--round",
        type=int,
        choices=sorted(ROUNDS),
        default=1,
        help="which pre-registered plan: 1 (backbones searched, ablation) or 2 (ResNet-18 with "
        "the 28 px stem, longer BreastMNIST schedule; no ablation)",
    )
    return parser.parse_args(argv)


def space_spec(dataset: str, round_: int = 1) -> dict[str, Any]:
    """The backbones space with `dataset`'s settings in `round_` (the exact file each search
    runs); a space key set to None is dropped from the search."""
    spec = yaml.safe_load(SPACE.read_text())
    settings = ROUNDS[round_].settings[dataset]
    spec["base"] = merged(spec["base"], settings["base"])
    spec["search"] = merged(spec["search"], settings["search"])
    # A searched key is replaced whole (a `choice` must not merge into a `loguniform`).
    changed = {**spec["space"], **copy.deepcopy(settings["space"])}
    spec["space"] = {key: value for key, value in changed.items() if value is not None}
    return spec


def build_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything fixed before the first run: spaces, budgets, seeds, ablation, references."""
    commit, dirty = git_commit()
    round_ = ROUNDS[args.round]
    searches = {}
    for d in DATASETS:
        spec = space_spec(d, args.round)
        searches[d] = {
            "space": spec,
            "data": str(SHARED / f"{d}.npz"),
            "trials": spec["search"]["num_samples"],
            "search_seed": spec["search"]["seed"],
            "cv_seed": spec["base"]["cv"]["seed"],
            "estimated_min": round_.minutes_per_trial[d] * spec["search"]["num_samples"] + 3,
        }
    runs = {
        f"{name} / seed {seed}": {
            "element": name,
            "seed": seed,
            "overrides": [*ABLATION_BASE, *changes, f"train.seed={seed}", f"cv.seed={seed}"],
        }
        for name, changes in ABLATION_ROWS.items()
        for seed in args.seeds
        if round_.ablation
    }
    return {
        "written_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "machine": machine_info(),
        "round": args.round,
        "why": round_.why,
        "selection": "each search's best CV ROC-AUC trial, refit on train + val; test once",
        "published_test_roc_auc": PUBLISHED,
        "searches": searches,
        "ablation": {
            "dataset": ABLATION_DATASET,
            "config": f"{SPACE.relative_to(REPO)} (its base)",
            "runs": runs,
            "estimated_min": MINUTES_PER_ABLATION_RUN * len(runs),
        },
    }


def check_plan(plan: dict[str, Any]) -> None:
    """Validate every planned space and ablation config as the CLIs will (a dry run).

    Raises:
        UserError: a space or an override the config rejects (one line naming it).
    """
    import tempfile

    from distmed.config import load_config
    from distmed.space import load_space

    with tempfile.TemporaryDirectory() as tmp:
        for dataset, search in plan["searches"].items():
            path = Path(tmp) / f"{dataset}.yaml"
            path.write_text(yaml.safe_dump(search["space"], sort_keys=False))
            load_space(path)
    for item in plan["ablation"]["runs"].values():
        load_config(SPACE, item["overrides"])


def plan_text(plan: dict[str, Any]) -> str:
    lines = [
        f"[quality] round {plan.get('round', 1)} plan (fixed before any data is read): "
        f"{plan.get('why', '')}"
    ]
    total = plan["ablation"]["estimated_min"]
    for dataset, search in plan["searches"].items():
        space = ", ".join(search["space"]["space"])
        lines.append(
            f"  search {dataset}: {search['trials']} trials, search seed "
            f"{search['search_seed']}, cv seed {search['cv_seed']}, space {space}; "
            f"~{search['estimated_min']:.0f} min"
        )
        total += search["estimated_min"]
    ablation = plan["ablation"]
    if ablation["runs"]:
        lines.append(
            f"  ablation on {ablation['dataset']}: {len(ablation['runs'])} CV runs "
            f"({', '.join(ABLATION_ROWS)}); ~{ablation['estimated_min']:.0f} min"
        )
    else:
        lines.append("  no ablation in this round (round 1's table stands)")
    lines.append(f"  total ~{total:.0f} min on 2 idle cores (estimate from BENCHMARKS.md)")
    return "\n".join(lines)


def run_search(dataset: str, plan: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`distmed.tune` over the planned space; its refit model is scored once on the test."""
    method = ROUNDS[plan.get("round", 1)].method
    name = f"{dataset}-{method}"
    space = args.workdir / f"{name}.yaml"
    space.write_text(yaml.safe_dump(plan["searches"][dataset]["space"], sort_keys=False))
    ran = _provenance()
    timing = run_tune(name, space, dataset, args.workdir, args.resume)
    run = load_run(args.workdir, dataset, method)
    run.update(timing)
    return {
        "best_cv_roc_auc": run["best_cv_roc_auc"],
        "best_cv_roc_auc_std": run["best_cv_roc_auc_std"],
        "best_config": run["best_config"],
        "test_metrics": run["test_metrics"],
        "test_ci95": run["test_ci95"],
        "trials": run["trials"],
        "wall_s": timing["wall_s"],
        "machine_cpu_s": timing["machine_cpu_s"],
        "disturbance": timing["disturbance"],
        "ran": ran,
    }


def _provenance() -> dict[str, Any]:
    """The code and time a part ran at: a continued plan's parts may run at later commits
    than the one the plan was written at (`plan.commit`)."""
    commit, dirty = git_commit()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    return {"commit": commit, "dirty": dirty, "started_utc": started}


def run_ablation(name: str, item: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`python -m distmed.train` on BreastMNIST's CV pool with the row's overrides."""
    out = args.workdir / "ablation" / name.replace(" ", "_").replace("/", "-")
    command = [
        sys.executable,
        "-m",
        "distmed.train",
        "--config",
        str(SPACE),
        "--data",
        str(SHARED / f"{ABLATION_DATASET}.npz"),
        "--output",
        str(out),
        *(arg for o in item["overrides"] for arg in ("--set", o)),
    ]
    print(f"[quality] ablation {name}: {' '.join(command[2:])}", flush=True)
    ran = _provenance()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {**item, "error": f"exit {done.returncode}", "wall_s": round(wall, 1), "ran": ran}
    result = json.loads((out / "cv_result.json").read_text())
    return {
        **item,
        "cv_roc_auc": result["mean_roc_auc"],
        "fold_roc_auc": [f["roc_auc"] for f in result["folds"]],
        "wall_s": round(wall, 1),
        "ran": ran,
    }


def report(payload: dict[str, Any]) -> str:
    """The comparison table and the ablation table, as markdown."""
    rows = []
    round_ = payload["plan"].get("round", 1)
    for dataset, search in payload["searches"].items():
        arch = (search.get("best_config") or {}).get("model", {}).get("arch", "?")
        rows.append(
            [
                dataset,
                f"distmed round {round_} search (selected: {arch})",
                f"{search['best_cv_roc_auc']:.4f}",
                f"{search['test_metrics']['roc_auc']:.3f}",
                f"{search['wall_s'] / 60:.0f} min",
            ]
        )
        for label, auc in PUBLISHED[dataset].items():
            rows.append([dataset, label, "", f"{auc:.3f}", ""])
    text = markdown_table(["data set", "model", "CV ROC-AUC", "test ROC-AUC", "wall"], rows)
    ablation = [
        [
            name,
            "error: " + r["error"] if "error" in r else f"{r['cv_roc_auc']:.4f}",
            f"{r['wall_s'] / 60:.1f} min",
        ]
        for name, r in payload["ablation"].items()
    ]
    if ablation:
        text += "\n\n" + markdown_table(["recipe element", "CV ROC-AUC", "wall"], ablation)
    return text


if __name__ == "__main__":
    sys.exit(main())
