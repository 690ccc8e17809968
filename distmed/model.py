"""build_model(cfg.model, num_classes): a torchvision backbone, its weights, a new head, freezing.

Each backbone's anatomy is data, one `Arch` row in `ARCHS` (after timm's `group_matcher`,
`get_classifier` and `reset_classifier`): where its head, stem and stages are, their stride, and
how to give it a small stem. Head replacement, `apply_freeze`, the small stem, the config's
allowed `model.arch` values and `unfreeze` bound, and Grad-CAM's layer all read that table, so a
new backbone is one more row. Weights come from torchvision's own registry and cache
(`imagenet`), from a local state-dict file (strict load, optional sha256), or nowhere (`none`).
`unfreeze` counts stages from the head backwards; frozen stages keep BatchNorm in eval mode,
and precise BN (`recompute_batchnorm_statistics`) recomputes only the trainable layers' statistics.
`stem: small` swaps the strided first convolution (and max-pool) for a 3x3/1 convolution, as for
CIFAR-sized inputs, on the rows that have a `small_stem`. Each row also records its weights'
preprocessing (crop and resize size, interpolation, mean/std) as timm's `pretrained_cfg` does.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from distmed.artifacts import read_torch_file
from distmed.errors import UserError

if TYPE_CHECKING:  # config.py reads ARCHS from here, so this module must not import it
    from distmed.config import ModelConfig

log = logging.getLogger(__name__)

# The normalisation torchvision's ImageNet weights were trained with (every torchvision
# row's weights use it; a row with other weights records its own `mean`/`std`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std)
STEM = "stem"  # the name `unfreeze`, warnings and apply_freeze give every arch's stem
# The attribute build_model leaves on a network: which row built it (timm leaves its
# `pretrained_cfg` on the model the same way), for Grad-CAM on a plain nn.Module.
ARCH_ATTRIBUTE = "distmed_arch"
# ... and the per-channel (mean, std) its inputs are normalised with (`network_normalization`).
NORMALIZATION_ATTRIBUTE = "distmed_normalization"


@dataclass(frozen=True)
class Stage:
    """One block of stages `unfreeze` counts: its module path, its stride, what trains with it.

    `path` is the module whose output is the stage's feature map (Grad-CAM hooks it);
    `reduction` is input side / that map's side with the ImageNet stem (timm's `feature_info`
    `reduction`); Grad-CAM uses it to pick a resolved stage. `extra`: further modules that
    freeze and train with it (the downsampling layer before it, a final norm or a pretrained
    pre-logits layer after it), as timm's `group_matcher` groups them.
    """

    path: str
    reduction: int
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class SmallStem:
    """Where the small-stem hook cuts: the strided first convolution, its norm, the pool.

    `gain`: how many times wider every later feature map gets (the stride taken out).
    """

    conv: str
    norm: str
    pool: str | None = None
    gain: int = 4


@dataclass(frozen=True)
class Arch:
    """One backbone's anatomy as attribute paths (`get_submodule` paths, e.g. `classifier.1`
    or `features.denseblock4`), so the code that freezes or replaces parts names none.

    `head`: the final Linear, the only module replaced (dropout and norms before it stay).
    `stages`: the blocks in unfreeze order, head end first; the stem (`stem` paths) is the
    last stage `unfreeze` reaches. `small_stem`: None where the row has no small-stem hook.
    `min_size`: the smallest square input side the row accepts with its ImageNet stem (with
    the small stem, the config's own minimum). `channels_last`: stage outputs are (N, H, W, C)
    token maps (Swin), not (N, C, H, W).
    The pretrained fields follow timm's `pretrained_cfg`: `weights` (the torchvision weights
    enum's name), its `input_size` (crop), `resize_size`, `interpolation`, `mean` and `std`.
    """

    name: str
    weights: str
    head: str
    stem: tuple[str, ...]
    stages: tuple[Stage, ...]
    small_stem: SmallStem | None
    min_size: int = 8
    channels_last: bool = False
    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def stage_names(self) -> tuple[str, ...]:
        """What `unfreeze` counts, head end first: each stage's path, then "stem"."""
        return (*(stage.path for stage in self.stages), STEM)

    @property
    def depth(self) -> int:
        """The largest useful `unfreeze`: every stage and the stem train."""
        return len(self.stage_names)

    def stage_modules(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """The modules of each stage of `model`, keyed and ordered as `stage_names`."""
        modules = {
            stage.path: [model.get_submodule(path) for path in (stage.path, *stage.extra)]
            for stage in self.stages
        }
        modules[STEM] = [model.get_submodule(path) for path in self.stem]
        return modules

    def get_classifier(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head)

    def reset_classifier(self, model: nn.Module, head: nn.Module) -> None:
        """Put `head` where the classifier is (the pretrained one is dropped)."""
        _replace(model, self.head, head)

    def to_nchw(self, features: torch.Tensor) -> torch.Tensor:
        """A stage output as (N, C, H, W): token maps (N, H, W, C) are permuted, for Grad-CAM."""
        return features.permute(0, 3, 1, 2) if self.channels_last else features


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _resnet(name: str, weights: str, resize_size: int = 256) -> Arch:
    # torchvision's ResNet: conv1/bn1/relu/maxpool, layer1..layer4 (strides 4..32), avgpool, fc.
    return Arch(
        name=name,
        weights=weights,
        head="fc",
        stem=("conv1", "bn1"),
        stages=(
            Stage("layer4", 32),
            Stage("layer3", 16),
            Stage("layer2", 8),
            Stage("layer1", 4),
        ),
        small_stem=SmallStem(conv="conv1", norm="bn1", pool="maxpool"),
        resize_size=resize_size,  # the IMAGENET1K_V2 weights (ResNet-50 up) resize to 232
    )


def _densenet(name: str, weights: str) -> Arch:
    # features: conv0/norm0/relu0/pool0, denseblock1..4 with transition1..3 after the first
    # three (timm groups each transition with the block before it), norm5; then classifier.
    # Each transition halves the map by a 2x2 average pool without padding, so the ImageNet
    # stem needs 29 px: from 28 px the map is 7, 3, 1 and then 0 wide.
    return Arch(
        name=name,
        weights=weights,
        head="classifier",
        stem=("features.conv0", "features.norm0"),
        stages=(
            Stage("features.denseblock4", 32, ("features.norm5",)),
            Stage("features.denseblock3", 16, ("features.transition3",)),
            Stage("features.denseblock2", 8, ("features.transition2",)),
            Stage("features.denseblock1", 4, ("features.transition1",)),
        ),
        small_stem=SmallStem(conv="features.conv0", norm="features.norm0", pool="features.pool0"),
        min_size=29,
    )


# torchvision's EfficientNets: features.0 is the stride-2 stem, then one Sequential per
# stage (B0-B3: 7, V2-S: 6), then a 1x1 head convolution; the classifier is (Dropout, Linear).
# Each stage's stride with the ImageNet stem, stem end first, from torchvision's block configs.
_EFFICIENTNET_REDUCTIONS = (2, 4, 8, 16, 16, 32, 32)
_EFFICIENTNET_V2_S_REDUCTIONS = (2, 4, 8, 16, 16, 32)


def _efficientnet(
    name: str,
    weights: str,
    reductions: tuple[int, ...],
    input_size: int,
    resize_size: int,
    interpolation: str,
) -> Arch:
    head_conv = len(reductions) + 1
    return Arch(
        name=name,
        weights=weights,
        head="classifier.1",
        stem=("features.0",),
        stages=(
            Stage(f"features.{head_conv}", 32),
            *(Stage(f"features.{i}", reductions[i - 1]) for i in range(len(reductions), 0, -1)),
        ),
        small_stem=SmallStem(conv="features.0.0", norm="features.0.1", gain=2),
        input_size=input_size,
        resize_size=resize_size,
        interpolation=interpolation,
    )


def _convnext(name: str, weights: str) -> Arch:
    # features: 0 the 4x4/4 patchify stem (conv, LayerNorm2d), 1/3/5/7 the stages, 2/4/6 the
    # downsampling layers before them (timm puts each in the stage it feeds); classifier is
    # (LayerNorm2d, Flatten, Linear). The 2x2/2 downsampling layers do not pad, so the
    # ImageNet stem needs 32 px (an 8x8 map after the stem).
    return Arch(
        name=name,
        weights=weights,
        head="classifier.2",
        stem=("features.0",),
        stages=(
            Stage("features.7", 32, ("features.6", "classifier.0")),
            Stage("features.5", 16, ("features.4",)),
            Stage("features.3", 8, ("features.2",)),
            Stage("features.1", 4),
        ),
        small_stem=SmallStem(conv="features.0.0", norm="features.0.1"),
        min_size=32,
        resize_size=236 if name == "convnext_tiny" else 230,
    )


def _mobilenet_v3_large() -> Arch:
    # features: 0 the stride-2 stem, 1..15 inverted-residual blocks (stride 2 at 2, 4, 7, 13),
    # 16 a 1x1 convolution; classifier is (Linear 960->1280, Hardswish, Dropout, Linear). The
    # blocks are grouped by output stride; the pretrained 960->1280 layer trains with the last.
    return Arch(
        name="mobilenet_v3_large",
        weights="MobileNet_V3_Large_Weights",
        head="classifier.3",
        stem=("features.0",),
        stages=(
            Stage("features.16", 32, ("classifier.0",)),
            Stage("features.15", 32, ("features.13", "features.14")),
            Stage("features.12", 16, tuple(f"features.{i}" for i in range(7, 12))),
            Stage("features.6", 8, ("features.4", "features.5")),
            Stage("features.3", 4, ("features.2",)),
            Stage("features.1", 2),
        ),
        small_stem=SmallStem(conv="features.0.0", norm="features.0.1", gain=2),
        resize_size=232,
    )


def _swin_t() -> Arch:
    # features: 0 the 4x4/4 patch embedding (conv, permute, LayerNorm), 1/3/5/7 the stages
    # with 2/4/6 the patch merging before them; then norm, permute, pool and head. Stage
    # outputs are (N, H, W, C); windows pad small maps, so 8 px runs (a 2x2 then 1x1 map).
    # No small stem: the patch embedding is the tokeniser the attention weights were fit to.
    return Arch(
        name="swin_t",
        weights="Swin_T_Weights",
        head="head",
        stem=("features.0",),
        stages=(
            Stage("features.7", 32, ("features.6", "norm")),
            Stage("features.5", 16, ("features.4",)),
            Stage("features.3", 8, ("features.2",)),
            Stage("features.1", 4),
        ),
        small_stem=None,
        channels_last=True,
        resize_size=232,
        interpolation="bicubic",
    )


# The architecture table: `model.arch`'s allowed values, in the order the config lists them.
ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        _resnet("resnet18", "ResNet18_Weights"),
        _resnet("resnet34", "ResNet34_Weights"),
        _resnet("resnet50", "ResNet50_Weights", 232),
        _resnet("resnet101", "ResNet101_Weights", 232),
        _resnet("resnet152", "ResNet152_Weights", 232),
        _densenet("densenet121", "DenseNet121_Weights"),
        _densenet("densenet169", "DenseNet169_Weights"),
        _efficientnet(
            "efficientnet_b0",
            "EfficientNet_B0_Weights",
            _EFFICIENTNET_REDUCTIONS,
            224,
            256,
            "bicubic",
        ),
        _efficientnet(
            "efficientnet_b1",
            "EfficientNet_B1_Weights",
            _EFFICIENTNET_REDUCTIONS,
            240,
            255,
            "bilinear",
        ),
        _efficientnet(
            "efficientnet_b2",
            "EfficientNet_B2_Weights",
            _EFFICIENTNET_REDUCTIONS,
            288,
            288,
            "bicubic",
        ),
        _efficientnet(
            "efficientnet_b3",
            "EfficientNet_B3_Weights",
            _EFFICIENTNET_REDUCTIONS,
            300,
            320,
            "bicubic",
        ),
        _efficientnet(
            "efficientnet_v2_s",
            "EfficientNet_V2_S_Weights",
            _EFFICIENTNET_V2_S_REDUCTIONS,
            384,
            384,
            "bilinear",
        ),
        _convnext("convnext_tiny", "ConvNeXt_Tiny_Weights"),
        _convnext("convnext_small", "ConvNeXt_Small_Weights"),
        _mobilenet_v3_large(),
        _swin_t(),
    )
}


def arch_of(model: nn.Module) -> Arch:
    """The `ARCHS` row `build_model` built `model` from.

    Raises:
        ValueError: `model` was not built by `build_model` (a programming error).
    """
    name = getattr(model, ARCH_ATTRIBUTE, None)
    if name not in ARCHS:
        raise ValueError(f"{type(model).__name__} was not built by distmed.model.build_model")
    return ARCHS[name]


def _torchvision_models():
    # Imported on first use: every Ray process that unpickles the training function imports
    # this module (trial, controller and worker actors), only the workers build models, and
    # torchvision drags in torch._dynamo (~1.7 s of CPU per process on 2 cores).
    from torchvision import models

    return models


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The `cfg.arch` backbone with pretrained (or no) weights, a `num_classes` head and
    frozen stages; it carries its row's name (`arch_of`)."""
    arch = ARCHS[cfg.arch]
    model = _torchvision_models().get_model(arch.name, weights=None)
    load_backbone_weights(model, cfg)
    if cfg.weights == "none":
        use_scratch_norm_momentum(model)
    if cfg.stem == "small":
        use_small_stem(model, arch)
    in_features = cast(nn.Linear, arch.get_classifier(model)).in_features
    arch.reset_classifier(model, build_head(cfg, in_features, num_classes))
    apply_freeze(model, arch, cfg.stages_trained, new_stem=cfg.stem == "small")
    setattr(model, ARCH_ATTRIBUTE, arch.name)
    setattr(model, NORMALIZATION_ATTRIBUTE, input_normalization(cfg))
    return model


# PyTorch's BatchNorm default: the share of each batch's statistics in the running estimate.
SCRATCH_NORM_MOMENTUM = 0.1


def use_scratch_norm_momentum(model: nn.Module) -> None:
    """Give every BatchNorm of a randomly initialised backbone PyTorch's momentum 0.1.

    torchvision builds MobileNet-V3 and EfficientNet-B5 up / V2 with momentum 0.01, the
    ImageNet recipe of hundreds of thousands of steps. After the few dozen to few hundred
    steps of a search trial from random init, their running statistics are still mostly
    their initial (0, 1) (0.99^n of it after n steps), so eval-mode outputs (validation,
    test, predict) are nearly constant. Measured (benchmarks/BENCHMARKS.md part 9):
    MobileNet-V3-Large after one epoch (41 steps, batch 64) on PneumoniaMNIST at 28 px,
    validation ROC-AUC 0.651 in eval mode with 0.01 and 0.977 with 0.1 (0.975 with batch
    statistics). Pretrained backbones keep their momentum: their running statistics start
    from the weights' data, and no measurement here says fine-tuning needs otherwise.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = SCRATCH_NORM_MOMENTUM


def input_normalization(cfg: ModelConfig) -> Normalization:
    """The (mean, std) a `cfg` network's inputs are normalised with, per RGB channel.

    With pretrained weights (`imagenet`, or a local file of the row's network) the row's
    weights' own, as timm's `pretrained_cfg` records them; from random init (`none`)
    ImageNet's, what every row used before. The saved model records the pair
    (`Preprocessing.mean/std`), so predict, evaluate and export normalise alike.
    """
    if cfg.weights == "none":
        return IMAGENET_MEAN, IMAGENET_STD
    arch = ARCHS[cfg.arch]
    return arch.mean, arch.std


def network_normalization(model: nn.Module) -> Normalization:
    """The (mean, std) `model`'s inputs are normalised with: what `build_model` (or loading
    a saved model) left on it; ImageNet's for any other network."""
    return cast(
        "Normalization", getattr(model, NORMALIZATION_ATTRIBUTE, (IMAGENET_MEAN, IMAGENET_STD))
    )


def use_small_stem(model: nn.Module, arch: Arch) -> None:
    """A 3x3 stride-1 first convolution (and no max-pool), at `arch.small_stem`'s paths.

    The ImageNet stem of a ResNet divides a 28 px image by 4 before its first stage, leaving
    the last stage a 1x1 map; this stem keeps `gain` (4; 2 for the EfficientNets and
    MobileNet, whose stem has no pool) times more resolution through every stage, at about
    `gain`**2 the compute at the same input size. The pretrained strided kernel does not fit,
    so the new convolution and its norm (the row's own kind, reset) start fresh, like the head.

    Raises:
        ValueError: the row has no small stem (the config refuses `stem: small` for it).
    """
    cut = arch.small_stem
    if cut is None:
        raise ValueError(f"{arch.name} has no small stem")
    out_channels = cast(nn.Conv2d, model.get_submodule(cut.conv)).out_channels
    conv = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    _replace(model, cut.conv, conv)
    norm = copy.deepcopy(model.get_submodule(cut.norm))  # BatchNorm2d, or ConvNeXt's LayerNorm2d
    norm.reset_parameters()  # type: ignore[operator]
    _replace(model, cut.norm, norm)
    if cut.pool is not None:
        _replace(model, cut.pool, nn.Identity())


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
    """Fill the backbone (including the ImageNet head, replaced afterwards) from `cfg.weights`."""
    if cfg.weights == "none":
        return
    if cfg.weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(ARCHS[cfg.arch]))
        return
    path = Path(cfg.weights).expanduser()
    try:
        model.load_state_dict(read_state_dict(path, cfg.weights_sha256), strict=True)
    except RuntimeError as exc:  # torch lists missing/unexpected keys and shape mismatches
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:160]
        head = f"size mismatch for {ARCHS[cfg.arch].head}."
        hint = (
            "a backbone file keeps torchvision's 1000-class ImageNet head (a distmed "
            "best_model.pt is a trained model for evaluate/predict, not model.weights)"
            if head in str(exc)
            else "check model.arch or the file"
        )
        raise UserError(
            f"model.weights {path}: does not fit {cfg.arch} ({detail}); {hint}"
        ) from exc


def _imagenet_state_dict(arch: Arch) -> dict[str, torch.Tensor]:
    weights = getattr(_torchvision_models(), arch.weights).DEFAULT
    try:
        # torchvision downloads once into its own cache (TORCH_HOME) and checks the hash.
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"model.weights=imagenet: could not download {weights} ({type(exc).__name__}: "
            "offline?); connect to the internet once (torchvision keeps it in $TORCH_HOME), "
            "or give a local copy: model.weights=PATH model.weights_sha256=HEX (or "
            "model.weights=none, e.g. --space scratch)"
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
    # Saved from a DDP or DataParallel wrapper: every key starts with `module.`.
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        consume_prefix_in_state_dict_if_present(state, "module.")
    return state


def apply_freeze(model: nn.Module, arch: Arch, unfreeze: int, new_stem: bool = False) -> None:
    """Train the head plus the last `unfreeze` stages of `arch`; everything else is frozen.

    A freshly initialised stem (`new_stem`) always trains: frozen random filters would
    feed noise to every later stage.
    """
    frozen = frozen_stages(arch, unfreeze, new_stem)
    for name, modules in arch.stage_modules(model).items():
        for module in modules:
            module.requires_grad_(name not in frozen)


def frozen_stages(arch: Arch, unfreeze: int, new_stem: bool = False) -> list[str]:
    """The stages `apply_freeze` freezes, head end first (a new stem always trains)."""
    trainable = set(arch.stage_names[:unfreeze]) | ({STEM} if new_stem else set())
    return [stage for stage in arch.stage_names if stage not in trainable]


def warn_frozen_random_stages(cfg: ModelConfig, lowest_unfreeze: int | None = None) -> None:
    """Log a warning when `weights: none` meets an `unfreeze` that freezes stages.

    Freezing keeps pretrained features; without pretrained weights a frozen stage keeps its
    random init for the whole run, which handicaps the model instead of choosing a
    transfer-learning depth. Not an error: it is a valid (if rarely wanted) experiment.
    `lowest_unfreeze` is the smallest value a search can draw, when it searches `unfreeze`.
    """
    if cfg.weights != "none":
        return
    arch = ARCHS[cfg.arch]
    unfreeze = cfg.stages_trained if lowest_unfreeze is None else lowest_unfreeze
    frozen = frozen_stages(arch, unfreeze, new_stem=cfg.stem == "small")
    if not frozen:
        return
    if lowest_unfreeze is None:
        where, fix = f"model.unfreeze={unfreeze}", f"set model.unfreeze={arch.depth}"
    else:
        where = f"model.unfreeze searched down to {unfreeze} in {cfg.arch}"
        fix = "take it out of the space"
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


def trainable_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers with running statistics whose parameters train (`set_train_mode`
    keeps the others in eval mode: a frozen stage's statistics stay as they are)."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and any(p.requires_grad for p in module.parameters())
    ]


@torch.no_grad()
def recompute_batchnorm_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set each trainable BatchNorm's running mean/variance to the exact statistics of its
    input over `batches` under the current weights ("precise BN": Wu & Johnson 2021,
    "Rethinking 'Batch' in BatchNorm", sec. 3; pycls/fvcore's `update_bn_stats`).

    `batches`: model inputs (B, C, H, W) as the model takes them (normalised, on its device,
    in its memory format; an autocast context around the call applies). The forward passes
    run without gradients, with only those BatchNorm layers in training mode (each batch
    normalised by its own statistics, as in training): dropout and stochastic depth stay in
    eval mode, since they change the activations' statistics, and frozen BatchNorm layers keep
    their running statistics. Each layer's input is pooled over every image and position:
    running_mean is its per-channel mean and running_var its unbiased variance over all of
    them (float64 sums), not an average of per-batch variances (torch's `update_bn` with
    momentum None), so the result does not depend on how the images are batched. Each
    module's training mode, the layers' momenta and `num_batches_tracked` are restored; if
    a forward pass fails, the running statistics are left as they were.

    Cost: one forward pass over the images, no backward. Returns the images seen; with none
    (or no trainable BatchNorm: ConvNeXt and Swin use LayerNorm) nothing changes.
    """
    norms = trainable_batchnorms(model)
    if not norms:
        return 0
    # Per layer: per-channel sum and sum of squares of its input, and the values per channel.
    sums: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def accumulate(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().double().transpose(0, 1).flatten(1)  # (C, N * positions)
        total, squares, count = sums.get(module, (0.0, 0.0, 0))
        sums[module] = (total + x.sum(dim=1), squares + (x * x).sum(dim=1), count + x.shape[1])

    modes = {module: module.training for module in model.modules()}
    saved = [(n, n.momentum, n.num_batches_tracked.clone()) for n in norms]  # type: ignore[union-attr]
    hooks = [n.register_forward_pre_hook(accumulate) for n in norms]
    images = 0
    try:
        model.eval()
        for norm in norms:
            norm.train()
            norm.momentum = 0.0  # the forward leaves the running statistics as they are
        for inputs in batches:
            model(inputs)
            images += len(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
        for norm, momentum, tracked in saved:
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(tracked)  # type: ignore[union-attr]
    for layer, (total, squares, count) in sums.items():
        _set_running_statistics(layer, total, squares, count)
    return images


def _set_running_statistics(
    norm: nn.Module, total: torch.Tensor, squares: torch.Tensor, count: int
) -> None:
    mean = total / count
    # Unbiased, as BatchNorm's own running_var update (Bessel's correction).
    var = (squares - count * mean * mean).clamp_min(0) / max(count - 1, 1)
    norm.running_mean.copy_(mean)  # type: ignore[operator]
    norm.running_var.copy_(var)  # type: ignore[operator]
