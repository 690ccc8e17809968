"""The training recipe's defining properties (no Ray): mixup/cutmix targets, label smoothing,
focal loss, EMA of the weights, layer-wise lr decay, gradient accumulation, torch.compile's
wrapper, and the per-row input normalisation recorded in the saved model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assembled_fold, built_fold, saved_record, two_class_images
from torch import nn
from torch.utils.data import DataLoader

from distmed import model as model_module
from distmed.config import ExperimentConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from distmed.data import CachedImageDataset
from distmed.errors import UserError
from distmed.inference import build_network, input_stats, load_inference_model
from distmed.loop import (
    FoldRun,
    Runtime,
    accumulation_plan,
    build_loss,
    evaluate,
    param_groups,
    train_one_epoch,
    train_step,
    unwrap,
)
from distmed.losses import BatchMixer, LossSpec, SigmoidLoss, SoftmaxLoss
from distmed.model import ARCHS, IMAGENET_MEAN, IMAGENET_STD, build_model, input_normalization
from distmed.task import BinaryTask, MulticlassTask

TWO = BinaryTask(("negative", "positive"), 1)
THREE = MulticlassTask(("a", "b", "c"))
CPU = Runtime(torch.device("cpu"))


# --------------------------------------------------------------------------- mixup / cutmix


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_mixed_targets_are_distributions_of_the_batch_labels(mixup, cutmix):
    torch.manual_seed(0)
    inputs, labels = torch.randn(8, 3, 12, 12), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixer = BatchMixer(mixup, cutmix, num_classes=3)
    for _ in range(5):
        mixed, targets = mixer(inputs, labels)
        assert mixed.shape == inputs.shape and targets.shape == (8, 3)
        assert torch.allclose(targets.sum(dim=1), torch.ones(8))
        assert (targets >= 0).all()
        # each row mixes only its own label and its partner's (the image before it)
        own, partner = F.one_hot(labels, 3).bool(), F.one_hot(labels.roll(1), 3).bool()
        assert (targets[~(own | partner)] == 0).all()


def test_mixing_multi_label_targets_mixes_each_output():
    # (N, L) 0/1 labels, as a multi-label task has: each output's target is a mixed share
    torch.manual_seed(2)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mixed, targets = BatchMixer(0.4, 0.0, num_classes=3)(torch.randn(4, 3, 8, 8), labels)
    lam = float(targets[1, 1])  # row 1 (only output 1) mixed with row 0 (outputs 0, 2)
    assert torch.allclose(targets, lam * labels + (1 - lam) * labels.roll(1, 0))


def test_mixup_mixes_images_with_the_targets_lambda():
    torch.manual_seed(1)
    inputs, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1])
    mixed, targets = BatchMixer(0.4, 0.0, num_classes=2)(inputs, labels)
    lam = float(targets[0, 0])  # image 0 (class 0) mixed with image 5 (class 1)
    assert torch.allclose(mixed, lam * inputs + (1 - lam) * inputs.roll(1, 0), atol=1e-6)


# --------------------------------------------------------------------------- losses


def test_label_smoothing_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 1])
    eps, k = 0.1, 3
    loss = build_loss(TrainConfig(label_smoothing=eps), labels.numpy(), THREE, "cpu")
    log_p = torch.log_softmax(logits, dim=1)
    target = F.one_hot(labels, k).float() * (1 - eps) + eps / k
    by_hand = float(-(target * log_p).sum(dim=1).mean())
    assert loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)
    # the same with focal loss at gamma 0 (its own code path)
    focal = build_loss(
        TrainConfig(label_smoothing=eps, loss="focal", focal_gamma=0.0),
        labels.numpy(),
        THREE,
        "cpu",
    )
    assert focal(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)


def test_focal_loss_at_gamma_zero_is_cross_entropy_hard_and_soft_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 4), torch.randint(0, 4, (10,))
    focal = SoftmaxLoss(None, LossSpec(focal_gamma=0.0))
    assert focal(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    soft = torch.softmax(torch.randn(10, 4), dim=1)
    assert focal(logits, soft).item() == pytest.approx(F.cross_entropy(logits, soft).item())


def test_focal_loss_matches_kornias_multiclass_focal_loss():
    kornia = pytest.importorskip("kornia")
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 3), torch.randint(0, 3, (10,))
    weight = torch.tensor([0.5, 1.0, 2.0])
    ours = SoftmaxLoss(weight, LossSpec(focal_gamma=2.0))(logits, labels)
    theirs = kornia.losses.focal_loss(logits, labels, alpha=None, gamma=2.0, weight=weight)
    assert ours.item() == pytest.approx(theirs.sum(dim=1).mean().item(), rel=1e-5)
    # it down-weighs the easy examples: below cross-entropy for gamma > 0
    plain = SoftmaxLoss(weight, LossSpec(focal_gamma=0.0))(logits, labels)
    assert ours.item() < plain.item()


def test_sigmoid_focal_loss_at_gamma_zero_is_binary_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 5), torch.randint(0, 2, (6, 5)).float()
    bce = F.binary_cross_entropy_with_logits(logits, target).item()
    assert SigmoidLoss(LossSpec(focal_gamma=0.0))(logits, target).item() == pytest.approx(bce)
    assert SigmoidLoss()(logits, target).item() == pytest.approx(bce)


# --------------------------------------------------------------------------- folds


def test_ema_after_one_step_is_the_formula_and_is_what_is_validated_and_saved():
    decay = 0.9
    cfg = ExperimentConfig.model_validate(
        {"model": {"weights": "none"}, "train": {"ema_decay": decay}, "data": {"augment": {}}}
    )
    fold = built_fold(cfg)
    assert fold.ema is not None
    before = {k: v.clone() for k, v in unwrap(fold.model).state_dict().items()}
    images, labels, _ = next(iter(fold.train_loader))
    train_step(fold, images, labels, CPU)
    after = unwrap(fold.model).state_dict()
    ema = fold.ema.module.state_dict()
    moved = 0
    for key, value in after.items():
        if not value.is_floating_point():
            continue
        expected = decay * before[key] + (1 - decay) * value
        assert torch.allclose(ema[key], expected, atol=1e-6), key
        moved += int(not torch.equal(value, before[key]))
    assert moved > 0  # the step changed weights and BatchNorm statistics
    assert "bn1.running_mean" in ema  # buffers are averaged too (use_buffers)

    state = fold.state_dict()
    assert all(torch.equal(state["model"][k], v) for k, v in ema.items())
    assert evaluate(fold, CPU) is not None and fold.eval_model is fold.ema.module
    # a resumed fold gets both back
    other = built_fold(cfg)
    other.load_state_dict(state)
    assert all(torch.equal(other.ema.module.state_dict()[k], v) for k, v in ema.items())
    assert int(other.ema.n_averaged) == int(fold.ema.n_averaged) == 2


def test_layer_wise_lr_decay_gives_each_stage_its_lr():
    model = build_model(ModelConfig(weights="none"), 2)
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, trained, OptimConfig(lr=0.1, layer_decay=0.5))
    lrs = {g["stage"]: g["lr"] for g in groups}
    assert lrs == pytest.approx(
        {
            "head": 0.1,
            "layer4": 0.05,
            "layer3": 0.025,
            "layer2": 0.0125,
            "layer1": 0.00625,
            "stem": 0.003125,
        }
    )
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.fc.parameters()}
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in trained)  # each exactly once
    # frozen stages get no group; decay 1 is today's single group
    frozen = build_model(ModelConfig(weights="none", unfreeze=2), 2)
    trained = [p for p in frozen.parameters() if p.requires_grad]
    stages = [g["stage"] for g in param_groups(frozen, trained, OptimConfig(layer_decay=0.5))]
    assert stages == ["head", "layer4", "layer3"]
    assert len(param_groups(frozen, trained, OptimConfig())) == 1


def test_layer_decay_reaches_the_optimizer_through_build_fold():
    cfg = ExperimentConfig.model_validate(
        {"model": {"weights": "none"}, "optim": {"lr": 0.01, "layer_decay": 0.5}}
    )
    fold = built_fold(cfg)
    initial = sorted(g["initial_lr"] for g in fold.optimizer.param_groups)
    assert initial == pytest.approx([0.01 * 0.5**k for k in range(5, -1, -1)])


def test_accumulation_plan_weighs_each_step_by_its_batches():
    assert accumulation_plan(5, 2) == [
        (0.5, False),
        (0.5, True),
        (0.5, False),
        (0.5, True),
        (1.0, True),
    ]
    assert accumulation_plan(3, 1) == [(1.0, True)] * 3


def _plain_fold(batch_size: int, accumulate: int, images, labels) -> FoldRun:
    # No BatchNorm: a batch of k*b and k batches of b then see the same function.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = DataLoader(CachedImageDataset(images, labels, np.arange(len(labels))), batch_size)
    loss = build_loss(TrainConfig(), labels, TWO, "cpu")
    return assembled_fold(TWO, model, optimizer, loss, loader, accumulate_steps=accumulate)


def test_accumulating_k_batches_of_b_is_one_step_of_a_batch_of_k_times_b():
    images, labels = two_class_images(16, size=8)
    whole, parts = _plain_fold(8, 1, images, labels), _plain_fold(2, 4, images, labels)
    train_one_epoch(whole, CPU)
    train_one_epoch(parts, CPU)
    for a, b in zip(whole.model.parameters(), parts.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    single = _plain_fold(2, 1, images, labels)  # stepping every batch differs
    train_one_epoch(single, CPU)
    assert not torch.allclose(next(single.model.parameters()), next(whole.model.parameters()))


def test_compiled_models_unwrap_to_the_network():
    net = nn.Linear(2, 2)
    assert unwrap(torch.compile(net)) is net  # compiles lazily: nothing runs here


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "item",
    [
        "train.mixup_alpha=-1",
        "train.label_smoothing=1",
        "train.loss=dice",
        "train.ema_decay=1",
        "train.accumulate_steps=0",
        "optim.layer_decay=0",
    ],
)
def test_recipe_keys_are_validated(item):
    with pytest.raises(UserError, match=item.split("=")[0].split(".")[1]):
        load_config(None, [item])


def test_defaults_are_the_plain_loop():
    train = TrainConfig()
    assert (train.loss, train.label_smoothing, train.mixup_alpha, train.cutmix_alpha) == (
        "cross_entropy",
        0.0,
        0.0,
        0.0,
    )
    assert (train.ema_decay, train.accumulate_steps, train.compile) == (0.0, 1, False)
    assert OptimConfig().layer_decay == 1.0


# --------------------------------------------------------------------------- normalisation

OTHER = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_pretrained_rows_normalise_with_their_weights_own_statistics(monkeypatch):
    row = dataclasses.replace(ARCHS["resnet18"], mean=OTHER[0], std=OTHER[1])
    monkeypatch.setitem(model_module.ARCHS, "resnet18", row)
    assert input_normalization(ModelConfig(weights="imagenet")) == OTHER
    assert input_normalization(ModelConfig(weights="none")) == (IMAGENET_MEAN, IMAGENET_STD)
    cfg = ExperimentConfig.model_validate({"model": {"weights": "imagenet"}})
    runtime = Runtime.resolve(cfg, torch.device("cpu"))
    assert (runtime.mean, runtime.std) == OTHER
    # a network rebuilt from its config (nested CV's outer models) normalises as trained
    state = build_model(ModelConfig(weights="none"), 2).state_dict()
    assert input_stats(build_network(ModelConfig(weights="imagenet"), 2, state)) == OTHER


def test_saved_models_normalise_as_their_file_records(tmp_path: Path):
    from distmed.savedmodel import preprocessing_for

    size = 16
    path = tmp_path / "best_model.pt"
    prep = preprocessing_for(size, 1).model_copy(update={"mean": OTHER[0], "std": OTHER[1]})
    saved = saved_record(size, ["neg", "pos"], preprocessing=prep)
    saved.save(path, build_model(saved.config.model, 2).state_dict())
    model, _ = load_inference_model(path)
    assert input_stats(model) == OTHER
    # a file as written before the statistics varied loads with ImageNet's, unchanged
    old = saved_record(size, ["neg", "pos"])
    old.save(path, build_model(old.config.model, 2).state_dict())
    assert input_stats(load_inference_model(path)[0]) == (IMAGENET_MEAN, IMAGENET_STD)


def test_a_fold_trains_with_every_loss_element_on():
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"weights": "none"},
            "train": {
                "mixup_alpha": 0.4,
                "cutmix_alpha": 1.0,
                "label_smoothing": 0.1,
                "loss": "focal",
                "accumulate_steps": 2,
            },
        }
    )
    fold = built_fold(cfg)
    assert fold.mixer is not None and fold.accumulate_steps == 2
    result = train_one_epoch(fold, CPU)
    assert np.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
