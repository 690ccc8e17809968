"""Data sources -> an index (ids, labels, groups) -> a decoded-image cache -> torch datasets.

`layout` reads image folders, `sheets` reads CSV sheets in Excel's dialects, `labels` checks
label values once for every source, `findings` codes several findings per image, `keyed`
labels DICOM images from a sheet keyed by PatientID or StudyInstanceUID, `sources` turns any
source into a `DataIndex`, `decode` makes arrays of files as `settings` says (`dicom` and
`volumes` own those formats), `cache` stores them once for every consumer, `transforms` feeds
the model and `inspection` reports what a source holds (`python -m distmed.data ROOT`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Name -> the submodule that defines it. Loaded on first use, so that a decoding worker process
# (`decode.decode_rows`) imports PIL and numpy, not torch with the cache and transforms.
_EXPORTS = {
    "CACHE_VERSION": "cache",
    "CachedData": "cache",
    "CachedImageDataset": "cache",
    "DataIndex": "index",
    "DecodeSettings": "settings",
    "FILE_EXTENSIONS": "decode",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "IMAGE_EXTENSIONS": "decode",
    "NPZ_KEYS": "sources",
    "SPLITS": "index",
    "Split": "index",
    "UnreadableImage": "decode",
    "augment_batch": "transforms",
    "build_cache": "cache",
    "cache_root": "cache",
    "check_duplicates": "inspection",
    "decode_image": "decode",
    "decode_split": "decode",
    "default_cache_root": "cache",
    "describe_index": "index",
    "drop_samples": "index",
    "duplicate_problem": "inspection",
    "fetch_medmnist": "sources",
    "format_summary": "inspection",
    "inspect_data": "inspection",
    "inspect_index": "inspection",
    "is_image_file": "decode",
    "load_cached": "cache",
    "resize_array": "decode",
    "scan_folder": "sources",
    "scan_manifest": "manifest",
    "scan_npz": "sources",
    "scan_source": "sources",
    "to_model_input": "transforms",
    "try_decode": "decode",
    "unreadable_message": "decode",
}
_SUBMODULES = (
    "cache",
    "decode",
    "dicom",
    "findings",
    "index",
    "inspection",
    "keyed",
    "labels",
    "layout",
    "manifest",
    "sheets",
    "sources",
    "transforms",
    "volumes",
)
__all__ = [
    "CACHE_VERSION",
    "CachedData",
    "CachedImageDataset",
    "DataIndex",
    "DecodeSettings",
    "FILE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "NPZ_KEYS",
    "SPLITS",
    "Split",
    "UnreadableImage",
    "augment_batch",
    "build_cache",
    "cache_root",
    "check_duplicates",
    "decode_image",
    "decode_split",
    "default_cache_root",
    "describe_index",
    "drop_samples",
    "duplicate_problem",
    "fetch_medmnist",
    "format_summary",
    "inspect_data",
    "inspect_index",
    "is_image_file",
    "load_cached",
    "resize_array",
    "scan_folder",
    "scan_manifest",
    "scan_npz",
    "scan_source",
    "to_model_input",
    "try_decode",
    "unreadable_message",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
