"""Evaluation on real MedMNIST data: fold ensemble vs refit, and nested cross-validation.

    python -m benchmarks.evaluation                   # both parts (~30 min on 2 cores)
    python -m benchmarks.evaluation --only ensemble   # PneumoniaMNIST: refit vs fold ensemble
    python -m benchmarks.evaluation --only nested     # BreastMNIST: --nested 3
    python -m benchmarks.evaluation --only nested --resume   # continue an interrupted one

Ensemble: the shipped `search_spaces/medmnist28.yaml` search on PneumoniaMNIST (the same one
as `benchmarks.medmnist --only search`), whose summary scores the official test split once
with the refit model and once with the best trial's fold models (mean of probabilities),
both after the temperature fitted on that trial's out-of-fold predictions; the uncalibrated
ECE is recovered from the saved test predictions. Nested: BreastMNIST with `--nested 3`, each
outer fold a small search (4 trials, 20 epochs, 3 inner folds) on two thirds of train + val,
refit there and scored once on the third left out. Results: `benchmarks/results/
evaluation-ensemble.json` and `evaluation-nested.json`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from benchmarks.common import (
    machine_info,
    machine_line,
    markdown_table,
    write_result,
)
from benchmarks.medmnist import (
    DATASET_SETTINGS,
    SPACE,
    bootstrap_intervals,
    merged,
    run_tune,
)

# Small inner searches keep the nested run to about three small searches: 4 trials (Optuna's
# TPE samples at random for its first 10, so this is random search), 20 epochs instead of the
# BreastMNIST benchmark's 30.
NESTED_OUTER = 3
NESTED_CHANGES: dict[str, Any] = {
    "base": {"train": {"epochs": 20}},
    "search": {"num_samples": 4},
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    print(machine_line(machine), flush=True)
    if args.only in (None, "ensemble"):
        print(ensemble_table(run_ensemble(args, machine)))
    if args.only in (None, "nested"):
        print(nested_table(run_nested(args, machine)))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["ensemble", "nested"])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "distmed-bench-eval",
        help="where the searches write their runs (outside the repository)",
    )
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs")
    return parser.parse_args(argv)


def write_space(spec: dict[str, Any], path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --------------------------------------------------------------------------- ensemble


def run_ensemble(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    """The shipped PneumoniaMNIST search; the refit model and the fold ensemble on test."""
    import yaml

    from distmed.summary import RunSummary

    name = "pneumoniamnist-ensemble"
    space = write_space(yaml.safe_load(SPACE.read_text()), args.workdir / f"space-{name}.yaml")
    timing = run_tune(name, space, "pneumoniamnist", args.workdir, args.resume)
    out = args.workdir / "runs" / name
    summary = RunSummary.load(out / "summary.json")
    model_file = out / "best_model.pt"
    result = {
        "machine": machine,
        "dataset": "pneumoniamnist",
        "space_used": space.read_text(),
        **timing,
        "search_wall_time_s": summary.wall_time_s,
        "best_trial": summary.best_trial,
        "best_cv_roc_auc": summary.best_cv_roc_auc,
        "best_cv_roc_auc_se": summary.best_cv_roc_auc_se,
        "refit_epochs": summary.refit_epochs,
        "best_model_mib": round(model_file.stat().st_size / 2**20, 1),
        "temperature": temperature_of(model_file),
        "models": {
            "refit": side(out, "test_predictions.npz", summary.test_metrics, model_file),
            "folds": side(
                out, "test_predictions_folds.npz", summary.test_metrics_folds, model_file
            ),
        },
    }
    result["roc_auc_refit_minus_folds"] = paired_auc_difference(
        out / "test_predictions.npz", out / "test_predictions_folds.npz", positive_of(model_file)
    )
    write_result("evaluation-ensemble", result)
    return result


def positive_of(model_file: Path) -> int | None:
    from distmed.savedmodel import SavedModel

    return SavedModel.load(model_file).positive_index


def paired_auc_difference(
    first: Path, second: Path, positive: int | None, resamples: int = 1000
) -> dict[str, Any]:
    """Test ROC-AUC of `first` minus `second`'s on the same images, with a 95% interval from
    a paired bootstrap (the same resampled images for both; percentile method, seed 0)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from distmed.metrics import resample_indices

    with np.load(first) as a, np.load(second) as b:
        labels, p, q = a["labels"], a["probs"], b["probs"]
        if not np.array_equal(labels, b["labels"]):
            raise SystemExit(f"{first} and {second} are not predictions of the same images")
    column = 1 if positive is None else positive
    truth = labels == column
    draws = []
    for picks in resample_indices(len(truth), resamples, seed=0):
        if truth[picks].all() or not truth[picks].any():
            continue
        draws.append(
            roc_auc_score(truth[picks], p[picks, column])
            - roc_auc_score(truth[picks], q[picks, column])
        )
    low, high = np.percentile(draws, [2.5, 97.5])
    diff = roc_auc_score(truth, p[:, column]) - roc_auc_score(truth, q[:, column])
    return {"value": float(diff), "ci95": [float(low), float(high)], "resamples": len(draws)}


def temperature_of(model_file: Path) -> float | None:
    from distmed.savedmodel import SavedModel

    fit = SavedModel.load(model_file).calibration
    return None if fit is None else fit.temperature


def side(
    out: Path, predictions: str, metrics: dict[str, Any] | None, model_file: Path
) -> dict[str, Any]:
    """One model's test metrics (temperature applied), their 95% bootstrap intervals and the
    ECE / Brier score without the temperature (the saved probabilities scaled back by 1/T)."""
    import numpy as np

    from distmed.calibration import apply_temperature
    from distmed.savedmodel import SavedModel

    saved = SavedModel.load(model_file)
    with np.load(out / predictions, allow_pickle=False) as data:
        labels, probs = data["labels"], data["probs"]
    fit = saved.calibration
    raw = probs if fit is None else apply_temperature(probs, 1 / fit.temperature)
    return {
        "test_metrics": metrics,
        "test_ci95": bootstrap_intervals(out, predictions),
        "ece_uncalibrated": saved.task.calibration_error(labels, raw),
        "brier_uncalibrated": saved.task.brier(labels, raw),
    }


def ensemble_table(result: dict[str, Any]) -> str:
    rows = []
    for label, key in (("refit on train + val", "refit"), ("fold ensemble", "folds")):
        side_ = result["models"][key]
        m, ci = side_["test_metrics"], side_["test_ci95"] or {}
        auc = f"{m['roc_auc']:.4f}"
        if "roc_auc" in ci:
            auc += f" ({ci['roc_auc'][0]:.3f}-{ci['roc_auc'][1]:.3f})"
        rows.append(
            [
                label,
                auc,
                f"{m['accuracy']:.4f}",
                f"{m['sensitivity']:.4f}",
                f"{m['specificity']:.4f}",
                f"{m['brier']:.4f}",
                f"{side_['ece_uncalibrated']:.4f} -> {m['ece']:.4f}",
            ]
        )
    headers = [
        "model",
        "test ROC-AUC (95% CI)",
        "accuracy",
        "sensitivity",
        "specificity",
        "Brier",
        f"ECE (raw -> T={result['temperature']:.2f})",
    ]
    diff = result["roc_auc_refit_minus_folds"]
    low, high = diff["ci95"]
    return markdown_table(headers, rows) + (
        f"\nrefit minus fold ensemble, test ROC-AUC: {diff['value']:+.4f} (95% paired bootstrap "
        f"CI {low:+.4f} to {high:+.4f}); wall time {result['wall_s']:.0f} s"
    )


# --------------------------------------------------------------------------- nested


def run_nested(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    """BreastMNIST with `--nested 3`; the outer scores beside the inner searches' best."""
    import json

    import yaml

    name = "breastmnist-nested"
    spec = merged(yaml.safe_load(SPACE.read_text()), DATASET_SETTINGS["breastmnist"])
    spec = merged(spec, NESTED_CHANGES)
    space = write_space(spec, args.workdir / f"space-{name}.yaml")
    extra = ("--nested", str(NESTED_OUTER))
    timing = run_tune(name, space, "breastmnist", args.workdir, args.resume, extra)
    nested = json.loads((args.workdir / "runs" / name / "nested.json").read_text())
    result = {
        "machine": machine,
        "dataset": "breastmnist",
        "space_used": space.read_text(),
        **timing,
        "nested": nested,
    }
    write_result("evaluation-nested", result)
    return result


def nested_table(result: dict[str, Any]) -> str:
    nested = result["nested"]
    rows = [
        [
            str(f["fold"] + 1),
            f"{f['num_train']} / {f['num_val']}",
            f"{f['inner_cv_roc_auc']:.4f}",
            f"{f['outer_metrics']['roc_auc']:.4f}",
            f"{f['outer_metrics']['accuracy']:.4f}",
            str(f["refit_epochs"]),
        ]
        for f in nested["folds"]
    ]
    rows.append(
        [
            "mean",
            "",
            f"{nested['mean_inner_cv_roc_auc']:.4f}",
            f"{nested['mean_outer_roc_auc']:.4f} ± {nested['std_outer_roc_auc']:.4f}",
            f"{nested['outer_metrics_mean']['accuracy']:.4f}",
            "",
        ]
    )
    headers = [
        "outer fold",
        "train / scored",
        "inner best CV ROC-AUC",
        "outer ROC-AUC",
        "outer accuracy",
        "refit epochs",
    ]
    return markdown_table(headers, rows) + f"\nwall time {result['wall_s']:.0f} s"


if __name__ == "__main__":
    raise SystemExit(main())
