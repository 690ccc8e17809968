"""Multi-label training without Ray (#32): (N, L) targets through loop.py's loaders, loss and
validation; per-finding AUCs in the fold history, the CV result and the out-of-fold file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distmed import loop as fold_loop
from distmed.config import ExperimentConfig
from distmed.cv import _to_cv_result, thin_validation_folds
from distmed.loop import Runtime, run_fold_epoch
from distmed.losses import MaskedBCEWithLogits
from distmed.results import oof_predictions, read_trial_detail, write_trial_detail
from distmed.task import MultilabelTask, finding_auc_key

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Edema")
CPU = Runtime(torch.device("cpu"))


def generated_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (n, 3, 16, 16), raw codes (n, 4)): findings 0-2 brighten their own
    colour channel, finding 3 (Edema) darkens the whole image and is uncertain (-1) on half
    of its images. Image-wide features: what a pooled backbone sees at once."""
    rng = np.random.default_rng(seed)
    present = rng.random((n, 4)) < 0.45
    images = rng.integers(60, 100, (n, 3, 16, 16)).astype(np.float32)
    for j in range(3):
        images[present[:, j], j] += 150
    images[present[:, 3]] *= 0.4
    raw = present.astype(np.float32)
    raw[rng.random(n) < 0.5, 3] = -1.0
    return images.astype(np.uint8), raw


def test_each_finding_is_learned_from_its_own_feature():
    images, raw = generated_set(112)
    task = MultilabelTask(FINDINGS)  # uncertain and missing: ignore
    targets = task.targets(raw)
    assert np.isnan(targets[:, 3]).mean() > 0.4
    cfg = ExperimentConfig.model_validate(
        {
            # Head and last stage only: the suite runs on 2 shared cores.
            "model": {"weights": "none", "unfreeze": 1},
            "optim": {"lr": 0.003},
            "train": {"epochs": 2, "batch_size": 16, "amp": "off", "class_weights": "balanced"},
            "data": {"image_size": 16},
        }
    )
    data = fold_loop.FoldData(0, list(range(64)), list(range(64, 112)), images, targets, task)
    fold = fold_loop.build_fold(data, cfg, CPU, batch_size=16)
    assert isinstance(fold.loss_fn, MaskedBCEWithLogits)
    expected_weight = task.class_weights(targets[:64])
    torch.testing.assert_close(fold.loss_fn.pos_weight, torch.tensor(expected_weight))
    for epoch in range(cfg.train.epochs):
        run_fold_epoch(fold, epoch, cfg, CPU)
    last = fold.history[-1]
    aucs = {name: last[f"val_{finding_auc_key(name)}"] for name in FINDINGS}
    assert all(auc > 0.75 for auc in aucs.values()), aucs  # chance is 0.5
    assert last["val_roc_auc"] == pytest.approx(np.mean(list(aucs.values())))
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["val_loss"])
    # The out-of-fold predictions: (48, 4) probabilities, targets with Edema's NaNs kept.
    saved = fold.predictions()
    probs, labels = np.asarray(saved["val_probs"]), np.asarray(saved["val_labels"])
    assert probs.shape == (48, 4) and ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_array_equal(np.isnan(labels), np.isnan(targets[64:]))


def test_per_finding_aucs_reach_the_cv_result_and_the_oof_file(tmp_path):
    task = MultilabelTask(("a", "b"))
    labels = [[1.0, math.nan], [0.0, 1.0], [1.0, 0.0]]
    probs = [[0.9, 0.2], [0.1, 0.8], [0.7, 0.3]]
    history = [
        {
            "epoch": 2,
            "val_loss": 0.3,
            "val_num_samples": 3,
            **{f"val_{k}": 0.5 for k in task.metric_keys},
            "val_roc_auc/a": 0.9,
        }
    ]
    folds = [{"history": history, "val_indices": [0, 1, 2], "val_labels": labels,
              "val_probs": probs}]  # fmt: skip
    result = _to_cv_result(
        {
            "folds": folds,
            "precision": "off",
            "device": "cpu",
            "world_size": 1,
            "channels_last": False,
            "peak_rss_mib": 1.0,
        },  # fmt: skip
        None,
        None,
    )
    assert result.folds[0].metrics["roc_auc/a"] == 0.9
    assert result.mean_metrics()["roc_auc/b"] == 0.5
    write_trial_detail(str(tmp_path), folds)  # strict JSON: NaN is written as null
    got_labels, got_probs = oof_predictions(read_trial_detail(str(tmp_path)))
    np.testing.assert_array_equal(got_labels, np.asarray(labels))
    assert got_labels.dtype == np.float64 and got_probs.shape == (3, 2)


def test_thin_validation_folds_counts_each_findings_positives():
    key = np.zeros((30, 2), dtype=np.int8)
    key[:15, 0] = 1
    key[:4, 1] = 1  # 4 positives over 3 folds: some fold holds fewer than 5
    assignment = np.tile([0, 1, 2], 10)[None]
    warning = thin_validation_folds(key, assignment, ["common", "rare"], 3)
    assert warning is not None and "'rare'" in warning and "'common'" not in warning


def test_the_cv_line_names_every_findings_auc_and_the_unscored():
    from distmed.cv import finding_auc_text

    task = MultilabelTask(("a", "b"), scored=("a",))
    text = finding_auc_text(task, {"roc_auc/a": 0.81234, "roc_auc/b": 0.6})
    assert text == (
        "the CV ROC-AUC is the mean over 1 scored finding(s); per finding: "
        "'a' 0.8123, 'b' 0.6000 (not scored)"
    )


def test_the_fold_plan_of_a_multilabel_pool_carries_its_targets(tmp_path):
    """`task_of_index` builds the task from the index (`DataIndex.multilabel`) and the
    config's policies; the plan's labels are its targets (NaN where ignored)."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from distmed.cv import plan_folds
    from distmed.data import DataIndex, Split
    from distmed.task import task_of_index

    @dataclass(frozen=True)
    class MultilabelIndex(DataIndex):  # the data reading's index field (issue #32, M1)
        multilabel: bool = True

    _, raw = generated_set(40, seed=2)
    pool = Split(ids=[f"i{k}" for k in range(40)], labels=raw)
    index = MultilabelIndex("gen", list(FINDINGS), pool, None, "fp")
    cfg = ExperimentConfig.model_validate({"cv": {"folds": 2}})
    task = task_of_index(index, cfg.data, cfg.cv.folds)
    assert isinstance(task, MultilabelTask) and task.class_names == FINDINGS
    plan = plan_folds(cfg, index, SimpleNamespace(pool_path=tmp_path / "p.npy"),
                      np.arange(40)[None] % 2)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(plan.labels), task.targets(raw))
    assert plan.task == task and len(plan.folds) == 2


def test_a_test_split_without_positives_of_a_finding_is_said():
    from dataclasses import dataclass

    from distmed.cv import gaps_in_test_split
    from distmed.data import DataIndex, Split

    @dataclass(frozen=True)
    class MultilabelIndex(DataIndex):  # the data reading's index field (issue #32, M1)
        multilabel: bool = True

    raw = np.zeros((12, 2), dtype=np.float32)
    raw[:, 0] = 1
    raw[:6, 1] = -1  # Effusion: six uncertain, no positive unless uncertain counts as one
    test = Split(ids=[f"t{k}" for k in range(12)], labels=raw)
    index = MultilabelIndex("gen", ["Atelectasis", "Effusion"], test, test, "fp")
    ignored = gaps_in_test_split(index, MultilabelTask(("Atelectasis", "Effusion")))
    assert ignored is not None and "'Effusion'" in ignored and "'Atelectasis'" not in ignored
    ones = MultilabelTask(("Atelectasis", "Effusion"), uncertain=("ignore", "ones"))
    assert gaps_in_test_split(index, ones) is None


def test_balanced_sampling_of_several_findings_stops_before_any_decode():
    """`train.sampler: balanced` weights one class per image: a multi-label pool is refused
    in one line by `prepare_data`, before the cache is built or Ray starts."""
    from distmed.cv import prepare_data
    from distmed.data import DataIndex, Split
    from distmed.errors import UserError

    _, raw = generated_set(20, seed=3)
    pool = Split(ids=[f"i{k}" for k in range(20)], labels=raw)
    index = DataIndex("gen", list(FINDINGS), pool, None, "fp", multilabel=True)
    cfg = ExperimentConfig.model_validate({"cv": {"folds": 2}, "train": {"sampler": "balanced"}})
    with pytest.raises(UserError, match="train.sampler: balanced.*several findings"):
        prepare_data(cfg, index)
