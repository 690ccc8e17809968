"""Several findings per image on real pixels: a multi-label set built from MedMNIST tiles, read
through a CheXpert-style CSV, searched by the real `distmed.tune`.

    python -m benchmarks.multilabel               # build, search, policies (~20 min, 2 cores)
    python -m benchmarks.multilabel --build-only  # write the set and its manifest, nothing else

What runs: `distmed.tune` over `SPACE` (settings fixed here before any run; the official test
split is read once, by the refit of the CV-selected trial), then `distmed.train` cross-validates
the selected configuration once per uncertainty policy of `Pneumonia lower right` (ignore,
ones, zeros; same folds and seeds), so what each policy costs is measured on the same folds.
Results: `benchmarks/results/multilabel.json` (per-finding CV and test ROC-AUCs).

Why this is a fair multi-label task: the shared data holds two single-label MedMNIST sets
(BreastMNIST, PneumoniaMNIST; `../shared/data/PROVENANCE.md`). Every composite image is a 2x2
grid of 28 px tiles, 56 x 56 px grey: top-left one breast-ultrasound tile, the three other
quadrants one chest X-ray tile each. Its findings are the tiles' own published labels:
`Malignant` (top-left), `Pneumonia upper right`, `Pneumonia lower left`, `Pneumonia lower
right`. Every finding is therefore a real label of real pixels, learnable only from its own
region, with its own prevalence (about 27% malignant, chest about 74% pneumonia), and
the findings co-occur independently. No tile is used twice, and composites of the official test
split are made of official test tiles only, so no pixel of the test split is seen in CV.

Uncertain and missing labels as CheXpert writes them: in the CV pool, `Pneumonia lower right`
is written `-1` (uncertain) for a seeded 30% of images, whatever their truth, and
`Pneumonia lower left` is blank for 5%. The test split keeps every true label, so test ROC-AUCs
are exact. Random uncertainty is the case where U-Ones and U-Zeros inject label noise and
U-Ignore only loses images: what the policies cost is measured on the same search.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import REPO, machine_info, machine_line, read_npz, write_result
from benchmarks.medmnist import SHARED

FINDINGS = ("Malignant", "Pneumonia upper right", "Pneumonia lower left", "Pneumonia lower right")
UNCERTAIN_FINDING, UNCERTAIN_SHARE = "Pneumonia lower right", 0.30
MISSING_FINDING, MISSING_SHARE = "Pneumonia lower left", 0.05
TILE = 28
SEED = 0
POLICIES = ("ignore", "ones", "zeros")
# The search, fixed before the first run: ResNet-18 from random init (no download) at the
# composite's native 56 px, 3-fold CV, 5 epochs, 4 trials one at a time, TPE + ASHA.
SPACE: dict[str, Any] = {
    "base": {
        "data": {
            "image_size": 56,
            "task": "multilabel",
            "label_columns": list(FINDINGS),
            "uncertain": "ignore",
            "missing": "ignore",
            "augment": {"hflip": False, "vflip": False, "rotation": 0},  # quadrants have places
        },
        "model": {"arch": "resnet18", "weights": "none"},
        "optim": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 1.0e-4, "schedule": "cosine"},
        "train": {"batch_size": 64, "epochs": 5, "class_weights": "balanced"},
        "cv": {"folds": 3, "seed": 0},
        "scaling": {"num_workers": 1},
    },
    "search": {
        "metric": "cv_roc_auc",
        "mode": "max",
        "num_samples": 4,
        "seed": 0,
        "max_concurrent": 1,
        "algorithm": "tpe",
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
    },
    "space": {
        "optim.lr": {"loguniform": [3.0e-4, 1.0e-2]},
        "optim.weight_decay": {"loguniform": [1.0e-6, 1.0e-2]},
        "train.batch_size": {"choice": [32, 64]},
    },
}


def build(root: Path, seed: int = SEED) -> Path:
    """Write `root/images/<split>/<n>.png` and `root/findings.csv` (columns Path, split and one
    per finding, values 1/0/-1/blank); returns the CSV's path.

    Pool composites (split `train`) come from BreastMNIST's and PneumoniaMNIST's train + val
    tiles, test composites from their test tiles; one composite per breast tile.
    """
    breast, chest = read_npz(SHARED / "breastmnist.npz"), read_npz(SHARED / "pneumoniamnist.npz")
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    for split, parts in (("train", ("train", "val")), ("test", ("test",))):
        b_img, b_lab = _tiles(breast, parts)
        c_img, c_lab = _tiles(chest, parts)
        chest_order = rng.permutation(len(c_img))[: 3 * len(b_img)].reshape(-1, 3)
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for n, (b, (c1, c2, c3)) in enumerate(zip(range(len(b_img)), chest_order, strict=True)):
            grid = np.block([[b_img[b], c_img[c1]], [c_img[c2], c_img[c3]]])
            Image.fromarray(grid.astype(np.uint8), mode="L").save(folder / f"{n:05d}.png")
            # BreastMNIST's label 0 is malignant (PROVENANCE.md): the finding is its negation.
            truth = (1 - b_lab[b], c_lab[c1], c_lab[c2], c_lab[c3])
            rows.append(_row(f"images/{split}/{n:05d}.png", split, truth, rng))
    manifest = root / "findings.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["Path", "split", *FINDINGS])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _tiles(arrays: dict[str, np.ndarray], parts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) 0/1) of the named official splits, in order."""
    images = np.concatenate([arrays[f"{p}_images"] for p in parts])
    labels = np.concatenate([arrays[f"{p}_labels"].reshape(-1) for p in parts])
    return images, labels


def _row(path: str, split: str, truth: tuple[int, ...], rng: np.random.Generator) -> dict:
    """One manifest row: the true labels, with the pool's uncertain and missing entries drawn."""
    row = {"Path": path, "split": split}
    for finding, value in zip(FINDINGS, truth, strict=True):
        row[finding] = str(int(value))
    if split != "test":  # draws for every pool row, so the pattern does not depend on truth
        uncertain, missing = rng.random(2)
        if uncertain < UNCERTAIN_SHARE:
            row[UNCERTAIN_FINDING] = "-1"
        if missing < MISSING_SHARE:
            row[MISSING_FINDING] = ""
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "distmed-bench-multilabel",
        help="where the composite set and the searches are written (outside the repository)",
    )
    parser.add_argument("--build-only", action="store_true", help="write the set and stop")
    return parser.parse_args(argv)


def run(command: list[str], log: Path) -> float:
    """Run a distmed command (output to `log`); its wall seconds. Stops on failure."""
    print(f"[multilabel] {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{command[2]} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def findings_of(metrics: dict[str, Any]) -> dict[str, float | None]:
    """Each finding's ROC-AUC from a metrics record (`roc_auc/<finding>` keys, `Task` names)."""
    out = {}
    for finding in FINDINGS:
        out[finding] = _value(metrics.get(f"roc_auc/{finding}"))
    return out


def _trial_findings(run: Path, trial: str) -> dict[str, float | None]:
    """A trial's last report's `cv_roc_auc/<finding>` (fold means; Tune's result.json)."""
    (folder,) = run.glob(f"run_trial_{trial}_*")
    lines = (folder / "result.json").read_text().splitlines()
    last = json.loads(lines[-1])
    return {finding: last.get(f"cv_roc_auc/{finding}") for finding in FINDINGS}


def _value(score: Any) -> float | None:
    """A metric as a number: results files hold it bare or as {"value": ...}."""
    return score["value"] if isinstance(score, dict) else score


def search(workdir: Path, manifest: Path) -> dict[str, Any]:
    """The search and its refit: best CV mean, the test split's per-finding ROC-AUC."""
    import yaml

    space = workdir / "space.yaml"
    spec = json.loads(json.dumps(SPACE))
    spec["base"]["data"]["root"] = str(manifest)
    space.write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = workdir / "runs"
    if not (runs / "search" / "summary.json").is_file():  # a finished search is not rerun
        command = [sys.executable, "-m", "distmed.tune", "--space", str(space)]
        run([*command, "--storage", str(runs), "--name", "search"], workdir / "search.log")
    summary = json.loads((runs / "search" / "summary.json").read_text())
    best = summary["best_config"]
    (workdir / "best.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    test = summary.get("test_metrics") or {}
    return {
        "wall_s": summary.get("wall_time_s"),
        "trials_by_status": summary["trials_by_status"],
        "best_trial": summary["best_trial"],
        "best_params": {k: _get(best, k) for k in SPACE["space"]},
        "best_cv_roc_auc": summary["best_cv_roc_auc"],
        "best_cv_roc_auc_se": summary.get("best_cv_roc_auc_se"),
        "best_cv_roc_auc_per_finding": _trial_findings(runs / "search", summary["best_trial"]),
        "test_roc_auc_mean": _value(test.get("roc_auc")),
        "test_roc_auc": findings_of(test),
    }


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def policies(workdir: Path) -> dict[str, Any]:
    """The selected configuration cross-validated once per policy of the uncertain finding."""
    out = {}
    for policy in POLICIES:
        folder = workdir / f"policy-{policy}"
        command = [sys.executable, "-m", "distmed.train", "--config", str(workdir / "best.yaml")]
        setting = f"data.uncertain={{{UNCERTAIN_FINDING}: {policy}}}"
        wall = run([*command, "--output", str(folder), "--set", setting], workdir / f"{policy}.log")
        result = json.loads((folder / "cv_result.json").read_text())
        out[policy] = {
            "wall_s": round(wall, 1),
            "cv_roc_auc_mean": result["mean_roc_auc"],
            "cv_roc_auc_se": result["se_roc_auc"],
            "cv_roc_auc": findings_of(result["mean_metrics"]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = build(args.workdir / "composite")
    print(f"[multilabel] {manifest}")
    if args.build_only:
        return 0
    machine = machine_info()
    payload = {"settings": SPACE, "findings": FINDINGS, "machine": machine}
    payload["search"] = search(args.workdir, manifest)
    payload["policies"] = policies(args.workdir)
    path = write_result("multilabel", payload)
    print(f"[multilabel] {machine_line(machine)}: {path}")
    print(json.dumps({k: payload[k] for k in ("search", "policies")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
