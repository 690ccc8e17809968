"""The augmentation policies on batches (`distmed.data.policies` through `augment_batch`):
per-image draws, off means identity, medical-safe bounds, seeded; their config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmed.config import AugmentConfig, load_config
from distmed.data import augment_batch
from distmed.errors import UserError

ONLY = {"hflip": False, "rotation": 0.0}  # today's flips and rotation off: the new key alone
POLICIES = ("randaugment", "trivialaugment")


def _same_image(count: int, channels: int = 1, size: int = 24) -> torch.Tensor:
    """`count` copies of one textured image in [0, 1]: differences come from the draws."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, channels, size, size, generator=generator)
    return image.expand(count, -1, -1, -1).contiguous()


def _distinct(batch: torch.Tensor) -> int:
    return len({tuple(row.flatten().tolist()) for row in batch.round(decimals=5)})


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_operations_are_drawn_per_image_not_per_batch(policy):
    # kornia picks a policy's operations once per call; with one RandAugment magnitude that
    # leaves at most 2 signs per op, i.e. a handful of distinct results for identical images.
    torch.manual_seed(3)
    out = augment_batch(_same_image(32), AugmentConfig(policy=policy, **ONLY))
    assert out.shape == (32, 1, 24, 24) and out.dtype == torch.float32
    assert _distinct(out) >= 16


class _Marker(torch.nn.Module):
    """A stand-in operation that adds 2**k: the sum an image gets names the ops it drew."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch + 2.0**self.k


@pytest.mark.parametrize(("policy", "ops"), [("randaugment", 3), ("trivialaugment", 1)])
def test_each_image_draws_its_own_distinct_operations(monkeypatch, policy, ops):
    from distmed.data import policies

    markers = tuple(_Marker(k) for k in range(len(policies.MEDICAL_CANDIDATES)))
    monkeypatch.setattr(policies, "_single_ops", lambda policy, magnitude: markers)
    torch.manual_seed(8)
    cfg = AugmentConfig(policy=policy, policy_ops=ops)
    added = policies.apply_policy(torch.zeros(64, 1, 2, 2), cfg)[:, 0, 0, 0].long().tolist()
    drawn = [{k for k in range(len(markers)) if code >> k & 1} for code in added]
    assert all(len(ks) == ops for ks in drawn)  # `ops` distinct operations per image
    assert len({frozenset(ks) for ks in drawn}) >= 8  # and not the same ones for all
    assert set().union(*drawn) == set(range(len(markers)))


@pytest.mark.parametrize(
    "keys",
    [{"crop_scale": 0.5}, {"brightness": 0.2}, {"contrast": 0.3}, {"gamma": 0.3}],
)
def test_crop_and_intensity_parameters_differ_within_a_batch(keys):
    torch.manual_seed(4)
    out = augment_batch(_same_image(16), AugmentConfig(**ONLY, **keys))
    assert _distinct(out) == 16


def test_the_new_keys_default_to_off_and_off_is_the_identity():
    assert AugmentConfig() == AugmentConfig(
        policy="none", crop_scale=1.0, brightness=0, contrast=0, gamma=0, tta="none"
    )
    batch = torch.rand(8, 3, 20, 20)
    assert torch.equal(augment_batch(batch, AugmentConfig(**ONLY)), batch)


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_keep_anatomy_upright_and_intensities_in_order(policy):
    """Medical-safe bounds: no vertical flip, no inversion/solarisation. An image bright on
    top and dark below keeps a brighter top half under every draw, within [0, 1]."""
    size = 32
    image = torch.full((1, 1, size, size), 0.2)
    image[..., : size // 2, :] = 0.8
    image = image + 0.05 * torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    out = augment_batch(image.expand(64, -1, -1, -1).contiguous(), AugmentConfig(policy=policy))
    assert out.min() >= 0 and out.max() <= 1
    top, bottom = (
        out[..., : size // 2, :].mean(dim=(1, 2, 3)),
        out[..., size // 2 :, :].mean(dim=(1, 2, 3)),
    )
    assert (top > bottom).all()


def test_intensity_jitter_stays_within_its_bounds():
    grey = torch.full((64, 1, 8, 8), 0.5)  # mid-grey: no clipping at these bounds
    torch.manual_seed(6)
    shifted = augment_batch(grey, AugmentConfig(brightness=0.2, **ONLY)) - 0.5
    assert shifted.abs().max() <= 0.2 + 1e-6 and shifted.std() > 0.05
    torch.manual_seed(6)
    gamma = augment_batch(grey, AugmentConfig(gamma=0.3, **ONLY))
    # 0.5 ** g for g in [0.7, 1.3]
    assert gamma.min() >= 0.5**1.3 - 1e-6 and gamma.max() <= 0.5**0.7 + 1e-6


@pytest.mark.parametrize("policy", POLICIES)
def test_a_grey_image_stays_grey(policy):
    grey = _same_image(16, channels=1).expand(-1, 3, -1, -1).contiguous()
    torch.manual_seed(7)
    keys = {"policy": policy, "brightness": 0.1, "contrast": 0.2, "gamma": 0.2, "crop_scale": 0.6}
    out = augment_batch(grey, AugmentConfig(**keys))
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 0], out[:, 2])


def test_the_same_seed_draws_the_same_augmentation_and_another_seed_does_not():
    cfg = AugmentConfig(
        policy="randaugment", crop_scale=0.5, brightness=0.1, contrast=0.2, gamma=0.2
    )
    batch = _same_image(8)
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(augment_batch(batch, cfg))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("data.augment.policy=autoaugment", "data.augment.policy"),
        ("data.augment.policy_ops=12", "data.augment.policy_ops"),
        ("data.augment.policy_magnitude=30", "data.augment.policy_magnitude"),
        ("data.augment.crop_scale=0.01", "data.augment.crop_scale"),
        ("data.augment.brightness=0.9", "data.augment.brightness"),
        ("data.augment.tta=eight", "data.augment.tta"),
        ("data.augment.tta_draws=0", "data.augment.tta_draws"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(item, key):
    with pytest.raises(UserError, match=key) as caught:
        load_config(None, [item])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("items", "hint"),
    [
        (["data.augment.tta=flips", "data.augment.hflip=false"], "data.augment.hflip=true"),
        (
            ["data.augment.tta=policy", "data.augment.hflip=false", "data.augment.rotation=0"],
            "data.augment.policy=trivialaugment",
        ),
    ],
)
def test_tta_without_anything_to_average_is_refused(items, hint):
    with pytest.raises(UserError, match=hint):
        load_config(None, items)


def test_the_recipe_keys_are_searched_per_trial(tmp_path):
    from distmed.space import apply_params, load_space, to_tune_domains

    path = tmp_path / "space.yaml"
    path.write_text(
        "space:\n"
        "  data.augment.policy: {choice: [none, randaugment, trivialaugment]}\n"
        "  data.augment.policy_magnitude: {randint: [5, 15]}\n"
        "  data.augment.crop_scale: {uniform: [0.5, 1.0]}\n"
        "  data.augment.tta: {choice: [none, flips]}\n"
        "  train.sampler: {choice: [shuffle, balanced]}\n"
    )
    spec = load_space(path)
    domains = to_tune_domains(spec.space)
    rng = np.random.default_rng(0)
    trials = [
        apply_params(spec.base, {k: d.sample(random_state=rng) for k, d in domains.items()})
        for _ in range(40)
    ]
    assert {t.data.augment.policy for t in trials} == {"none", "randaugment", "trivialaugment"}
    assert {t.train.sampler for t in trials} == {"shuffle", "balanced"}
    assert {t.data.augment.tta for t in trials} == {"none", "flips"}
    assert all(0.5 <= t.data.augment.crop_scale <= 1 for t in trials)
