"""The benchmarks' bookkeeping: what counts as a result, warm-up exclusion, ratios, settings."""

from __future__ import annotations

import math

import pytest

from benchmarks.medmnist import best_so_far, merged, search_stats
from benchmarks.throughput import ratios, summarise_cv_result


def _trial(status: str, auc: float, seconds: float, epochs: int = 3) -> dict:
    return {"status": status, "cv_roc_auc": auc, "time_s": seconds, "epochs": epochs}


def test_best_so_far_counts_completed_trials_only():
    trials = [
        _trial("stopped", 0.99, 10.0, 1),  # a score after 1 epoch is not a result
        _trial("completed", 0.80, 30.0),
        _trial("errored", math.nan, 5.0, 0),
        _trial("completed", 0.85, 30.0),
    ]
    curve = best_so_far(trials)
    assert [p["best"] for p in curve] == [-math.inf, 0.80, 0.80, 0.85]
    assert [p["time_s"] for p in curve] == [10.0, 40.0, 45.0, 75.0]
    stats = search_stats({"trials": trials, "best_cv_roc_auc": 0.85})
    assert stats["fraction_stopped_early"] == 0.25
    assert stats["trials_per_hour"] == pytest.approx(4 / (75 / 3600), abs=0.1)
    assert stats["epochs_trained"] == 7


def test_dataset_settings_merge_into_nested_sections_without_dropping_keys():
    base = {"base": {"train": {"epochs": 3, "batch_size": 64}}, "search": {"seed": 0}}
    out = merged(base, {"base": {"train": {"epochs": 15}}})
    assert out == {"base": {"train": {"epochs": 15, "batch_size": 64}}, "search": {"seed": 0}}
    assert base["base"]["train"]["epochs"] == 3  # the shipped file's values are not mutated


def test_ray_rate_leaves_out_the_first_fold_epoch_and_ratios_use_one_cell():
    history = [
        [{"epoch": 1, "train_images_per_s": 10.0}, {"epoch": 2, "train_images_per_s": 40.0}],
        [{"epoch": 1, "train_images_per_s": 38.0}, {"epoch": 2, "train_images_per_s": 42.0}],
    ]
    result = {
        "folds": [{"history": h} for h in history],
        "precision": "off",
        "channels_last": True,
        "world_size": 1,
        "peak_rss_mib": 900.0,
        "wall_time_s": 60.0,
    }
    summary = summarise_cv_result(result)
    assert summary["images_per_s"] == 40.0  # median of 40, 38, 42: the 10 is warm-up
    assert summary["warmup_epoch_images_per_s"] == [10.0]
    cell = {"ray": summary, "plain": {"images_per_s": 50.0}, "imagefolder": {"images_per_s": 20.0}}
    got = ratios(cell)
    assert got["distmed_over_imagefolder"] == pytest.approx(2.0)
    assert got["ray_overhead"] == pytest.approx(0.2)
