"""Class-balanced sampling under DDP (`distmed.sampling`), with ranks simulated by explicit
rank / world size: no process group, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmed.config import ExperimentConfig, load_config
from distmed.data import CachedImageDataset
from distmed.errors import UserError
from distmed.loop import FoldData, Runtime, build_fold
from distmed.sampling import BalancedSampler, balanced_weights, train_sampler
from distmed.task import MulticlassTask

# 90 / 9 / 1 percent: a rare class a shuffled epoch would see a handful of times.
LABELS = np.repeat([0, 1, 2], [900, 90, 10])


def _dataset(labels: np.ndarray = LABELS) -> CachedImageDataset:
    images = np.zeros((len(labels), 1, 4, 4), dtype=np.uint8)
    return CachedImageDataset(images, labels, np.arange(len(labels)))


def _rank(rank: int, world: int = 2, seed: int = 5, epoch: int = 0) -> BalancedSampler:
    sampler = BalancedSampler(_dataset(), balanced_weights(LABELS), world, rank, seed)
    sampler.set_epoch(epoch)
    return sampler


def test_two_ranks_draw_balanced_classes_as_disjoint_shares_of_one_stream():
    ranks = [_rank(0), _rank(1)]
    draws = [list(sampler) for sampler in ranks]
    stream = ranks[0].stream()
    assert torch.equal(stream, ranks[1].stream())  # every rank draws the same stream
    assert draws[0] == stream[0::2].tolist() and draws[1] == stream[1::2].tolist()
    assert len(draws[0]) == len(draws[1]) == len(ranks[0]) == len(LABELS) // 2
    assert sorted(draws[0] + draws[1]) == sorted(stream.tolist())  # together: all of it
    for share in (draws[0], draws[1], draws[0] + draws[1]):
        frequencies = np.bincount(LABELS[share], minlength=3) / len(share)
        np.testing.assert_allclose(frequencies, 1 / 3, atol=0.06)  # vs 0.90 / 0.09 / 0.01


def test_an_odd_stream_is_padded_so_every_rank_takes_as_many_steps():
    dataset = _dataset(LABELS[:999])
    weights = balanced_weights(LABELS[:999])
    shares = [list(BalancedSampler(dataset, weights, 2, r, 0)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 500


def test_each_epoch_draws_a_new_stream_and_the_same_seed_the_same_one():
    assert list(_rank(0, epoch=1)) == list(_rank(0, epoch=1))
    assert list(_rank(0, epoch=1)) != list(_rank(0, epoch=2))
    assert list(_rank(0, seed=5)) != list(_rank(0, seed=6))


def test_one_process_draws_the_whole_stream():
    single = _rank(0, world=1)
    assert list(single) == single.stream().tolist() and len(single) == len(LABELS)


def test_balanced_weights_give_every_class_the_same_total():
    weights = balanced_weights(LABELS)
    totals = [weights[np.equal(LABELS, k)].sum() for k in range(3)]
    np.testing.assert_allclose(totals, 1.0)


def test_multi_label_targets_are_refused_in_one_line():
    several = np.zeros((10, 3), dtype=np.float32)  # (N, L): several findings per image
    with pytest.raises(UserError, match="train.sampler=shuffle") as caught:
        train_sampler("balanced", _dataset(np.zeros(10, dtype=np.int64)), several, 0, 0)
    assert "\n" not in str(caught.value)


def test_the_setting_is_validated_and_shuffle_keeps_todays_loader():
    with pytest.raises(UserError, match="train.sampler"):
        load_config(None, ["train.sampler=oversample"])
    assert train_sampler("shuffle", _dataset(), LABELS, 0, 0) is None


def test_a_fold_trains_from_the_balanced_stream():
    images = np.zeros((60, 1, 16, 16), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], [50, 8, 2])
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"image_size": 16},
            "model": {"weights": "none", "stem": "small"},
            "train": {"sampler": "balanced"},
        }
    )
    task = MulticlassTask(("a", "b", "c"))
    runtime = Runtime(torch.device("cpu"))
    fold = build_fold(FoldData(0, range(60), None, images, labels, task), cfg, runtime, 8)
    sampler = fold.train_loader.sampler
    assert isinstance(sampler, BalancedSampler) and len(fold.train_loader) == 60 // 8
    drawn = np.concatenate([batch_labels.numpy() for _, batch_labels, _ in fold.train_loader])
    assert np.bincount(drawn, minlength=3).min() >= 8  # class c: 2 images, drawn about 19 times


@pytest.mark.parametrize(
    ("sets", "space", "warned"),
    [
        (["train.sampler=balanced"], "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", True),
        ([], "train.sampler: {choice: [shuffle, balanced]}", True),  # some trials draw both
        ([], "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", False),
        (
            ["train.sampler=balanced", "train.class_weights=none"],
            "optim.lr: {uniform: [0.1, 1]}",
            False,
        ),
    ],
)
def test_balancing_the_classes_twice_is_said_before_the_search(
    tmp_path, caplog, sets, space, warned
):
    """Balanced draws with loss weights of 1 / class frequency weigh rare classes twice."""
    from distmed.tune import main

    path = tmp_path / "space.yaml"
    path.write_text(
        "base:\n  model: {weights: none}\n  train: {class_weights: balanced}\n"
        f"space:\n  {space}\n"
    )
    overrides = [arg for value in sets for arg in ("--set", value)]
    with caplog.at_level("WARNING", logger="distmed.sampling"):
        assert main(["--space", str(path), "--dry-run", *overrides]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "distmed.sampling"]
    assert len(said) == int(warned), said
    if warned:
        assert "weighs the classes twice" in said[0] and "train.class_weights: none" in said[0]
