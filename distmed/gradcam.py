"""Grad-CAM heat maps over the last residual stage, via the maintained `grad-cam` package.

Takes decoded uint8 images (what the cache and `decode_image` produce), applies the
training normalisation, and returns heat maps plus coloured overlays for people to look at.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from distmed.data import to_model_input


def gradcam_maps(model: torch.nn.Module, images: np.ndarray, targets: list[int]) -> np.ndarray:
    """Heat maps in [0, 1], shape (N, S, S), for uint8 `images` (N, C, S, S) and classes.

    The target layer is `layer4[-1]` of a torchvision ResNet: the last block whose
    feature map still has spatial extent.
    """
    device = next(model.parameters()).device
    inputs = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(device))
    with GradCAM(model=model.eval(), target_layers=[model.layer4[-1]]) as cam:
        maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(t) for t in targets])
    return np.asarray(maps, dtype=np.float32)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A uint8 (S, S, 3) picture: the image (C, S, S) with its heat map (S, S) on top."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    base = rgb.transpose(1, 2, 0).astype(np.float32) / 255.0
    return show_cam_on_image(base, heat, use_rgb=True, image_weight=0.6)
