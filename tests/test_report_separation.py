"""The report's search section flags a best trial that the runner-up cannot be told from."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from distmed import runreport as report
from distmed.results import TrialRow, write_trials_csv
from distmed.summary import DataSummary, RunSummary
from distmed.task import BinaryTask

FLAG = "The best trial is not separable from the runner-up"


def trial(trial_id: str, auc: float) -> TrialRow:
    return TrialRow(
        trial_id=trial_id,
        params={},
        status="stopped" if trial_id == "stopped" else "completed",
        cv_roc_auc=auc,
        cv_roc_auc_std=0.02,
        cv_roc_auc_se=0.01,
        fold_aucs=[auc] * 4,
        fold_epochs=[3] * 4,
        epochs_reported=3,
        time_s=5.0,
    )


def fake_run(tmp_path: Path, runner_up_auc: float) -> report.RunData:
    """A finished search of three trials as trials.csv and summary.json hold it."""
    rows = [trial("best", 0.90), trial("second", runner_up_auc), trial("stopped", 0.895)]
    write_trials_csv(tmp_path / "trials.csv", rows, [])
    with (tmp_path / "trials.csv").open(newline="") as handle:
        trials = list(csv.DictReader(handle))
    summary = RunSummary(
        name="exp",
        num_trials=3,
        trials_by_status={"completed": 2, "stopped": 1},
        data=DataSummary(name="tiny", classes=["neg", "pos"], num_images=40),
        best_trial="best",
        best_cv_roc_auc=0.90,
        best_cv_roc_auc_std=0.02,
        best_cv_roc_auc_se=0.01,
        runner_up_trial="second",
        best_fold_roc_auc=[0.9] * 4,
    )
    return report.RunData(
        run_dir=tmp_path,
        summary=summary,
        trials=trials,
        space_keys=[],
        model_path=tmp_path / "best_model.pt",
        task=BinaryTask(("neg", "pos")),
        detail=None,
        test=None,
    )


def test_overlapping_intervals_are_flagged_naming_both_trials(tmp_path: Path):
    # best [0.8804, 0.9196]; runner-up 0.88 -> [0.8604, 0.8996]: they overlap
    page = report.search_section(fake_run(tmp_path, 0.88), tmp_path)
    sentence = re.search(rf"{FLAG}.*?</p>", page, re.S)
    assert sentence is not None
    text = sentence.group(0)
    assert "trial best" in text and "trial second" in text
    assert "0.8804 – 0.9196" in text and "0.8604 – 0.8996" in text


def test_intervals_far_apart_are_not_flagged_and_the_se_is_shown(tmp_path: Path):
    page = report.search_section(fake_run(tmp_path, 0.80), tmp_path)  # [0.7804, 0.8196]
    assert FLAG not in page
    shown = dict(re.findall(r"data-key='([^']+)' data-value='([^']+)'", page))
    assert float(shown["best_cv_roc_auc_se"]) == pytest.approx(0.01)
    assert "Nadeau & Bengio" in page
