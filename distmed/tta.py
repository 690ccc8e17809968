"""Test-time augmentation (`data.augment.tta`): the views of a batch a prediction averages.

'flips': the image and its flips, those training uses (horizontal by default; with vflip
also vertical and both: 4 views). 'policy': the unaugmented image and `tta_draws` draws of
the training augmentation (`data.transforms.augment_batch`). The class probabilities of the
views are averaged (as fastai's `Learner.tta` and timm's `--tta` do), so one prediction
costs `forward_passes` forward passes. Validation during training, the test split, predict,
evaluate and the app all call `average_probabilities`, so the CV score is the score of what
is shipped. Export puts the flips inside the graph (`FlipAveraged`); random draws cannot be
exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from distmed.config import AugmentConfig
from distmed.data import IMAGENET_MEAN, IMAGENET_STD, to_model_input

# (mean, std) per channel the network's inputs are normalised with (`model.input_normalization`).
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET: Normalization = (IMAGENET_MEAN, IMAGENET_STD)

# Policy draws at prediction time come from their own RNG, seeded per batch: a prediction is
# the same on every call, and validation does not shift the training draws that follow it.
TTA_SEED = 20_240_607
# log(0) would be -inf in an exported graph (as `inference.MIN_PROBABILITY`).
MIN_PROBABILITY = 1e-12


def active(cfg: AugmentConfig | None) -> bool:
    return cfg is not None and cfg.tta != "none"


def forward_passes(cfg: AugmentConfig | None) -> int:
    """Forward passes per predicted image: 1 without TTA, the number of views with it."""
    if not active(cfg):
        return 1
    assert cfg is not None
    if cfg.tta == "flips":
        return len(flip_dims(cfg))
    return 1 + cfg.tta_draws


def describe(cfg: AugmentConfig | None) -> str:
    """What a prediction averages, for a terminal line and evaluation.json: 'none', or the
    views and their cost, e.g. 'flips (2 forward passes an image)'."""
    if not active(cfg):
        return "none"
    assert cfg is not None
    views = "flips" if cfg.tta == "flips" else f"policy, {cfg.tta_draws} draws"
    return f"{views} ({forward_passes(cfg)} forward passes an image)"


def flip_dims(cfg: AugmentConfig) -> list[tuple[int, ...]]:
    """The flips of tta=flips as `torch.flip` dims, () being the image itself."""
    dims: list[tuple[int, ...]] = [()]
    if cfg.hflip:
        dims.append((-1,))
    if cfg.vflip:
        dims.append((-2,))
    if cfg.hflip and cfg.vflip:
        dims.append((-2, -1))
    return dims


def views(
    images: torch.Tensor, cfg: AugmentConfig, normalization: Normalization = IMAGENET
) -> Iterator[torch.Tensor]:
    """Model inputs (B, 3, H, W) of each view of a uint8 (B, C, H, W) batch on its device,
    normalised with `normalization` (mean, std)."""
    plain = to_model_input(images, None, *normalization)
    yield plain
    if cfg.tta == "flips":
        for dims in flip_dims(cfg)[1:]:
            yield plain.flip(dims)
        return
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(TTA_SEED)
        for _ in range(cfg.tta_draws):
            yield to_model_input(images, cfg, *normalization)


def average_probabilities(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    cfg: AugmentConfig | None,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda inputs: inputs,
    normalization: Normalization = IMAGENET,
) -> torch.Tensor:
    """(B, K) class probabilities of a uint8 (B, C, H, W) batch on the model's device: the
    mean over the TTA views of `probabilities(model(view))`, or of the one plain view when
    `cfg` is None or its tta 'none'. `prepare` puts an input in the model's memory format;
    `normalization` is the network's (mean, std) (`model.input_normalization`).
    """
    if not active(cfg):
        return probabilities(model(prepare(to_model_input(images, None, *normalization))))
    assert cfg is not None
    total: torch.Tensor | None = None
    for view in views(images, cfg, normalization):
        probs = probabilities(model(prepare(view)))
        total = probs if total is None else total + probs
    assert total is not None
    return total / forward_passes(cfg)


class FlipAveraged(nn.Module):
    """An exportable model of tta=flips: normalised images (B, 3, H, W) -> log of the mean
    softmax over the flips, so a softmax of its output is what predict gives; with
    `multilabel`, the logit of the mean sigmoid per finding, so a sigmoid of it is.

    Flipping commutes with the per-channel normalisation, so flipping the normalised input
    inside the graph equals flipping the image before it.
    """

    def __init__(self, model: nn.Module, cfg: AugmentConfig, multilabel: bool = False) -> None:
        super().__init__()
        self.model = model
        self.dims = flip_dims(cfg)
        self.multilabel = multilabel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = [self.model(images.flip(dims) if dims else images).float() for dims in self.dims]
        if self.multilabel:
            mean = torch.stack([torch.sigmoid(z) for z in logits]).mean(dim=0)
            mean = mean.clamp(MIN_PROBABILITY, 1 - MIN_PROBABILITY)
            return torch.log(mean) - torch.log1p(-mean)  # the logit, sigmoid's inverse
        probs = [torch.softmax(z, dim=1) for z in logits]
        return torch.log(torch.stack(probs).mean(dim=0).clamp_min(MIN_PROBABILITY))
