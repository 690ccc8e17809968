"""kornia's augmentations drawn per image on whole batches: the RandAugment / TrivialAugment
operation policies over medical-safe candidates, random resized crop and intensity jitter.

kornia draws magnitudes per image but picks a policy's operations once per call, so one call
would give the whole batch the same operations. `apply_policy` draws each image's operations
itself (torch's RNG, seeded per epoch by the worker) and runs each chosen operation once, on
the images that drew it, through a single-candidate kornia policy: kornia's own magnitude
rules (RandAugment's M of 30, TrivialAugment's uniform draw), per-image operations, at most
one call per candidate and round. kornia is imported on first use (about 3 s).

Inputs are float (B, C, H, W) batches in [0, 1] with C = 1 or 3, on any device; outputs keep
shape, dtype and device.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from distmed.config import AugmentConfig

# (kornia operation, low, high): kornia's RandAugment candidates without those that change
# what an intensity means in a medical image (invert, solarize, solarize_add: bone would read
# as air) or have no meaning for grey images (color: kornia refuses 1 channel). Photometric
# ranges straddle 1 (identity), so RandAugment's M < 15 darkens / flattens and M > 15
# brightens / sharpens (kornia maps M to low + (high - low) * M / 30). kornia reads shear as
# degrees / 180: 0.1 is up to 18 degrees, about torchvision's 0.3 shear factor.
MEDICAL_CANDIDATES: tuple[tuple[str, float, float], ...] = (
    ("auto_contrast", 0.0, 1.0),
    ("equalize", 0.0, 1.0),
    ("rotate", -30.0, 30.0),
    ("posterize", 4.0, 8.0),
    ("contrast", 0.5, 1.5),
    ("brightness", 0.7, 1.3),
    ("sharpness", 0.1, 1.9),
    ("shear_x", -0.1, 0.1),
    ("shear_y", -0.1, 0.1),
    ("translate_x", -0.1, 0.1),
    ("translate_y", -0.1, 0.1),
)


def apply_policy(batch: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """`cfg.policy` with its operations drawn per image; the batch itself when 'none'.

    randaugment: each image gets `policy_ops` distinct candidates in random order, each at
    magnitude `policy_magnitude` (of 30; a signed operation gets a random sign per image).
    trivialaugment: each image gets one candidate at a magnitude drawn uniformly in its range.
    """
    if cfg.policy == "none":
        return batch
    ops = _single_ops(cfg.policy, cfg.policy_magnitude)
    rounds = cfg.policy_ops if cfg.policy == "randaugment" else 1
    # Per image, a random order of the candidates; round r applies each image's r-th.
    order = torch.rand(batch.shape[0], len(ops), device=batch.device).argsort(dim=1)
    out = batch.clone()
    for column in order[:, :rounds].T:
        for k in column.unique().tolist():
            picked = (column == k).nonzero().squeeze(1)
            out[picked] = ops[k](out[picked]).to(out.dtype)
    return out


@cache
def _single_ops(policy: str, magnitude: int) -> tuple[nn.Module, ...]:
    """One kornia policy per candidate, holding only it (so it always applies that one)."""
    from kornia.augmentation.auto import RandAugment, TrivialAugment

    if policy == "randaugment":
        return tuple(RandAugment(n=1, m=magnitude, policy=[[op]]) for op in MEDICAL_CANDIDATES)
    return tuple(TrivialAugment(policy=[[op]]) for op in MEDICAL_CANDIDATES)


def random_resized_crop(batch: torch.Tensor, min_scale: float) -> torch.Tensor:
    """A crop per image of `min_scale` to all of its area (aspect 3/4 to 4/3), resized back
    to (H, W) bilinearly; the batch itself when `min_scale` is 1."""
    if min_scale >= 1:
        return batch
    return _crop(tuple(batch.shape[-2:]), min_scale)(batch).to(batch.dtype)


@cache
def _crop(size: tuple[int, int], min_scale: float) -> nn.Module:
    from kornia.augmentation import RandomResizedCrop

    return RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3))


def jitter_intensity(
    batch: torch.Tensor, brightness: float, contrast: float, gamma: float
) -> torch.Tensor:
    """Per image: add a brightness shift in +/- `brightness`, scale contrast by a factor in
    1 +/- `contrast` (kornia: about zero, clipped to [0, 1]) and raise to a gamma in
    1 +/- `gamma`; each off at 0. Grey-level operations: a grey image stays grey."""
    for module in _jitters(brightness, contrast, gamma):
        batch = module(batch).to(batch.dtype)
    return batch


@cache
def _jitters(brightness: float, contrast: float, gamma: float) -> tuple[nn.Module, ...]:
    from kornia.augmentation import RandomBrightness, RandomContrast, RandomGamma

    modules: list[nn.Module] = []
    if brightness > 0:
        modules.append(RandomBrightness(brightness=(1 - brightness, 1 + brightness)))
    if contrast > 0:
        modules.append(RandomContrast(contrast=(1 - contrast, 1 + contrast)))
    if gamma > 0:
        modules.append(RandomGamma(gamma=(1 - gamma, 1 + gamma)))
    return tuple(modules)
