"""Nested cross-validation's index arithmetic and bookkeeping (the Ray run is in
test_tune_ray): outer validation images never reach an inner search, patients stay whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distmed import tune
from distmed.cv import FoldPlan, PreparedData
from distmed.data import DataIndex, Split
from distmed.errors import UserError
from distmed.metrics import METRIC_NAMES
from distmed.nested import (
    NestedSummary,
    OuterFold,
    finish,
    format_nested,
    inner_plan,
    outer_assignment,
)
from distmed.space import SearchSpaceFile, load_space
from distmed.task import BinaryTask


def _prepared(groups: bool, tmp_path: Path) -> tuple[PreparedData, SearchSpaceFile]:
    labels = np.array([0, 1] * 30)
    patients = np.repeat(np.arange(20), 3) if groups else None
    pool = Split(ids=[f"img{i}" for i in range(60)], labels=labels, groups=patients)
    index = DataIndex("toy", ["neg", "pos"], pool, None, fingerprint="x")
    plan = FoldPlan("images.npy", labels.tolist(), BinaryTask(("neg", "pos")), folds=[])
    prepared = PreparedData(index, cache=None, assignment=np.zeros(60), plan=plan)  # type: ignore[arg-type]
    path = tmp_path / "space.yaml"
    path.write_text(
        "base: {data: {root: x}, cv: {folds: 3}}\nsearch: {num_samples: 1}\n"
        "space: {optim.lr: {loguniform: [0.0001, 0.01]}}\n"
    )
    return prepared, load_space(str(path), [])


@pytest.mark.parametrize("groups", [False, True])
def test_inner_folds_never_see_the_outer_validation_part(groups: bool, tmp_path: Path):
    prepared, spec = _prepared(groups, tmp_path)
    outer = outer_assignment(prepared, 2, spec)
    pool = prepared.index.pool
    for k in (0, 1):
        train_idx, val_idx = np.flatnonzero(outer != k), np.flatnonzero(outer == k)
        plan = inner_plan(prepared.plan, train_idx, prepared, spec)
        assert len(plan.folds) == 3
        for fold in plan.folds:
            used = set(fold["train"]) | set(fold["val"])
            assert used == set(train_idx.tolist())  # exactly the outer training part
            assert not used & set(val_idx.tolist())
            if groups:  # a patient sits on one side of every split, inner and outer
                assert pool.groups is not None
                inner_train = set(pool.groups[fold["train"]])
                assert not inner_train & set(pool.groups[fold["val"]])
                assert not set(pool.groups[train_idx]) & set(pool.groups[val_idx])
        assert plan.labels == prepared.plan.labels  # the pool's labels, indexed by position


def test_too_many_outer_folds_for_the_data_name_the_option(tmp_path: Path):
    prepared, spec = _prepared(True, tmp_path)
    with pytest.raises(UserError, match="--nested 25") as info:
        outer_assignment(prepared, 25, spec)
    assert "cv.folds" not in str(info.value)  # the option to lower is --nested


def test_the_nested_estimate_is_the_mean_of_the_outer_scores():
    folds = [
        OuterFold(
            fold=k,
            num_train=40,
            num_val=20,
            best_trial=f"t{k}",
            inner_cv_roc_auc=0.9,
            params={"optim.lr": 0.01},
            refit_epochs=3,
            outer_metrics={name: value for name in METRIC_NAMES},
        )
        for k, value in enumerate((0.7, 0.8))
    ]
    summary = finish(
        NestedSummary(name="n", outer_folds=2, inner_folds=3, trials_per_search=4, folds=folds),
        12.0,
    )
    assert summary.mean_outer_roc_auc == pytest.approx(0.75)
    assert summary.std_outer_roc_auc == pytest.approx(0.05)
    assert summary.mean_inner_cv_roc_auc == pytest.approx(0.9)
    assert summary.outer_metrics_mean is not None
    assert summary.outer_metrics_mean["accuracy"] == pytest.approx(0.75)
    table = format_nested(summary, Path("nested.json"))
    assert [line.split()[0] for line in table.splitlines()[1:3]] == ["1", "2"]  # as printed
    assert "above the outer score: the optimism" in table  # inner 0.9 > outer 0.75
    below = summary.model_copy(update={"mean_inner_cv_roc_auc": 0.7})
    assert "not above the outer score" in format_nested(below, Path("nested.json"))


@pytest.mark.parametrize("value", ["1", "21"])
def test_nested_outside_2_to_20_is_one_line(value: str, tmp_path: Path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(
        "base: {data: {root: x}}\nsearch: {num_samples: 1}\n"
        "space: {optim.lr: {loguniform: [0.0001, 0.01]}}\n"
    )
    assert tune.main(["--space", str(space), "--nested", value]) == 2
    assert f"--nested: '{value}': use a whole number from 2 to 20" in capsys.readouterr().err


def test_too_many_outer_folds_leave_the_name_free(tmp_path: Path, capsys):
    from conftest import write_image_folder

    from distmed.searchfile import SEARCH_FILE

    data = write_image_folder(tmp_path / "data", {"neg": 4, "pos": 4})
    space = tmp_path / "space.yaml"
    space.write_text(
        f"base: {{data: {{root: '{data}'}}, model: {{weights: none}}, cv: {{folds: 2}},\n"
        "  train: {batch_size: 2}}\n"
        "search: {num_samples: 1}\nspace: {optim.lr: {loguniform: [0.0001, 0.01]}}\n"
    )
    argv = ["--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "n"]
    assert tune.main([*argv, "--nested", "10"]) == 2
    assert "lower --nested" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "n" / SEARCH_FILE).exists()  # refused before any record
