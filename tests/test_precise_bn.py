"""Precise BN (`train.precise_bn_images`, no Ray): the recomputed running statistics are the
exact statistics of each trainable BatchNorm's input under the current weights, frozen layers
keep theirs, the fold loop recomputes the model it validates and saves (the EMA's copy when
on), and every DDP rank picks the same images."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import built_fold
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from distmed.config import ExperimentConfig, load_config
from distmed.errors import UserError
from distmed.loop import (
    Runtime,
    model_inputs,
    precise_bn_positions,
    recompute_fold_batchnorm,
    run_fold_epoch,
    unwrap,
)
from distmed.model import recompute_batchnorm_statistics, trainable_batchnorms

CPU = Runtime(torch.device("cpu"))


def _net() -> nn.Sequential:
    """conv -> BN (frozen) -> conv -> BN -> ReLU -> dropout -> conv -> BN."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(5, 2, 1),
        nn.BatchNorm2d(2),
    )
    frozen = net[1]
    frozen.running_mean.fill_(0.3)
    frozen.running_var.fill_(2.0)
    for p in frozen.parameters():
        p.requires_grad_(False)
    for norm in (net[3], net[7]):  # affine weights that are not the identity
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.5, 0.5)
    return net


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of (N, C, H, W) over images and positions."""
    values = x.double().transpose(0, 1).flatten(1)
    return values.mean(dim=1), values.var(dim=1, unbiased=True)


def _batch_norm(x: torch.Tensor, norm: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    stats = (None, None) if training else (norm.running_mean, norm.running_var)
    return F.batch_norm(x, *stats, norm.weight, norm.bias, training, 0.0, norm.eps)


def test_recompute_sets_each_trainable_layer_to_its_inputs_statistics_and_keeps_frozen_ones():
    net = _net()
    net.train()
    frozen = {k: v.clone() for k, v in net[1].state_dict().items()}
    batches = list(torch.randn(11, 3, 9, 9).split(4))  # ragged: 4, 4, 3
    # By hand: the frozen BN normalises with its running statistics, the trainable ones with
    # each batch's own, and dropout passes everything (eval mode).
    with torch.no_grad():
        x1 = [net[2](_batch_norm(net[0](b), net[1], False)) for b in batches]
        x2 = [net[6](F.relu(_batch_norm(x, net[3], True))) for x in x1]

    assert recompute_batchnorm_statistics(net, iter(batches)) == 11

    for norm, inputs in ((net[3], x1), (net[7], x2)):
        mean, var = _stats(torch.cat(inputs))
        assert torch.allclose(norm.running_mean.double(), mean, atol=1e-5)
        assert torch.allclose(norm.running_var.double(), var, rtol=1e-4)
    assert all(torch.equal(net[1].state_dict()[k], v) for k, v in frozen.items())
    # Training mode, momenta and step counts are as they were.
    assert all(m.training for m in net.modules())
    assert all(n.momentum == 0.1 and int(n.num_batches_tracked) == 0 for n in (net[3], net[7]))
    assert trainable_batchnorms(net) == [net[3], net[7]]


def test_recomputed_on_the_evaluated_batch_eval_output_is_train_output():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(16, 3, 34, 34) * 3 + 1  # 16 x 32 x 32 values per channel
    with torch.no_grad():
        trained = net.train()(x)
        stale = net.eval()(x)  # the initial (0, 1) statistics
    assert not torch.allclose(stale, trained, atol=0.1)
    recompute_batchnorm_statistics(net, [x])
    with torch.no_grad():
        evaluated = net.eval()(x)
    # Equal up to Bessel's correction: running_var is unbiased (n / (n - 1), n = 16384).
    assert torch.allclose(evaluated, trained, atol=1e-3)


def test_nothing_changes_without_batchnorm_or_without_images():
    ln = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(1, 4))  # LayerNorm-like, as ConvNeXt
    assert recompute_batchnorm_statistics(ln, [torch.randn(4, 3, 8, 8)]) == 0
    net = _net()
    before = copy.deepcopy(net.state_dict())
    assert recompute_batchnorm_statistics(net, []) == 0
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_the_chosen_images_depend_on_seed_fold_and_epoch_only():
    chosen = precise_bn_positions(100, 30, 7, 2, 3)
    assert len(set(chosen.tolist())) == 30 and chosen.max() < 100
    assert np.array_equal(chosen, precise_bn_positions(100, 30, 7, 2, 3))
    for other in ((8, 2, 3), (7, 1, 3), (7, 2, 4)):
        assert not np.array_equal(chosen, precise_bn_positions(100, 30, *other))
    assert sorted(precise_bn_positions(10, 30, -1, 0, 0).tolist()) == list(range(10))


def _cfg(**train) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"model": {"weights": "none"}, "train": train})


def test_every_rank_recomputes_the_same_statistics():
    # Two ranks' folds as Ray's prepare_data_loader shards them (DistributedSampler): the
    # same weights, each rank's loader yields other images, the statistics are the same.
    cfg = _cfg(precise_bn_images=8)
    folds = []
    for rank in (0, 1):

        def shard(loader: DataLoader, rank: int = rank) -> DataLoader:
            sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank)
            return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler)

        fold = built_fold(cfg)
        fold.train_loader = shard(fold.train_loader)
        folds.append(fold)
    for fold in folds:
        assert recompute_fold_batchnorm(fold, 0, cfg, CPU) == 8
    states = [unwrap(f.model).state_dict() for f in folds]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    fresh = unwrap(built_fold(cfg).model).state_dict()
    assert not torch.equal(states[0]["bn1.running_mean"], fresh["bn1.running_mean"])


def _trained(cfg: ExperimentConfig, epochs: int = 2):
    fold = built_fold(cfg)
    for epoch in range(epochs):
        run_fold_epoch(fold, epoch, cfg, CPU)
    return fold


def _scores(fold) -> list[dict[str, float]]:
    """The fold's epoch records without their speeds (wall-clock, never the same twice)."""
    return [{k: v for k, v in r.items() if not k.endswith("per_s")} for r in fold.history]


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unwrap(model).state_dict().items() if "running_" in k}


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_the_loop_recomputes_the_validated_model_from_the_folds_training_images(ema_decay):
    on, off = _cfg(precise_bn_images=6, ema_decay=ema_decay), _cfg(ema_decay=ema_decay)
    fold, plain, again = _trained(on), _trained(off), _trained(on)
    assert _scores(fold) == _scores(again)  # the same seed, the same run
    repeated = _bn_buffers(again.model)
    assert all(torch.equal(v, repeated[k]) for k, v in _bn_buffers(fold.model).items())
    assert fold.history[-1]["val_num_samples"] == 4

    # What the loop validated: the off run's model, recomputed by hand on the images chosen
    # for the last epoch (un-augmented, batches of 4 as the fold trains).
    expected = copy.deepcopy(unwrap(plain.eval_model))
    dataset = plain.train_loader.dataset
    chosen = dataset.indices[precise_bn_positions(len(dataset), 6, 0, 0, 1)]
    batches = [
        model_inputs(torch.from_numpy(dataset.images[rows]), CPU)
        for rows in (chosen[:3], chosen[3:])
    ]
    recompute_batchnorm_statistics(expected, batches)
    got, stale = _bn_buffers(fold.eval_model), _bn_buffers(plain.eval_model)
    for key, value in _bn_buffers(expected).items():
        assert torch.allclose(got[key], value, atol=1e-5), key
        assert not torch.allclose(got[key], stale[key], atol=1e-3), key
    saved = fold.state_dict()["model"]  # what the fold saves is what it validated
    assert all(torch.equal(saved[k], v) for k, v in got.items())
    if ema_decay:  # the EMA's copy is recomputed; the trained model keeps its own statistics
        assert fold.eval_model is fold.ema.module
        trained, plain_trained = _bn_buffers(fold.model), _bn_buffers(plain.model)
        assert all(torch.equal(v, plain_trained[k]) for k, v in trained.items())


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["train.precise_bn_images=1"], "train.precise_bn_images"),
        (["train.precise_bn_images=64", "data.loader=stream"], "needs data.loader: cache"),
    ],
)
def test_unusable_settings_are_refused_in_one_line(overrides, words):
    with pytest.raises(UserError) as caught:
        load_config(None, overrides)
    assert words in str(caught.value) and "\n" not in str(caught.value)
