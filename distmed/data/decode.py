"""The one decoder: an image file (PNG/JPEG/BMP/TIFF or DICOM) -> a uint8 array (grey or RGB,
resized) as the scanner or camera meant it, for the cache, predict, the app and Grad-CAM alike.
Also a split's files -> one stacked array with the unreadable files named. No cache, no torch.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from distmed.data.index import Split
from distmed.errors import UserError

if TYPE_CHECKING:
    from distmed.config import DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
# Every suffix that marks an image file; DICOM files without one are found by their preamble.
FILE_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS
DICOM_MAGIC_OFFSET = 128  # a Part-10 file: 128 bytes of preamble, then b"DICM"
PIL_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# PIL's own bomb check is a global; we switch it off only while opening (our limit applies).
_OPEN_LOCK = threading.Lock()
# Percentiles are taken on at most this many pixels (a regular subsample): exact enough for
# 0.5-99.5 and ~20x cheaper than sorting a 3000 x 3000 image.
PERCENTILE_SAMPLE = 262_144


class UnreadableImage(ValueError):
    """A file that cannot be used as a 2-D image; the message is the reason, one line."""


@dataclass(frozen=True)
class DecodeOptions:
    """How a file becomes model input; saved with the model so that predict decodes alike.

    `intensity` applies to 16-bit, float and DICOM pixels (8-bit images are used as stored):
    `minmax` or `percentile` per image, or `window` = (center, width). A DICOM file's own
    VOI LUT or window is applied unless `intensity` is `window` (then `window` wins).
    """

    size: int = 224
    intensity: str = "percentile"
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    resize: str = "stretch"
    max_pixels: int = 100_000_000

    @classmethod
    def from_config(cls, cfg: DataConfig) -> DecodeOptions:
        return cls(
            size=cfg.image_size,
            intensity=cfg.intensity,
            window=cfg.window,
            percentiles=cfg.percentiles,
            resize=cfg.resize,
            max_pixels=cfg.max_pixels,
        )

    def key(self) -> str:
        """What distinguishes one decoded cache from another."""
        return (
            f"{self.size}|{self.intensity}|{self.window}|{self.percentiles}|{self.resize}|"
            f"{self.max_pixels}"
        )


def as_options(options: DecodeOptions | int) -> DecodeOptions:
    return DecodeOptions(size=options) if isinstance(options, int) else options


def unreadable_message(bad: dict[str, str]) -> str:
    """One line naming the unreadable files (the first five) and the two ways on."""
    items = [f"{sample_id} ({reason})" for sample_id, reason in bad.items()]
    shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    return (
        f"{len(items)} unreadable image file(s): {shown}; fix or remove them, "
        "or leave them out: data.skip_invalid=true (distmed.evaluate: --skip-invalid)"
    )


# --------------------------------------------------------------------------- which files


def is_dicom(path: Path) -> bool:
    """A `.dcm`/`.dicom` suffix or the `DICM` magic after the 128-byte preamble."""
    return path.suffix.lower() in DICOM_EXTENSIONS or has_dicom_preamble(path)


def has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or a DICOM file by its content (PACS exports have no suffix)."""
    return path.suffix.lower() in FILE_EXTENSIONS or has_dicom_preamble(path)


# --------------------------------------------------------------------------- splits


def decode_split(
    split: Split, options: DecodeOptions | int
) -> tuple[np.ndarray | None, dict[str, str]]:
    """The readable images of a split as uint8 (N, C, size, size), and the unreadable ones.

    C = 1 when every image is grey. Returns (None, bad) when no image can be read. Holds
    every image in memory: the cache decodes in parallel into a file instead (`cache`).
    """
    opts = as_options(options)
    if split.images is not None:
        return resize_array(split.images, opts.size), {}
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


def try_decode(path: Path, options: DecodeOptions | int) -> tuple[np.ndarray | None, str]:
    """`decode_image`, or (None, the reason) for a file that cannot be used."""
    try:
        return decode_image(path, options), ""
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return None, _reason(path, exc)


def _reason(path: Path, exc: Exception) -> str:
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError as stat_error:
        return f"cannot read: {stat_error.strerror or stat_error}"
    if isinstance(exc, UnreadableImage):
        return str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    return f"truncated or corrupt: {type(exc).__name__}"


def decode_rows(
    stage: Path, job: list[tuple[int, str]], options: DecodeOptions
) -> list[tuple[int, bool, str]]:
    """Decode files into their rows of a (N, 3, S, S) uint8 .npy: (position, colour, reason).

    The cache's worker function (it runs in spawned processes: this module imports no torch).
    Grey images fill channel 0 only; the cache repeats it when the set is colour.
    """
    array = np.load(stage, mmap_mode="r+")
    out = []
    try:
        for position, path in job:
            image, reason = try_decode(Path(path), options)
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


def decode_image(path: Path, options: DecodeOptions | int) -> np.ndarray:
    """One file -> uint8 (size, size) grey or (size, size, 3) RGB.

    EXIF orientation is applied; 16-bit, float and DICOM pixels are scaled by the intensity
    policy (non-finite pixels masked first); files over `max_pixels` are decoded reduced
    (JPEG) or refused by name.

    Raises:
        UnreadableImage: the file is not a usable 2-D image (the message says why).
        OSError, UnidentifiedImageError, ValueError: PIL could not decode it.
        UserError: a DICOM file and no pydicom installed.
    """
    opts = as_options(options)
    if is_dicom(path):
        return fit_size(dicom_image(path, opts), opts)
    with open_image(path, opts) as img:
        return fit_size(to_grey_or_rgb(img, opts), opts)


@contextmanager
def open_image(path: Path, opts: DecodeOptions) -> Iterator[Image.Image]:
    """An opened PIL image, size-checked against `max_pixels`, JPEG drafted, upright (EXIF)."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format == "TIFF":
            raise UnreadableImage(
                f"multi-page TIFF ({frames} pages): a 3-D stack; save one 2-D image per file"
            )
        if img.format == "JPEG":
            # DCT scaling while decoding: 1/2, 1/4 or 1/8 of the pixels, never below `size`.
            img.draft(None, (opts.size, opts.size))
        width, height = img.size
        if width * height > opts.max_pixels:
            raise UnreadableImage(
                f"{width}x{height} = {width * height / 1e6:.0f} M pixels, over "
                f"data.max_pixels ({opts.max_pixels / 1e6:g} M); downscale the file or raise "
                "data.max_pixels"
            )
        ImageOps.exif_transpose(img, in_place=True)  # loads the pixels
        yield img


def to_grey_or_rgb(img: Image.Image, opts: DecodeOptions | None = None) -> Image.Image:
    """A loaded image as 8-bit `L` (grey; 16-bit/float scaled by the policy) or `RGB`."""
    opts = opts or DecodeOptions()
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
    values: np.ndarray, opts: DecodeOptions, window: tuple[float, float] | None = None
) -> np.ndarray:
    """Pixel values -> [0, 1] float32 by the policy; non-finite pixels become 0.

    `window` (low, high) fixes the range (a DICOM file's own window); otherwise
    `opts.intensity` picks it from the finite pixels (`minmax`, `percentile`) or takes
    `opts.window` (center, width).
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
    with np.errstate(invalid="ignore"):
        unit = (np.clip(values, low, high) - low) / (high - low)
    return (
        np.where(finite, unit, 0).astype(np.float32) if not all_finite else unit.astype(np.float32)
    )


def fit_size(img: Image.Image, opts: DecodeOptions) -> np.ndarray:
    """`L`/`RGB` image -> uint8 array of `size` x `size` by `opts.resize`.

    stretch: both sides to `size`; pad: the long side to `size`, centred on black;
    center_crop: the short side to `size`, the middle kept. Large images are first
    reduced by whole factors (box averages), which bounds the work of the resampling.
    """
    size = opts.size
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


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise UserError(
            "DICOM files need pydicom: pip install 'distmed[dicom]' (pydicom, and pylibjpeg "
            "for compressed DICOM)"
        ) from exc
    return pydicom


def read_dicom(path: Path, header_only: bool = False) -> Any:
    """The pydicom dataset of `path`; an `UnreadableImage` for a file that is not DICOM."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
    except (pydicom.errors.InvalidDicomError, EOFError, KeyError, AttributeError) as exc:
        raise UnreadableImage(f"not a readable DICOM file ({type(exc).__name__})") from exc


def patient_id(path: Path) -> str:
    """The DICOM header's PatientID (for `data.group_from: PatientID`)."""
    if not is_dicom(path):
        raise UserError(
            f"data.group_from=PatientID: {path} is not a DICOM file; give its patient in "
            "data.group_csv or a manifest's group column instead"
        )
    value = str(read_dicom(path, header_only=True).get("PatientID", "") or "").strip()
    if not value:
        raise UserError(
            f"data.group_from=PatientID: {path} has no PatientID in its header; give the "
            "patients in data.group_csv instead"
        )
    return value


def dicom_image(path: Path, opts: DecodeOptions) -> Image.Image:
    """A DICOM file as a viewer shows it: modality LUT, VOI LUT/window, MONOCHROME1 inverted.

    Refuses multi-frame (3-D, cine) files, files over `max_pixels` and files with no pixel
    data, each with an `UnreadableImage` saying so.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = read_dicom(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnreadableImage(
            f"multi-frame DICOM ({frames} frames): a 3-D or cine series; distmed classifies "
            "2-D images, export one frame per file"
        )
    if "PixelData" not in ds:
        raise UnreadableImage("DICOM file without pixel data (no PixelData element)")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > opts.max_pixels:
        raise UnreadableImage(
            f"{cols}x{rows} = {rows * cols / 1e6:.0f} M pixels, over data.max_pixels "
            f"({opts.max_pixels / 1e6:g} M); raise data.max_pixels"
        )
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "?")
        name = getattr(syntax, "name", str(syntax))
        raise UnreadableImage(
            f"compressed DICOM ({name}) that no installed decoder reads; "
            "pip install 'distmed[dicom]' (pylibjpeg)"
        ) from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3:  # RGB (YBR is converted to RGB by pydicom)
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise UnreadableImage(f"DICOM colour pixels of shape {pixels.shape}: not 2-D RGB")
        if pixels.dtype != np.uint8:
            pixels = (scale_intensity(pixels.astype(np.float32), opts) * 255).round()
        return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    if pixels.ndim != 2:
        raise UnreadableImage(f"DICOM pixels of shape {pixels.shape}: not a 2-D image")
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    own_window = "VOILUTSequence" in ds or "WindowCenter" in ds
    if own_window and opts.intensity != "window":
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        with np.errstate(all="ignore"):  # the output range: what the extremes map to
            ends = np.asarray(apply_voi_lut(np.array([-1e15, 1e15]), ds, index=0), float)
        unit = scale_intensity(values, opts, window=(float(ends.min()), float(ends.max())))
    else:
        unit = scale_intensity(values, opts)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1.0 - unit  # low values are white in MONOCHROME1
    return grey_image(unit)


# --------------------------------------------------------------------------- inspection


def describe_file(path: Path, opts: DecodeOptions) -> tuple[str, str, str, int, np.ndarray]:
    """(format, mode, WxH, bits per sample, full-size pixels) for the data summary."""
    if is_dicom(path):
        ds = read_dicom(path, header_only=True)
        mode = str(ds.get("PhotometricInterpretation", "?"))
        size = f"{ds.get('Columns', '?')}x{ds.get('Rows', '?')}"
        bits = int(ds.get("BitsStored", 8) or 8)
        return "DICOM", mode, size, bits, np.asarray(dicom_image(path, opts))
    with open_image(path, opts) as img:
        fmt, mode, size = img.format or "?", img.mode, "x".join(map(str, img.size))
        bits = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(mode, 8)
        return fmt, mode, size, bits, np.asarray(to_grey_or_rgb(img, opts))


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
