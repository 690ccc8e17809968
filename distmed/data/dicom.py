"""DICOM files -> the values a viewer displays, through pydicom's own functions.

Owns reading (Part-10 files, and legacy files without file meta where a data set is really
there), refusing what is not one 2-D image (no pixel data, a DICOMDIR, a segmentation, several
frames), decoding (pydicom's decoders; YBR -> RGB) and the display pipeline: modality LUT ->
VOI LUT or window -> MONOCHROME1 inversion; PALETTE COLOR -> RGB. Scaling to 8 bits is
`decode`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distmed.errors import UnreadableImage, UserError

log = logging.getLogger(__name__)

DICOM_EXTENSIONS = (".dcm", ".dicom")
DICOM_MAGIC_OFFSET = 128  # a Part-10 file: 128 bytes of preamble, then b"DICM"
# The groups a data set without file meta starts with: file meta (0002) written without a
# preamble, or the identifying group (0008) that every image IOD has.
DATASET_FIRST_GROUPS = (0x0002, 0x0008)
PIXEL_ELEMENTS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
# SOP classes that carry pixel data that is not an image to classify: label masks and dose
# grids (PS3.4 Annex B lists them).
NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation (a label mask)",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation (a label mask)",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose (a dose grid)",
}
# What the grey pipeline applies to; colour images have no modality or VOI LUT (PS3.3 C.11).
GREY = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class DicomPixels:
    """One DICOM image as a viewer computes it, before the display's scaling to 8 bits.

    `values`: (rows, cols) grey after the modality LUT and, when the file has one and it is
    used, the VOI LUT or window; or (rows, cols, 3) RGB (YBR converted, palette applied).
    `display_range`: (black, white) the values are meant to span (the VOI step's output
    range, or the range of the colour samples), None when the intensity policy picks it.
    `inverted`: MONOCHROME1 (low values white). The other fields describe the file as stored.
    """

    values: np.ndarray
    display_range: tuple[float, float] | None
    inverted: bool
    photometric: str
    bits_stored: int
    columns: int
    rows: int


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


def starts_with_dataset(head: bytes) -> bool:
    """Whether `head` (a file's first 8 bytes) opens a DICOM data set without a preamble.

    Legacy (ACR-NEMA era and early PACS) files hold the data set alone: the first element's
    tag is in group 0002 or 0008 (little or big endian), followed by an explicit VR (two
    upper-case letters) or an implicit 4-byte length.
    """
    if len(head) < 8:
        return False
    little = int.from_bytes(head[:2], "little") in DATASET_FIRST_GROUPS
    big = int.from_bytes(head[:2], "big") in DATASET_FIRST_GROUPS
    if not (little or big):
        return False
    explicit_vr = head[4:6].isalpha() and head[4:6].isupper()
    implicit_length = int.from_bytes(head[4:8], "little" if little else "big")
    return explicit_vr or implicit_length < 1 << 24


# --------------------------------------------------------------------------- reading


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise UserError(
            "DICOM files need pydicom: pip install 'distmed[dicom]' (pydicom, and pylibjpeg "
            "for compressed DICOM)"
        ) from exc
    _quiet_decoder_tracebacks()
    return pydicom


def _quiet_decoder_tracebacks() -> None:
    """Drop the traceback pydicom logs for each decoding plugin that fails.

    The same failures come back in the `RuntimeError` that `read_pixels` turns into one line
    naming the file; the logged tracebacks would name no file.
    """
    logger = logging.getLogger("pydicom.pixels.decoders.base")
    if not any(isinstance(f, _NoPluginTracebacks) for f in logger.filters):
        logger.addFilter(_NoPluginTracebacks())


class _NoPluginTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None and record.levelno < logging.ERROR


def read_dicom(path: Path, header_only: bool = False) -> Any:
    """The pydicom data set of `path`.

    A Part-10 file is read as it is; a file without the preamble is read (pydicom's
    `force=True`) only when a data set starts at byte 0, and its transfer syntax is then
    taken from the encoding pydicom found, as viewers do.

    Raises:
        UnreadableImage: not a DICOM file, or one pydicom cannot parse.
        UserError: pydicom is not installed.
    """
    pydicom = _pydicom()
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=header_only)
        except pydicom.errors.InvalidDicomError:
            with open(path, "rb") as handle:
                head = handle.read(8)
            if not starts_with_dataset(head):
                raise UnreadableImage(
                    "not a DICOM file (no DICM preamble and no DICOM data set at its start)"
                ) from None
            ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
    except (UnreadableImage, OSError):
        raise
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise UnreadableImage(f"not a readable DICOM file ({_first_line(exc)})") from exc
    if not header_only:
        _set_missing_transfer_syntax(ds)
    return ds


def _set_missing_transfer_syntax(ds: Any) -> None:
    """Files without file meta: the transfer syntax is the encoding the data set was read in."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    element = next((ds[name] for name in PIXEL_ELEMENTS if name in ds), None)
    if element is not None and element.is_undefined_length:
        raise UnreadableImage(
            "compressed DICOM pixel data without file meta: the codec is not recorded; "
            "re-export the file as a Part-10 DICOM file"
        )
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


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


# --------------------------------------------------------------------------- pixels


def read_pixels(path: Path, max_pixels: int, own_window: bool = True) -> DicomPixels:
    """A DICOM file's one 2-D image as a viewer computes it (see `DicomPixels`).

    Grey: `apply_modality_lut` (Modality LUT Sequence or rescale slope/intercept), then, when
    `own_window`, `apply_voi_lut` (the VOI LUT Sequence, else WindowCenter/Width with
    pydicom's windowing rules; the first of several), then MONOCHROME1 marked for inversion.
    PALETTE COLOR: `apply_color_lut`. YBR: converted to RGB by pydicom's decoder options
    (`as_rgb`), or `convert_color_space` where the decoder left it.

    Raises:
        UnreadableImage: not one 2-D image (no pixel data, a DICOMDIR, a segmentation or
            dose grid, several frames, over `max_pixels`), or pixel data that no installed
            decoder reads; the message says which.
    """
    ds = read_dicom(path)
    refuse_non_image(ds)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > max_pixels:
        raise UnreadableImage(
            f"{cols}x{rows} = {rows * cols / 1e6:.0f} M pixels, over data.max_pixels "
            f"({max_pixels / 1e6:g} M); raise data.max_pixels"
        )
    pixels, photometric_out = _decode(ds)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    display_range: tuple[float, float] | None
    if photometric == "PALETTE COLOR":
        values, display_range = _palette(pixels, ds)
    elif pixels.ndim == 3:
        values, display_range = _colour(pixels, photometric_out)
    elif pixels.ndim == 2:
        values, display_range = _grey(pixels, ds, own_window and photometric in GREY)
    else:
        raise UnreadableImage(f"DICOM pixels of shape {pixels.shape}: not a 2-D image")
    return DicomPixels(
        values,
        display_range,
        inverted=photometric == "MONOCHROME1",
        photometric=photometric or "?",
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8),
        columns=cols,
        rows=rows,
    )


def refuse_non_image(ds: Any) -> None:
    """An `UnreadableImage` naming what the file is when it is not one 2-D image."""
    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    if media_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        raise UnreadableImage(
            "a DICOMDIR (the index of a DICOM export), not an image; the images are the "
            "files it lists"
        )
    sop_class = ds.get("SOPClassUID", media_class)
    if str(sop_class) in NOT_IMAGES:
        raise UnreadableImage(f"DICOM {NOT_IMAGES[str(sop_class)]}: not an image to classify")
    if not any(name in ds for name in PIXEL_ELEMENTS):
        kind = getattr(sop_class, "name", "") or str(sop_class) or "object"
        raise UnreadableImage(f"DICOM {kind} without pixel data: not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnreadableImage(
            f"multi-frame DICOM ({frames} frames): a 3-D or cine series; distmed classifies "
            "2-D images, export one frame per file"
        )


def _decode(ds: Any) -> tuple[np.ndarray, str]:
    """The first frame's stored values, YBR as RGB, and the photometric of what came out."""
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    name = getattr(syntax, "name", str(syntax))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise UnreadableImage(f"DICOM transfer syntax {name} that pydicom cannot decode") from exc
    if not decoder.is_available:
        raise UnreadableImage(
            f"compressed DICOM ({name}) that no installed decoder reads; install one of: "
            f"{'; '.join(decoder.missing_dependencies)} (pip install 'distmed[dicom]')"
        )
    try:
        # as_rgb (pydicom's default, said here because the pipeline relies on it): YBR -> RGB
        options: Any = {"as_rgb": True}
        pixels, info = decoder.as_array(ds, index=0, **options)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise UnreadableImage(
            f"DICOM pixel data ({name}) that no installed decoder could decode "
            f"({_plugin_failures(exc)})"
        ) from exc
    return pixels, str(info.get("photometric_interpretation", ""))


def _colour(pixels: np.ndarray, photometric: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    from pydicom.pixels import convert_color_space

    if pixels.shape[-1] != 3:
        raise UnreadableImage(f"DICOM colour pixels of shape {pixels.shape}: not 2-D RGB")
    if photometric.startswith("YBR"):
        try:
            pixels = convert_color_space(pixels, photometric, "RGB")
        except NotImplementedError as exc:
            raise UnreadableImage(
                f"DICOM colour space {photometric} that pydicom does not convert to RGB"
            ) from exc
    elif photometric not in ("RGB", ""):
        raise UnreadableImage(f"DICOM colour space {photometric}: not RGB or YBR")
    # 8-bit samples are display values; deeper ones are scaled by the intensity policy.
    return pixels, (0.0, 255.0) if pixels.dtype == np.uint8 else None


def _palette(pixels: np.ndarray, ds: Any) -> tuple[np.ndarray, tuple[float, float]]:
    from pydicom.pixels import apply_color_lut

    if pixels.ndim != 2:
        raise UnreadableImage(f"DICOM palette pixels of shape {pixels.shape}: not 2-D")
    try:
        rgb = apply_color_lut(pixels, ds)[..., :3]  # an alpha LUT is not shown
    except (ValueError, AttributeError, KeyError) as exc:
        raise UnreadableImage(f"DICOM PALETTE COLOR without a usable palette: {exc}") from exc
    # 16-bit palette entries span 0..65535; some writers store 8-bit entries in 16 bits.
    top = 255.0 if rgb.dtype == np.uint8 or int(rgb.max()) <= 255 else 65535.0
    return rgb, (0.0, top)


def _grey(
    pixels: np.ndarray, ds: Any, apply_voi: bool
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Modality LUT, then the VOI LUT or window with its output range (or None)."""
    from pydicom.pixels import apply_modality_lut

    modality = ds.get("ModalityLUTSequence")
    stored = _lut_input(pixels, modality[0].LUTDescriptor) if modality else pixels
    values = np.asarray(apply_modality_lut(stored, ds))
    if apply_voi:
        windowed = _voi(values, ds)
        if windowed is not None:
            return windowed
    return values.astype(np.float64, copy=False), None


def _voi(values: np.ndarray, ds: Any) -> tuple[np.ndarray, tuple[float, float]] | None:
    """`apply_voi_lut` (index 0) and the range its output spans; None when the file has none.

    A VOI LUT spans its entries' range (the descriptor's bit count is often wrong); a window
    spans pydicom's y_min..y_max, found by windowing the extremes. An unusable window (width
    below 1, an unknown function) is ignored, as viewers do.
    """
    from pydicom.pixels import apply_voi_lut

    lut_items = ds.get("VOILUTSequence")
    item = lut_items[0] if lut_items else None
    if item is not None and "LUTDescriptor" in item and "LUTData" in item:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        nr_entries = entries or 1 << 16
        if bits == 8:
            # pydicom indexes an 8-bit LUT with uint8 indices, so entries past 255 wrap. It
            # reads the LUT Data as 16-bit values whatever the descriptor says; the bit count
            # only picks the array type, so 16 gives the same values, indexed right.
            item.LUTDescriptor = [entries, first, 16]
        shown = apply_voi_lut(_lut_input(values, item.LUTDescriptor), ds, index=0)
        lut = apply_voi_lut(np.arange(first, first + nr_entries, dtype=np.int64), ds, index=0)
        return shown.astype(np.float64), (float(lut.min()), float(lut.max()))
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        shown = apply_voi_lut(values, ds, index=0, prefer_lut=False)
        with np.errstate(over="ignore"):  # the sigmoid of +-1e30 saturates
            ends = apply_voi_lut(np.array([-1e30, 1e30]), ds, index=0, prefer_lut=False)
    except (ValueError, IndexError, TypeError) as exc:
        log.debug("DICOM window ignored: %s", exc)
        return None
    return shown.astype(np.float64), (float(ends.min()), float(ends.max()))


def _lut_input(values: np.ndarray, descriptor: Any) -> np.ndarray:
    """Integer LUT inputs clipped to the LUT's domain [first, first + entries - 1].

    Same result as pydicom's own clipping; done first because pydicom subtracts the first
    mapped value in the LUT's (unsigned 16-bit) type, which wraps for inputs beyond it.
    """
    nr_entries, first = int(descriptor[0]) or 1 << 16, int(descriptor[1])
    return np.clip(np.rint(values), first, first + nr_entries - 1).astype(np.int64)


def _plugin_failures(exc: BaseException) -> str:
    """pydicom's "all plugins failed" message as `plugin: reason; ...`, each cut short."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    if not lines:
        return _first_line(exc)
    return "; ".join(line[:90] for line in lines)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
