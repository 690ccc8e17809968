"""Tensors for the model: per-image random augmentation on whole batches (on the batch's
device; the kornia-based parts in `data.policies`), and uint8 -> normalised float input with 3
channels (ImageNet's mean/std unless the network's weights have their own).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distmed.config import AugmentConfig
from distmed.data.policies import apply_policy, jitter_intensity, random_resized_crop
from distmed.model import IMAGENET_MEAN, IMAGENET_STD


def augment_batch(batch: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """`cfg`'s augmentation, drawn per image, of a float (B, C, H, W) batch in [0, 1] on its
    device: random resized crop, flips, rotation, the operation policy, intensity jitter
    (those that are on, in that order).

    One vectorised pass per batch rather than a transform per image in the loader: several
    times faster on a CPU, and on a GPU the GPU does it instead of the host (issue #7). The
    draws come from torch's RNG on the batch's device, which the worker seeds per epoch.
    Rotation resamples bilinearly about the centre and fills the corners with black.
    """
    count, device = batch.shape[0], batch.device
    batch = random_resized_crop(batch, cfg.crop_scale)
    if cfg.hflip:
        batch = torch.where(_coin(count, device), batch.flip(-1), batch)
    if cfg.vflip:
        batch = torch.where(_coin(count, device), batch.flip(-2), batch)
    if cfg.rotation > 0:
        angles = (torch.rand(count, device=device) * 2 - 1) * math.radians(cfg.rotation)
        cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], dim=1), torch.stack([sin, cos, zero], dim=1)], dim=1
        )
        grid = F.affine_grid(theta.to(batch.dtype), list(batch.shape), align_corners=False)
        batch = F.grid_sample(batch, grid, mode="bilinear", align_corners=False)
    batch = apply_policy(batch, cfg)
    return jitter_intensity(batch, cfg.brightness, cfg.contrast, cfg.gamma)


def _coin(count: int, device: torch.device) -> torch.Tensor:
    """A fair coin per image, shaped to pick whole images with `torch.where`."""
    return (torch.rand(count, device=device) < 0.5).view(count, 1, 1, 1)


def to_model_input(
    batch: torch.Tensor,
    augment: AugmentConfig | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (B, C, H, W) on any device -> normalised float (B, 3, H, W): (x/255 - mean) / std
    per channel (default ImageNet's; a network's own: `model.network_normalization`).

    `augment` (training batches only) applies `augment_batch` first, on the batch's device
    and before grey images are expanded to 3 channels (a third of the work).
    """
    inputs = batch.float() / 255.0
    if augment is not None:
        inputs = augment_batch(inputs, augment)
    if inputs.shape[1] == 1:
        inputs = inputs.expand(-1, 3, -1, -1)
    shift = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    scale = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
    return (inputs - shift) / scale
