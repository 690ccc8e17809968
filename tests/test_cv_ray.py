"""End to end through Ray Train on real and demo data: the CLI learns what it should.

(2 DDP workers and exact validation despite DistributedSampler's padding: the 2-node
search in tests/test_faults_ray.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_npz

from distmed.train import main

pytestmark = pytest.mark.ray

TINY = [
    "--set", "model.weights=none",
    "--set", "train.amp=off",
    "--set", "scaling.max_failures=0",
]  # fmt: skip


def test_breastmnist_cross_validation_beats_chance(ray_session, tmp_path: Path):
    out = tmp_path / "breast"
    argv = ["--data", str(shared_npz("breastmnist.npz")), "--output", str(out), *TINY]
    argv += ["--set", "data.image_size=28", "--set", "cv.folds=2", "--set", "train.epochs=4"]
    argv += ["--set", "train.batch_size=32", "--set", "optim.lr=0.002", "--set", "train.amp=auto"]
    assert main(argv) == 0
    result = json.loads((out / "cv_result.json").read_text())
    assert len(result["folds"]) == 2
    assert result["data"]["num_images"] == 546 + 78  # train + val; test held back
    assert len(result["fold_assignment"]) == 546 + 78 and result["world_size"] == 1
    assert (out / "config.yaml").is_file()  # the resolved config, to run again
    assert result["mean_roc_auc"] > 0.65, result["mean_roc_auc"]
    assert result["wall_time_s"] > 0


def test_demo_config_is_learnable_but_not_trivial(ray_session, tmp_path: Path):
    demo = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
    # 2 folds instead of the config's 5 keep the suite fast; the epochs and model are the demo's.
    argv = ["--config", str(demo), "--output", str(tmp_path / "demo"), "--set", "cv.folds=2"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "demo" / "cv_result.json").read_text())
    assert result["data"]["classes"] == ["lesion", "normal"]
    assert 0.6 < result["mean_roc_auc"] < 0.99, result["mean_roc_auc"]


def test_multilabel_folds_train_through_ray_train(ray_session, tmp_path: Path):
    """Several findings per image (#32) through the Train worker: (N, L) targets with NaN
    (ignored uncertain labels) cross into Ray, each fold records every finding's AUC."""
    from test_multilabel_training import FINDINGS, generated_set

    from distmed.config import ExperimentConfig
    from distmed.cv import FoldPlan, cross_validate, fold_specs
    from distmed.resources import plan_workers
    from distmed.task import MultilabelTask

    images, raw = generated_set(112, seed=1)
    np.save(tmp_path / "pool.npy", images)
    task = MultilabelTask(FINDINGS)
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"weights": "none", "unfreeze": 1},
            "optim": {"lr": 0.003},
            "train": {"epochs": 2, "batch_size": 16, "amp": "off", "class_weights": "balanced"},
            "data": {"image_size": 16},
            "cv": {"folds": 2},
            "scaling": {"max_failures": 0},
        }
    )
    plan = FoldPlan(
        images_path=str(tmp_path / "pool.npy"),
        labels=task.targets(raw).tolist(),
        task=task,
        folds=fold_specs(np.arange(112) % 2, 2),
    )
    result = cross_validate(cfg, plan, plan_workers(cfg.scaling), tmp_path / "ray", "ml")
    means = result.mean_metrics()
    aucs = {name: means[f"roc_auc/{name}"] for name in FINDINGS}
    assert all(auc > 0.7 for auc in aucs.values()), aucs
    assert result.mean_roc_auc == pytest.approx(
        np.mean([f.metrics["roc_auc"] for f in result.folds])
    )
    oof_labels = np.concatenate([np.asarray(f.val_labels, dtype=float) for f in result.folds])
    assert np.isnan(oof_labels[:, 3]).sum() == np.isnan(task.targets(raw)[:, 3]).sum()
