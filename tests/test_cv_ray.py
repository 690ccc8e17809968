"""End to end through Ray Train: the CLI with 2 DDP workers, exact validation, real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_npz, write_image_folder
from torch.utils.data import DataLoader

from distmed.config import ExperimentConfig
from distmed.data import CachedImageDataset, build_cache, scan_source
from distmed.loop import Runtime, predict
from distmed.metrics import classification_metrics
from distmed.model import build_model
from distmed.train import main
from distmed.worker import STATE_FILE

pytestmark = pytest.mark.ray

TINY = [
    "--set", "model.weights=none",
    "--set", "train.amp=off",
    "--set", "scaling.max_failures=0",
]  # fmt: skip


def test_two_workers_match_one_process_on_odd_validation_sets(ray_session, tmp_path: Path, capsys):
    # 2 folds of 25 images: validation sets of 12 and 13, so DistributedSampler pads one.
    data = write_image_folder(tmp_path / "data", {"neg": 12, "pos": 13}, size=16)
    out = tmp_path / "run"
    argv = ["--data", str(data), "--workers", "2", "--output", str(out), *TINY]
    argv += ["--set", "data.image_size=16", "--set", "cv.folds=2", "--set", "train.epochs=2"]
    argv += ["--set", "train.batch_size=4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "CV ROC-AUC" in printed and "fold" in printed

    result = json.loads((out / "cv_result.json").read_text())
    assert result["world_size"] == 2
    assert len(result["fold_assignment"]) == 25
    assert (out / "config.yaml").is_file()
    cfg = ExperimentConfig.model_validate(result["config"])
    assert cfg.scaling.num_workers == 2

    [state_file] = list((out / "ray").glob(f"cv-*/checkpoint_*/{STATE_FILE}"))
    state = torch.load(state_file, weights_only=True)
    index = scan_source(cfg.data)
    images = np.load(build_cache(index, cfg.data).pool_path)
    folds = np.array([row["fold"] for row in result["fold_assignment"]])
    val_sizes = sorted(int((folds == k).sum()) for k in range(2))
    assert val_sizes == [12, 13]
    for k, fold_result in enumerate(result["folds"]):
        model = build_model(cfg.model, 2)
        model.load_state_dict(state["folds"][k]["model"])
        val_idx = np.flatnonzero(folds == k)
        loader = DataLoader(CachedImageDataset(images, index.pool.labels, val_idx), batch_size=5)
        indices, labels, probs = predict(model, loader, Runtime(torch.device("cpu")))
        assert indices.tolist() == val_idx.tolist()
        expected = classification_metrics(labels, probs, positive=1)
        assert fold_result["num_samples"] == len(val_idx)
        for name, value in expected.items():
            assert fold_result[name] == pytest.approx(value, abs=1e-6), name


def test_breastmnist_cross_validation_beats_chance(ray_session, tmp_path: Path):
    out = tmp_path / "breast"
    argv = ["--data", str(shared_npz("breastmnist.npz")), "--output", str(out), *TINY]
    argv += ["--set", "data.image_size=28", "--set", "cv.folds=2", "--set", "train.epochs=4"]
    argv += ["--set", "train.batch_size=32", "--set", "optim.lr=0.002", "--set", "train.amp=auto"]
    assert main(argv) == 0
    result = json.loads((out / "cv_result.json").read_text())
    assert len(result["folds"]) == 2
    assert result["data"]["num_images"] == 546 + 78  # train + val; test held back
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
