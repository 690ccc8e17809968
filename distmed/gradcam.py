"""Grad-CAM heat maps of a distmed network, via the maintained `grad-cam` package.

Takes decoded uint8 images (what the cache and `decode_image` produce), applies the
training normalisation, and returns heat maps plus coloured overlays for people to look at.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from distmed.data import to_model_input
from distmed.inference import members
from distmed.model import ARCHS, arch_of, network_normalization

MIN_CAM_SIDE = 4  # a 1x1 or 2x2 map cannot say where in the image the evidence is
# A map whose values span less than this says nothing about where: pytorch-grad-cam scales
# each map to [0, 1] by its own range, and returns all zeros when that range is zero.
FLAT_MAP_RANGE = 1e-6
FLAT_MAP_NOTE = "flat map: no gradient toward this class"


def cam_layer(arch: str, image_size: int) -> str:
    """The deepest stage of `arch` whose feature map is at least MIN_CAM_SIDE pixels wide.

    The last stage for large inputs (the usual Grad-CAM choice: for a ResNet from 128 px up);
    at 28-32 px that map is 1x1, so a shallower, coarser-meaning but spatially resolved
    stage is used instead. A stage with stride r sees ceil(size / r) pixels (the table's
    `Stage.reduction`); the shallowest stage is the last resort.
    """
    stages = ARCHS[arch].stages
    for stage in stages:
        if math.ceil(image_size / stage.reduction) >= MIN_CAM_SIDE:
            return stage.path
    return stages[-1].path


def gradcam_maps(model: torch.nn.Module, images: np.ndarray, targets: list[int]) -> np.ndarray:
    """Heat maps in [0, 1], shape (N, S, S), for uint8 `images` (N, C, S, S) and classes.

    `model` is a network from `distmed.model.build_model` or a
    `distmed.inference.InferenceModel`; for a fold ensemble the members' maps are averaged
    (each member explains the same target class).
    """
    networks = members(model)
    return np.mean([_one_network(net, images, targets) for net in networks], axis=0)


def _one_network(model: torch.nn.Module, images: np.ndarray, targets: list[int]) -> np.ndarray:
    device = next(model.parameters()).device
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    inputs = to_model_input(batch, None, *network_normalization(model))
    # A fine-tuned model may have its early stages frozen (`model.unfreeze`); with an input
    # that asks for no gradient either, nothing would flow back to a frozen CAM stage.
    inputs.requires_grad_(True)
    arch = arch_of(model)
    # The stage itself, not its last child: a DenseNet block's output is the concatenation of
    # its layers, an inverted-residual block's adds its input back. Token maps (Swin) are
    # (N, H, W, C) and go to pytorch-grad-cam as (N, C, H, W) through its reshape_transform.
    stage = model.get_submodule(cam_layer(arch.name, images.shape[-1]))
    reshape = arch.to_nchw if arch.channels_last else None
    with GradCAM(model=model.eval(), target_layers=[stage], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(t) for t in targets])
    return np.asarray(maps, dtype=np.float32)


def is_flat(heat: np.ndarray) -> bool:
    """Whether a heat map (any shape) is (near) constant: max - min < FLAT_MAP_RANGE.

    pytorch-grad-cam gives such a map when the class score's gradients at the CAM stage
    are all zero, or when the ReLU of the weighted activations is zero everywhere (the
    stage's evidence all points away from the class); its overlay is a uniform wash.
    """
    return bool(np.ptp(heat) < FLAT_MAP_RANGE) if heat.size else True


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A uint8 (S, S, 3) picture: the image (C, S, S) with its heat map (S, S) on top."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    base = rgb.transpose(1, 2, 0).astype(np.float32) / 255.0
    return show_cam_on_image(base, heat, use_rgb=True, image_weight=0.6)
