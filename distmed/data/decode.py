"""The one decoder: an image file (what Pillow reads, or DICOM through `dicom`) -> a uint8
array (grey or RGB, resized) as the scanner or camera meant it, for the cache, predict, the app
and Grad-CAM alike; stacks, animations and volumes refused by name. Also a split's files -> one
stacked array with the unreadable files named. No cache, no torch.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# `patient_id`, `read_dicom` and `UnreadableImage` are re-exported: callers know them from here.
from distmed.data.dicom import (
    DICOM_EXTENSIONS,
    DicomPixels,
    has_dicom_preamble,
    is_dicom,
    read_pixels,
)
from distmed.data.dicom import patient_id as patient_id
from distmed.data.dicom import read_dicom as read_dicom
from distmed.data.index import Split
from distmed.data.settings import DecodeSettings
from distmed.data.volumes import VOLUME_EXTENSIONS, suffix_of, volume_reason
from distmed.errors import UnreadableImage, UserError

# Read by Pillow (WebP, AVIF: phone and web photos; AVIF/HEIC where this Pillow decodes it).
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".avif", ".heic", ".heif",
    ".jp2", ".j2k",
)  # fmt: skip
# The suffixes of image files (what messages list); DICOM files without one are found by their
# preamble.
FILE_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS
# Every suffix that marks a file to index: volumes too, to be refused by name, not skipped unseen.
INDEXED_EXTENSIONS = FILE_EXTENSIONS + VOLUME_EXTENSIONS
PIL_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# Formats whose extra frames are the same picture (MPO: a phone's preview or depth map).
FIRST_FRAME_FORMATS = ("MPO",)
# Why Pillow may not know a file that is an image: formats it decodes only in some builds.
NOT_DECODED_HERE = {
    ".heic": "HEIC/HEIF photo that Pillow does not decode; convert it to JPEG or PNG",
    ".heif": "HEIC/HEIF photo that Pillow does not decode; convert it to JPEG or PNG",
    ".avif": "AVIF image that this Pillow does not decode (Pillow 11.2 or later does); "
    "convert it to JPEG or PNG",
    ".jp2": "JPEG 2000 image that this Pillow does not decode (built without OpenJPEG)",
    ".j2k": "JPEG 2000 image that this Pillow does not decode (built without OpenJPEG)",
}
# PIL's own bomb check is a global; we switch it off only while opening (our limit applies).
_OPEN_LOCK = threading.Lock()
# Percentiles are taken on at most this many pixels (a regular subsample): exact enough for
# 0.5-99.5 and ~20x cheaper than sorting a 3000 x 3000 image.
PERCENTILE_SAMPLE = 262_144

log = logging.getLogger(__name__)


def as_options(options: DecodeSettings | int) -> DecodeSettings:
    """A bare size means the default settings at that size. Not validated: the decoder takes
    any size (tests decode 4 px); the config and a saved model hold theirs to `ImageSize`."""
    if isinstance(options, int):
        return DecodeSettings.model_construct(image_size=options)
    return options


def unreadable_message(bad: dict[str, str], can_skip: bool = True) -> str:
    """One line naming the unreadable files (the first five) and the ways on (leaving them
    out only when `can_skip`: something readable is left)."""
    items = [f"{sample_id} ({reason})" for sample_id, reason in bad.items()]
    shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    if not can_skip:
        return f"{len(items)} unreadable image file(s): {shown}"
    return (
        f"{len(items)} unreadable image file(s): {shown}; fix or remove them, "
        "or leave them out: data.skip_invalid=true (distmed.evaluate: --skip-invalid)"
    )


# --------------------------------------------------------------------------- which files


def is_image_file(path: Path) -> bool:
    """A file to index: an image or volume by its suffix, or DICOM by its content (PACS
    exports have no suffix). Volumes are indexed so that decoding refuses them by name."""
    return suffix_of(path) in INDEXED_EXTENSIONS or has_dicom_preamble(path)


# --------------------------------------------------------------------------- splits


def decode_split(
    split: Split, options: DecodeSettings | int
) -> tuple[np.ndarray | None, dict[str, str]]:
    """The readable images of a split as uint8 (N, C, size, size), and the unreadable ones.

    C = 1 when every image is grey. Returns (None, bad) when no image can be read. Holds
    every image in memory: the cache decodes in parallel into a file instead (`cache`).
    """
    opts = as_options(options)
    if split.images is not None:
        return resize_array(split.images, opts.image_size), {}
    decoded, bad = [], {}
    for sample_id, path in zip(split.ids, split.paths or [], strict=True):
        image, reason = try_decode(path, opts)
        if image is None:
            bad[sample_id] = reason
        else:
            decoded.append(image)
    if not decoded:
        return None, bad
    colour = any(img.ndim == 3 for img in decoded)
    if colour:
        decoded = [
            np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img for img in decoded
        ]
        return np.stack(decoded).transpose(0, 3, 1, 2).copy(), bad
    return np.stack(decoded)[:, None], bad


def try_decode(path: Path, options: DecodeSettings | int) -> tuple[np.ndarray | None, str]:
    """`decode_image`, or (None, the reason) for a file that cannot be used.

    Any exception a decoder raises on one file becomes that file's reason (the caller names
    the file), so one bad file never stops the others; only a `UserError` (a missing
    package, the same for every file) is raised.
    """
    try:
        return decode_image(path, options), ""
    except UserError:
        raise
    except Exception as exc:  # Pillow, pydicom and their plugins raise many kinds
        log.debug("cannot decode %s", path, exc_info=True)
        return None, _reason(path, exc)


# What broken image bytes raise inside Pillow and its codecs.
CORRUPT_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error)


def _reason(path: Path, exc: Exception) -> str:
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError as stat_error:
        return f"cannot read: {stat_error.strerror or stat_error}"
    if isinstance(exc, UnreadableImage):
        return str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return NOT_DECODED_HERE.get(suffix_of(path), "not an image")
    if isinstance(exc, CORRUPT_ERRORS):
        return f"truncated or corrupt: {type(exc).__name__}"
    text = " ".join(str(exc).split())[:120]
    return f"decoder error: {type(exc).__name__}" + (f": {text}" if text else "")


def decode_rows(
    stage: Path, job: list[tuple[int, str]], options: DecodeSettings
) -> list[tuple[int, bool, str]]:
    """Decode files into their rows of a (N, 3, S, S) uint8 .npy: (position, colour, reason).

    The cache's worker function (it runs in spawned processes: this module imports no torch).
    Grey images fill channel 0 only; the cache repeats it when the set is colour.
    """
    return fill_rows(stage, ((p, partial(try_decode, Path(path), options)) for p, path in job))


def fill_rows(
    stage: Path, rows: Iterable[tuple[int, Callable[[], tuple[np.ndarray | None, str]]]]
) -> list[tuple[int, bool, str]]:
    """Write each decoded image into its row of the (N, 3, S, S) uint8 staging .npy.

    `rows`: (position, decode) pairs; decode() gives (image (S, S) or (S, S, 3), "") or
    (None, reason). Returns (position, colour, reason) per row. Grey images fill channel 0
    only (the cache repeats it when the set is colour). Shared by the file and the bucket
    workers (`objects.object_rows`).
    """
    array = np.load(stage, mmap_mode="r+")
    out = []
    try:
        for position, decode in rows:
            image, reason = decode()
            if image is None:
                out.append((position, False, reason))
            elif image.ndim == 2:
                array[position, 0] = image
                out.append((position, False, ""))
            else:
                array[position] = image.transpose(2, 0, 1)
                out.append((position, True, ""))
        array.flush()
    finally:
        del array  # unmap: the written pages leave this process's memory
    return out


# --------------------------------------------------------------------------- one file


def decode_image(path: Path, options: DecodeSettings | int) -> np.ndarray:
    """One file -> uint8 (size, size) grey or (size, size, 3) RGB.

    EXIF orientation is applied; 16-bit, float and DICOM pixels, and colour with 16 bits per
    sample, are scaled by the intensity policy (non-finite pixels masked first); files over
    `max_pixels` are decoded reduced (JPEG) or refused by name, as are stacks, animations and
    volumes.

    Raises:
        UnreadableImage: the file is not a usable 2-D image (the message says why).
        OSError, UnidentifiedImageError, ValueError (and others): a decoder failed on it.
        UserError: a DICOM file and no pydicom installed.
    """
    opts = as_options(options)
    refused = volume_reason(path)
    if refused:
        raise UnreadableImage(refused)
    if is_dicom(path):
        return fit_size(dicom_image(path, opts), opts)
    with open_image(path, opts) as img:
        return fit_size(load_image(img, path, opts), opts)


@contextmanager
def open_image(path: Path, opts: DecodeSettings) -> Iterator[Image.Image]:
    """An opened PIL image (pixels not loaded): one frame, size-checked against `max_pixels`,
    JPEG drafted."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format not in FIRST_FRAME_FORMATS:
            raise UnreadableImage(_frames_message(img.format or "?", frames))
        if img.format == "JPEG":
            # DCT scaling while decoding: 1/2, 1/4 or 1/8 of the pixels, never below `size`.
            img.draft(None, (opts.image_size, opts.image_size))
        width, height = img.size
        if width * height > opts.max_pixels:
            raise UnreadableImage(
                f"{width}x{height} = {width * height / 1e6:.0f} M pixels, over "
                f"data.max_pixels ({opts.max_pixels / 1e6:g} M); downscale the file or raise "
                "data.max_pixels"
            )
        yield img


def _frames_message(fmt: str, frames: int) -> str:
    if fmt == "TIFF":
        return f"multi-page TIFF ({frames} pages): a 3-D stack; save one 2-D image per file"
    kind = {"PNG": "animated PNG", "WEBP": "animated WebP", "AVIF": "AVIF image sequence"}
    return (
        f"{kind.get(fmt, f'animated {fmt}')} ({frames} frames): a cine loop or stack, not one "
        "2-D image; save one frame per file"
    )


def load_image(img: Image.Image, path: Path, opts: DecodeSettings) -> Image.Image:
    """An opened image as 8-bit `L` or `RGB`, upright (EXIF orientation applied)."""
    if img.mode in ("RGB", "RGBA", "LA") and bits_per_sample(img) > 8:
        return deep_colour_image(img, path, opts)
    ImageOps.exif_transpose(img, in_place=True)  # loads the pixels
    return to_grey_or_rgb(img, opts)


def bits_per_sample(img: Image.Image) -> int:
    """Bits per sample as stored: from a PNG's or TIFF's raw mode (`RGB;16B`: 16, `L;4`: 4),
    else from Pillow's mode. (Other formats' raw modes count packed pixels: BMP `BGR;16`.)"""
    found = re.search(r";(\d+)", _raw_mode(img)) if img.format in ("PNG", "TIFF") else None
    if found:
        return int(found.group(1))
    return {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(img.mode, 8)


def _raw_mode(img: Image.Image) -> str:
    """The raw mode of the file's first tile (what its bytes hold), or "" if not known."""
    for tile in getattr(img, "tile", []):  # an opened file's ImageFile attribute
        args = tile.args
        if isinstance(args, str):
            return args
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            return args[0]
    return ""


def deep_colour_image(img: Image.Image, path: Path, opts: DecodeSettings) -> Image.Image:
    """A colour (or grey + alpha) file with 16 bits per sample, scaled like 16-bit grey.

    Pillow keeps only the top 8 bits of such samples (12-bit data turns nearly black), so
    OpenCV (a dependency of grad-cam) reads the full values; the intensity policy then scales
    all channels with one range, as for 16-bit grey, and the EXIF orientation is applied.
    """
    import cv2

    array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16:
        raise UnreadableImage(
            f"{img.format} with {bits_per_sample(img)} bits per colour sample that OpenCV "
            "cannot read; save it as 8-bit RGB or 16-bit grey"
        )
    if array.ndim == 3:
        # OpenCV gives BGR(A); a grey + alpha file comes back as grey or BGRA.
        array = array[..., 0] if img.mode in ("L", "LA") else array[..., 2::-1]
    unit = scale_intensity(array.astype(np.float32), opts)
    out = Image.fromarray((unit * 255).round().astype(np.uint8), "L" if unit.ndim == 2 else "RGB")
    out.info["exif"] = img.getexif().tobytes()
    ImageOps.exif_transpose(out, in_place=True)
    return out


def to_grey_or_rgb(img: Image.Image, opts: DecodeSettings | None = None) -> Image.Image:
    """A loaded image as 8-bit `L` (grey; 16-bit/float scaled by the policy) or `RGB`."""
    opts = opts or DecodeSettings()
    img.load()
    if img.mode in PIL_DEEP_MODES:
        return grey_image(scale_intensity(np.asarray(img, dtype=np.float32), opts))
    if img.mode in ("1", "L", "LA", "P") and _is_grey(img):
        return img.convert("L")
    return img.convert("RGB")


def _is_grey(img: Image.Image) -> bool:
    if img.mode != "P":
        return True
    palette = np.asarray(img.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    return bool((palette == palette[:, :1]).all())


def grey_image(unit: np.ndarray) -> Image.Image:
    """Values in [0, 1] -> an 8-bit `L` image."""
    return Image.fromarray((unit * 255).round().astype(np.uint8), mode="L")


def scale_intensity(
    values: np.ndarray,
    opts: DecodeSettings,
    window: tuple[float, float] | None = None,
    invert: bool = False,
) -> np.ndarray:
    """Pixel values -> [0, 1] float32 by the policy; non-finite pixels become 0.

    `window` (low, high) fixes the range (a DICOM file's own VOI output range); otherwise
    `opts.intensity` picks it from the finite pixels (`minmax`, `percentile`) or takes
    `opts.window` (center, width). `invert` (MONOCHROME1) mirrors the values within that
    range before the mapping: low values white.
    """
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    if not all_finite and not finite.any():
        raise UnreadableImage("no finite pixel value (every pixel NaN or inf)")
    usable = values if all_finite else values[finite]
    if window is not None:
        low, high = window
    elif opts.intensity == "window" and opts.window is not None:
        center, width = opts.window
        low, high = center - width / 2, center + width / 2
    elif opts.intensity == "percentile":
        flat = usable.ravel()
        step = max(1, flat.size // PERCENTILE_SAMPLE)
        low, high = (float(v) for v in np.percentile(flat[::step], opts.percentiles))
    else:
        low, high = float(usable.min()), float(usable.max())
    if not high > low:
        return np.zeros(values.shape, dtype=np.float32)
    if invert:
        values = (low + high) - values
    with np.errstate(invalid="ignore"):
        unit = (np.clip(values, low, high) - low) / (high - low)
    return (
        np.where(finite, unit, 0).astype(np.float32) if not all_finite else unit.astype(np.float32)
    )


def fit_size(img: Image.Image, opts: DecodeSettings) -> np.ndarray:
    """`L`/`RGB` image -> uint8 array of `size` x `size` by `opts.resize`.

    stretch: both sides to `size`; pad: the long side to `size`, centred on black;
    center_crop: the short side to `size`, the middle kept. Large images are first
    reduced by whole factors (box averages), which bounds the work of the resampling.
    """
    size = opts.image_size
    factor = min(img.size) // (2 * size)
    if factor >= 2:
        img = img.reduce(factor)
    if opts.resize == "pad":
        img = ImageOps.pad(img, (size, size), method=Image.Resampling.BILINEAR, color=0)
    elif opts.resize == "center_crop":
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    elif img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------- DICOM


def dicom_image(path: Path, opts: DecodeSettings) -> Image.Image:
    """A DICOM file as a viewer shows it (`dicom.read_pixels`), scaled to 8 bits.

    The file's own VOI LUT or window is used unless `opts.intensity` is `window`.
    """
    return dicom_display(read_pixels(path, opts.max_pixels, opts.intensity != "window"), opts)


def dicom_display(pixels: DicomPixels, opts: DecodeSettings) -> Image.Image:
    """The values' display range (the file's, or the intensity policy's) -> 8-bit L or RGB;
    MONOCHROME1 inverted within that range."""
    values = pixels.values
    if values.dtype == np.uint8 and pixels.display_range == (0.0, 255.0):
        return Image.fromarray(values, mode="RGB" if values.ndim == 3 else "L")
    unit = scale_intensity(
        values.astype(np.float64, copy=False), opts, pixels.display_range, pixels.inverted
    )
    return Image.fromarray((unit * 255).round().astype(np.uint8), "RGB" if unit.ndim == 3 else "L")


# --------------------------------------------------------------------------- inspection


def describe_file(path: Path, opts: DecodeSettings) -> tuple[str, str, str, int, np.ndarray]:
    """(format, mode, WxH, bits per sample, full-size pixels) for the data summary.

    Mode and bits are the file's as stored (a DICOM file's PhotometricInterpretation and
    BitsStored; Pillow's mode and the raw bits per sample), not the decoded 8-bit image's.
    """
    refused = volume_reason(path)
    if refused:
        raise UnreadableImage(refused)
    if is_dicom(path):
        px = read_pixels(path, opts.max_pixels, opts.intensity != "window")
        size = f"{px.columns}x{px.rows}"
        return "DICOM", px.photometric, size, px.bits_stored, np.asarray(dicom_display(px, opts))
    with open_image(path, opts) as img:
        fmt, mode, size = img.format or "?", img.mode, "x".join(map(str, img.size))
        bits = bits_per_sample(img)
        return fmt, mode, size, bits, np.asarray(load_image(img, path, opts))


# --------------------------------------------------------------------------- arrays


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, C, size, size) uint8, resized in batches with torch."""
    import torch

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
