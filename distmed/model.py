"""build_model(cfg.model, num_classes): a torchvision ResNet, its weights, a new head, freezing.

Weights come from torchvision's own registry and cache (`imagenet`), from a local
state-dict file (strict load, optional sha256), or nowhere (`none`). `unfreeze` counts
stages from the head backwards; frozen stages keep BatchNorm in eval mode. `stem: small`
swaps the 7x7/2 convolution and max-pool for a 3x3/1 convolution, as for CIFAR-sized inputs.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import cast

import torch
from torch import nn

from distmed.artifacts import read_torch_file
from distmed.config import RESNET_STAGES, ModelConfig
from distmed.errors import UserError

log = logging.getLogger(__name__)


def _torchvision_models():
    # Imported on first use: every Ray process that unpickles the training function imports
    # this module (trial, controller and worker actors), only the workers build models, and
    # torchvision drags in torch._dynamo (~1.7 s of CPU per process on 2 cores).
    from torchvision import models

    return models


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A ResNet with pretrained (or no) weights, a `num_classes` head and frozen stages."""
    model = _torchvision_models().get_model(cfg.arch, weights=None)
    load_backbone_weights(model, cfg)
    if cfg.stem == "small":
        use_small_stem(model)
    model.fc = build_head(cfg, model.fc.in_features, num_classes)
    apply_freeze(model, cfg.unfreeze, new_stem=cfg.stem == "small")
    return model


def use_small_stem(model: nn.Module) -> None:
    """A 3x3 stride-1 first convolution and no max-pool.

    The ImageNet stem divides a 28 px image by 4 before layer1, leaving layer4 a 1x1 map;
    this stem keeps 4x more resolution through every stage (at ~10x the compute of the
    ImageNet stem at the same input size). The pretrained 7x7 kernel does not fit, so the
    new convolution and its BatchNorm start fresh, like the head.
    """
    out_channels = cast(nn.Conv2d, model.conv1).out_channels
    model.conv1 = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(out_channels)
    model.maxpool = nn.Identity()


def check_weights(cfg: ModelConfig) -> None:
    """Load the configured weights once, so a bad file fails before data work or Ray starts."""
    load_backbone_weights(_torchvision_models().get_model(cfg.arch, weights=None), cfg)


def build_head(cfg: ModelConfig, in_features: int, num_classes: int) -> nn.Module:
    if cfg.head == "linear":
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(
        nn.Linear(in_features, cfg.head_hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(cfg.head_dropout),
        nn.Linear(cfg.head_hidden, num_classes),
    )


def load_backbone_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Fill the backbone (including the ImageNet `fc`, replaced afterwards) from `cfg.weights`."""
    if cfg.weights == "none":
        return
    if cfg.weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(cfg.arch))
        return
    path = Path(cfg.weights).expanduser()
    try:
        model.load_state_dict(read_state_dict(path, cfg.weights_sha256), strict=True)
    except RuntimeError as exc:  # torch lists missing/unexpected keys and shape mismatches
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:160]
        raise UserError(
            f"model.weights {path}: does not fit {cfg.arch} ({detail}); "
            "check model.arch or the file"
        ) from exc


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    weights = _torchvision_models().get_model_weights(arch).DEFAULT
    try:
        # torchvision downloads once into its own cache (TORCH_HOME) and checks the hash.
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"model.weights=imagenet: could not fetch {weights} ({type(exc).__name__}: offline?); "
            "use model.weights=PATH to a local state dict, or model.weights=none"
        ) from exc


def read_state_dict(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """Load a state dict safely (`weights_only=True`) after checking its sha256 (prefix)."""
    if not path.is_file():
        raise UserError(
            f"model.weights {path}: file not found; give a .pt/.pth state dict, imagenet or none"
        )
    if sha256:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if not actual.startswith(sha256.lower()):
            raise UserError(
                f"model.weights {path}: sha256 {actual[:16]}… does not match model.weights_sha256 "
                f"{sha256[:16]}…; the file is corrupt or not the one intended"
            )
    try:
        state = read_torch_file(path, "model.weights")
    except UserError as exc:
        raise UserError(
            f"{exc}; give a file of plain tensors saved with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(
            f"model.weights {path}: expected a state dict, found {type(state).__name__}"
        )
    return state


def stage_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The five trainable stages of a ResNet, named as in `RESNET_STAGES`."""

    def part(name: str) -> nn.Module:
        return model.get_submodule(name)

    return {
        "layer4": [part("layer4")],
        "layer3": [part("layer3")],
        "layer2": [part("layer2")],
        "layer1": [part("layer1")],
        "stem": [part("conv1"), part("bn1")],
    }


def apply_freeze(model: nn.Module, unfreeze: int, new_stem: bool = False) -> None:
    """Train the head plus the last `unfreeze` stages; everything else is frozen.

    A freshly initialised stem (`new_stem`) always trains: frozen random filters would
    feed noise to every later stage.
    """
    frozen = frozen_stages(unfreeze, new_stem)
    for name, modules in stage_modules(model).items():
        for module in modules:
            module.requires_grad_(name not in frozen)


def frozen_stages(unfreeze: int, new_stem: bool = False) -> list[str]:
    """The stages `apply_freeze` freezes, head end first (a new stem always trains)."""
    trainable = set(RESNET_STAGES[:unfreeze]) | ({"stem"} if new_stem else set())
    return [stage for stage in RESNET_STAGES if stage not in trainable]


def warn_frozen_random_stages(cfg: ModelConfig, lowest_unfreeze: int | None = None) -> None:
    """Log a warning when `weights: none` meets an `unfreeze` that freezes stages.

    Freezing keeps pretrained features; without pretrained weights a frozen stage keeps its
    random init for the whole run, which handicaps the model instead of choosing a
    transfer-learning depth. Not an error: it is a valid (if rarely wanted) experiment.
    `lowest_unfreeze` is the smallest value a search can draw, when it searches `unfreeze`.
    """
    if cfg.weights != "none":
        return
    unfreeze = cfg.unfreeze if lowest_unfreeze is None else lowest_unfreeze
    frozen = frozen_stages(unfreeze, new_stem=cfg.stem == "small")
    if not frozen:
        return
    if lowest_unfreeze is None:
        where, fix = f"model.unfreeze={unfreeze}", "set model.unfreeze=5"
    else:
        where, fix = f"model.unfreeze searched down to {unfreeze}", "take it out of the space"
    log.warning(
        "model.weights=none with %s freezes %s at random init for the whole run; %s to "
        "train every stage, or give pretrained weights (model.weights=imagenet or a .pt file)",
        where,
        ", ".join(frozen),
        fix,
    )


def set_train_mode(model: nn.Module) -> None:
    """`model.train()`, except BatchNorm layers whose parameters are frozen stay in eval mode.

    A frozen stage must not drift its running statistics towards the new data set while its
    affine weights stay fixed; that silently changes the features it was frozen to keep.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()
