"""One image file -> a uint8 array (grey or RGB, resized), and a split's files -> one stacked
array with the unreadable files named. No cache, no torch datasets: just decoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from distmed.data.index import Split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def unreadable_message(bad: dict[str, str]) -> str:
    """One line naming the unreadable files (the first five) and the two ways on."""
    items = [f"{sample_id} ({reason})" for sample_id, reason in bad.items()]
    shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    return (
        f"{len(items)} unreadable image file(s): {shown}; fix or remove them, "
        "or set data.skip_invalid=true to leave them out"
    )


def decode_split(split: Split, size: int) -> tuple[np.ndarray | None, dict[str, str]]:
    """The readable images of a split as uint8 (N, C, size, size), and the unreadable ones.

    C = 1 when every image is grey. Returns (None, bad) when no image can be read.
    """
    if split.images is not None:
        return resize_array(split.images, size), {}
    decoded, bad = [], {}
    for sample_id, path in zip(split.ids, split.paths or [], strict=True):
        try:
            decoded.append(decode_image(path, size))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            bad[sample_id] = _reason(path, exc)
    if not decoded:
        return None, bad
    colour = any(img.ndim == 3 for img in decoded)
    if colour:
        decoded = [
            np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img for img in decoded
        ]
        return np.stack(decoded).transpose(0, 3, 1, 2).copy(), bad
    return np.stack(decoded)[:, None], bad


def _reason(path: Path, exc: Exception) -> str:
    if path.stat().st_size == 0:
        return "empty file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    return f"truncated or corrupt: {type(exc).__name__}"


def decode_image(path: Path, size: int) -> np.ndarray:
    """One file -> uint8 (size, size) grey or (size, size, 3) RGB.

    16-bit and float images are min-max scaled per image: their useful range rarely
    spans the full container (12-bit X-rays in 16-bit PNGs), and a fixed divide would
    leave them nearly black.
    """
    with Image.open(path) as img:
        img = to_grey_or_rgb(img)
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8)


def to_grey_or_rgb(img: Image.Image) -> Image.Image:
    """A loaded image as 8-bit `L` (grey, 16-bit/float min-max scaled) or `RGB`, full size."""
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255 if high > low else values * 0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode in ("1", "L", "LA", "P") and _is_grey(img):
        return img.convert("L")
    return img.convert("RGB")


def _is_grey(img: Image.Image) -> bool:
    if img.mode != "P":
        return True
    palette = np.asarray(img.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    return bool((palette == palette[:, :1]).all())


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, C, size, size) uint8, resized in batches with torch."""
    array = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if array.shape[-1] == size and array.shape[-2] == size:
        return np.ascontiguousarray(array, dtype=np.uint8)
    out = np.empty((len(array), array.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(array), 1024):
        chunk = torch.from_numpy(np.ascontiguousarray(array[start : start + 1024])).float()
        resized = torch.nn.functional.interpolate(
            chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + 1024] = resized.round().clamp(0, 255).to(torch.uint8).numpy()
    return out
