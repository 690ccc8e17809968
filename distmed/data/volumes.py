"""Files that hold 3-D volumes (NIfTI, NRRD, MetaImage): known by their suffix, so that a
folder of them is named for what it holds, and refused with the shape their header gives.
distmed classifies 2-D images; a volume needs slices exported first.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

# Suffix (lower case) -> the format's name. `.nii.gz` is matched on the whole name.
VOLUME_FORMATS = {
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}
VOLUME_EXTENSIONS = tuple(VOLUME_FORMATS)
# NIfTI-1 and NIfTI-2 headers open with their own size (sizeof_hdr), then dim[8] at these
# offsets as int16 / int64 (nifti1.h, nifti2.h).
NIFTI_LAYOUTS = {348: (40, "8h"), 540: (16, "8q")}
EXPORT_HINT = "distmed classifies 2-D images; export 2-D slices (PNG, TIFF or DICOM)"


def suffix_of(path: Path) -> str:
    """The lower-case suffix, with `.nii.gz` kept whole."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def volume_reason(path: Path) -> str | None:
    """Why a volume file is refused (format and shape), or None when it is not one."""
    fmt = VOLUME_FORMATS.get(suffix_of(path))
    if fmt is None:
        return None
    if fmt != "NIfTI":
        return f"{fmt} file: a 3-D volume format; {EXPORT_HINT}"
    shape = nifti_shape(path)
    if shape is None:
        return f"NIfTI file (header unreadable): a volume format; {EXPORT_HINT}"
    dims = "x".join(map(str, shape))
    if len([d for d in shape if d > 1]) <= 2:  # one slice: a 2-D image in a volume format
        return f"NIfTI image {dims}: distmed reads 2-D images as PNG, TIFF or DICOM; save it so"
    return f"NIfTI {len(shape)}-D volume {dims}: {EXPORT_HINT}"


def nifti_shape(path: Path) -> tuple[int, ...] | None:
    """dim[1..dim[0]] from a NIfTI-1/2 header (gzip or not), or None if it is not one."""
    try:
        opener = gzip.open if suffix_of(path) == ".nii.gz" else open
        with opener(path, "rb") as handle:
            head = handle.read(80)
    except (OSError, EOFError, zlib.error):
        return None
    for order in "<>":
        if len(head) < 4:
            return None
        layout = NIFTI_LAYOUTS.get(struct.unpack(f"{order}i", head[:4])[0])
        if layout is None:
            continue
        offset, fmt = layout
        if len(head) < offset + struct.calcsize(fmt):
            return None
        dims = struct.unpack_from(f"{order}{fmt}", head, offset)
        if not 1 <= dims[0] <= 7:
            return None
        return tuple(int(d) for d in dims[1 : dims[0] + 1])
    return None
