"""Honest numbers with few positives (issue 30 item 6): a validation fold with fewer than 5
images of a class and a test split lacking a class are said before training and kept in
the results; the score line says what such folds are worth; the results are strict JSON.
No Ray: `prepare_data` runs on a small labels sheet built like case 29.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distmed import cv
from distmed.config import CVConfig, load_config
from distmed.cv import (
    MIN_VALIDATION_IMAGES,
    gaps_in_test_split,
    make_folds,
    score_caveat,
    thin_validation_folds,
)
from distmed.data import Split, scan_source
from distmed.summary import DataSummary, RunSummary
from distmed.task import task_for


def _imbalanced_sheet(root: Path, positives: int, test_positives: int = 0) -> Path:
    """Like case 29: patients of 3 images, `positives` positive images (one per patient) in
    the pool, a test split of 10 patients with `test_positives` positives."""
    root.mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    rng = np.random.default_rng(0)
    for patient in range(40):
        for k in range(3):
            positive = patient < positives and k == 0
            rows.append((f"p{patient:03d}_{k}.png", positive, f"p{patient:03d}", "train"))
    for patient in range(10):
        for k in range(2):
            positive = patient < test_positives and k == 0
            rows.append((f"t{patient:03d}_{k}.png", positive, f"t{patient:03d}", "test"))
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "split"])
        for name, positive, group, split in rows:
            pixels = rng.normal(90 + 60 * positive, 20, (12, 12)).clip(0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name)
            writer.writerow([name, "positive" if positive else "negative", group, split])
            n += 1
    return root / "labels.csv"


def _prepare(sheet: Path, tmp_path: Path, folds: int = 3):
    cfg = load_config(
        None,
        [f"data.root={sheet}", f"cv.folds={folds}", f"data.cache_dir={tmp_path / 'cache'}",
         "data.image_size=12"],
    )  # fmt: skip
    return cv.prepare_data(cfg, scan_source(cfg.data))


def test_one_positive_per_fold_is_warned_once_before_the_decode_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    sheet = _imbalanced_sheet(tmp_path / "case", positives=3)
    real_build = cv.build_cache
    said_before_decode = []

    def build(*args, **kwargs):
        said_before_decode.append([r.getMessage() for r in caplog.records])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(cv, "build_cache", build)
    with caplog.at_level(logging.WARNING, logger="distmed.cv"):
        prepared = _prepare(sheet, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "validation folds" in r.getMessage()]
    assert len(warnings) == 1  # once
    assert any("validation folds" in m for m in said_before_decode[0])
    assert "3 of 3 hold fewer than 5 images of class 'positive' (1, 1, 1)" in warnings[0]
    assert "negative" not in warnings[0].split("coin")[0]  # 39+ negatives per fold: fine
    assert prepared.thin_folds == warnings[0]
    test_said = [r.getMessage() for r in caplog.records if "test split" in r.getMessage()]
    assert len(test_said) == 1 and "no image of class 'positive'" in test_said[0]
    assert prepared.test_gaps == test_said[0]


def test_enough_images_per_fold_and_class_gives_no_warning(tmp_path: Path, caplog):
    sheet = _imbalanced_sheet(tmp_path / "case", positives=15, test_positives=5)
    with caplog.at_level(logging.WARNING, logger="distmed.cv"):
        prepared = _prepare(sheet, tmp_path)
    assert prepared.thin_folds is None and prepared.test_gaps is None
    assert not [r for r in caplog.records if "validation folds" in r.getMessage()]


@pytest.mark.parametrize(("per_class", "thin"), [(4, True), (5, False)])
def test_the_threshold_is_five_images_of_a_class_per_fold(per_class: int, thin: bool):
    folds = 3
    labels = np.array([0] * 60 + [1] * (per_class * folds))
    split = Split(ids=[str(i) for i in range(len(labels))], labels=labels)
    assignment = make_folds(split, CVConfig(folds=folds), task_for(["a", "b"]))
    warning = thin_validation_folds(labels, assignment, ["a", "b"], folds)
    assert (warning is not None) == thin
    assert MIN_VALIDATION_IMAGES == 5


def test_repeats_count_every_fold_of_every_repeat():
    labels = np.array([0] * 30 + [1] * 6)
    split = Split(ids=[str(i) for i in range(36)], labels=labels)
    assignment = make_folds(split, CVConfig(folds=3, repeats=2), task_for(["a", "b"]))
    warning = thin_validation_folds(labels, assignment, ["a", "b"], 3)
    assert warning is not None and "6 of 6 hold fewer than 5 images of class 'b'" in warning


def test_a_test_split_with_few_images_of_a_class_is_said(tmp_path: Path):
    from distmed.data import DataIndex

    pool = Split(ids=["a"], labels=np.array([0]))
    test = Split(ids=[str(i) for i in range(12)], labels=np.array([0] * 10 + [1] * 2))
    index = DataIndex("d", ["neg", "pos"], pool, test, "f")
    gaps = gaps_in_test_split(index)
    assert gaps is not None and "fewer than 5 images of 'pos' (2)" in gaps
    assert gaps_in_test_split(DataIndex("d", ["neg", "pos"], pool, None, "f")) is None


def test_the_score_line_says_what_thin_folds_and_undefined_folds_are_worth():
    assert score_caveat([0.7, 0.8, 0.75], None) is None
    thin = score_caveat([1.0, 0.0, 1.0], "validation folds: ...")
    assert thin is not None and "fewer than 5 images of a class" in thin
    undefined = score_caveat([1.0, math.nan, 1.0], None)
    assert undefined is not None and "only 2 of 3 folds have a defined ROC-AUC" in undefined


def test_a_fold_whose_model_predicts_one_value_for_every_image_is_said():
    """Constant predictions score ROC-AUC 0.5 by ties (seen: EfficientNet-B0 from random init
    without precise BN after one epoch), which reads like a chance-level ranking."""
    from distmed.cv import CVResult, FoldResult

    def fold(k: int, probs: list[list[float]]) -> FoldResult:
        metrics = {"roc_auc": 0.5}
        return FoldResult(k, 1, metrics, [], list(range(3)), [0, 1, 1], probs)

    same = [[0.4, 0.6]] * 3
    almost = [[0.4, 0.6], [0.4 + 1e-8, 0.6 - 1e-8], [0.4, 0.6]]  # float noise of one value
    ranked = [[0.4, 0.6], [0.3, 0.7], [0.45, 0.55]]
    result = CVResult([fold(0, same), fold(1, ranked), fold(2, almost)], "fp32", "cpu", 1)
    assert result.constant_folds == [0, 2]
    assert CVResult([fold(0, ranked)], "fp32", "cpu", 1).constant_folds == []
    caveat = score_caveat(result.fold_aucs, None, result.constant_folds)
    assert caveat is not None and "fold(s) 1, 3 gave every validation image the same" in caveat
    assert score_caveat(result.fold_aucs, None, []) is None


def test_summary_keeps_the_warnings_and_is_strict_json(tmp_path: Path):
    summary = RunSummary(
        name="case29",
        num_trials=1,
        trials_by_status={"completed": 1},
        data=DataSummary(
            name="d",
            classes=["negative", "positive"],
            num_images=200,
            thin_validation_folds="validation folds: 3 of 3 hold fewer than 5 ...",
            test_split_gaps="the test split (20 images) has no image of class 'positive' ...",
        ),
        best_trial="t1",
        best_cv_roc_auc=1.0,
        best_cv_roc_auc_se=0.0,
        best_fold_roc_auc=[1.0, 1.0, math.nan],
        test_metrics={"roc_auc": math.nan, "num_samples": 20, "sensitivity": math.nan},
    )
    summary.save(tmp_path / "summary.json")

    def refuse(token: str):
        raise ValueError(token)

    raw = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert raw["test_metrics"]["roc_auc"] is None and raw["best_fold_roc_auc"][2] is None
    assert raw["data"]["thin_validation_folds"].startswith("validation folds")
    loaded = RunSummary.load(tmp_path / "summary.json")
    assert math.isnan(loaded.test_metrics["roc_auc"])
    assert loaded.data.test_split_gaps == summary.data.test_split_gaps


def test_the_report_shows_the_warnings_escaped():
    from distmed.runreport import few_images_text

    data = DataSummary(
        name="d",
        classes=["<b>neg</b>", "pos"],
        num_images=10,
        thin_validation_folds="validation folds: 3 of 3 hold fewer than 5 images of class '<b>'",
    )
    text = few_images_text(data)
    assert "Caution:" in text and "3 of 3 hold fewer than 5" in text and "<b>'" not in text
    assert few_images_text(DataSummary(name="d", classes=["a", "b"], num_images=10)) == ""
