"""cv.repeats end to end without Ray: prepare_data's plan, CVResult, distmed.train's output."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder

from distmed.config import load_config
from distmed.cv import CVResult, FoldResult, prepare_data
from distmed.cvstats import corrected_standard_error
from distmed.data import scan_source
from distmed.metrics import METRIC_NAMES
from distmed.train import format_fold_table, write_cv_result


def test_prepare_data_plans_r_times_k_folds_and_says_what_it_costs(tmp_path: Path, caplog):
    root = write_image_folder(tmp_path / "data", {"no": 6, "yes": 6}, size=8)
    settings = [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=8"]
    settings += ["data.decode_workers=1", "cv.folds=3", "train.batch_size=2"]
    cfg = load_config(None, [*settings, "cv.repeats=2"])
    with caplog.at_level(logging.INFO, logger="distmed.cv"):
        prepared = prepare_data(cfg, scan_source(cfg.data))
    assert prepared.assignment.shape == (2, 12)
    assert len(prepared.plan.folds) == 6 and prepared.plan.folds_per_repeat == 3
    [line] = [r.getMessage() for r in caplog.records if "cv.repeats" in r.getMessage()]
    assert "2 x 3 = 6 folds" in line and "2 times the compute" in line

    caplog.clear()
    single = load_config(None, settings)
    with caplog.at_level(logging.INFO, logger="distmed.cv"):
        one = prepare_data(single, scan_source(single.data))
    assert not [r for r in caplog.records if "cv.repeats" in r.getMessage()]
    assert one.plan.folds == prepared.plan.folds[:3]  # repeat 0 is the one-repeat plan


def _result(aucs: list[float], folds_per_repeat: int) -> CVResult:
    folds = []
    for k, auc in enumerate(aucs):
        metrics = {name: 0.5 for name in METRIC_NAMES} | {"roc_auc": auc}
        history = [{"epoch": 2, "val_roc_auc": auc}]
        folds.append(FoldResult(k, 2, metrics, history, val_indices=[k % 2]))
    return CVResult(folds, "off", "cpu", 1, folds_per_repeat=folds_per_repeat)


def test_cv_result_scores_all_repeated_folds_with_the_corrected_se():
    aucs = [0.6, 0.8, 0.7, 0.9]
    result = _result(aucs, folds_per_repeat=2)
    assert result.repeats == 2
    assert result.mean_roc_auc == pytest.approx(0.75)
    assert result.se_roc_auc == pytest.approx(math.sqrt(1.25 * 0.05 / 3))
    assert result.se_roc_auc == corrected_standard_error(aucs, 2)
    lines = format_fold_table(result).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["1.1", "1.2", "2.1", "2.2", "mean"]


def test_cv_result_json_keeps_every_repeats_folds_and_the_se(tmp_path: Path):
    from distmed.data import DataIndex, Split

    pool = Split(ids=["a", "b", "c", "d"], labels=np.array([0, 1, 0, 1]))
    index = DataIndex("tiny", ["neg", "pos"], pool, None, "f")
    assignment = np.array([[0, 0, 1, 1], [1, 0, 0, 1]])
    result = _result([0.6, 0.8, 0.7, 0.9], folds_per_repeat=2)
    cfg = load_config(None, ["cv.folds=2", "cv.repeats=2"])
    path = tmp_path / "cv_result.json"
    write_cv_result(path, cfg, index, assignment, result, 1.0)
    saved = json.loads(path.read_text())
    assert saved["se_roc_auc"] == pytest.approx(result.se_roc_auc)
    assert saved["repeats"] == 2
    assert [f["repeat"] for f in saved["folds"]] == [0, 0, 1, 1]
    first = saved["fold_assignment"][0]
    assert first == {"id": "a", "label": 0, "fold": 0, "folds_by_repeat": [0, 1]}

    # one repeat: the file reads as before (a fold number per sample, no per-repeat list)
    write_cv_result(path, load_config(None), index, assignment[:1], _result([0.6, 0.8], 2), 1.0)
    saved = json.loads(path.read_text())
    assert saved["fold_assignment"][2] == {"id": "c", "label": 0, "fold": 1}
    assert saved["repeats"] == 1
