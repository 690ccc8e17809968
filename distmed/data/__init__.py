"""Data sources -> an index (ids, labels, groups) -> a decoded-image cache -> torch datasets.

`layout` reads image folders, `sources` turns any source into a `DataIndex`, `decode` makes
arrays of files, `cache` stores them once for every consumer, `transforms` feeds the model and
`inspection` reports what a source holds (`python -m distmed.data ROOT`).
"""

from __future__ import annotations

from distmed.data.cache import (
    CACHE_VERSION,
    CachedData,
    CachedImageDataset,
    build_cache,
    cache_root,
    default_cache_root,
    load_cached,
)
from distmed.data.decode import (
    FILE_EXTENSIONS,
    IMAGE_EXTENSIONS,
    DecodeOptions,
    UnreadableImage,
    decode_image,
    decode_split,
    is_image_file,
    resize_array,
    try_decode,
    unreadable_message,
)
from distmed.data.index import SPLITS, DataIndex, Split, describe_index, drop_samples
from distmed.data.inspection import (
    check_duplicates,
    duplicate_problem,
    format_summary,
    inspect_index,
)
from distmed.data.sources import (
    NPZ_KEYS,
    fetch_medmnist,
    scan_folder,
    scan_manifest,
    scan_npz,
    scan_source,
)
from distmed.data.transforms import IMAGENET_MEAN, IMAGENET_STD, augment_batch, to_model_input

__all__ = [
    "CACHE_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FILE_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "NPZ_KEYS",
    "SPLITS",
    "CachedData",
    "CachedImageDataset",
    "DataIndex",
    "DecodeOptions",
    "UnreadableImage",
    "Split",
    "augment_batch",
    "build_cache",
    "check_duplicates",
    "duplicate_problem",
    "format_summary",
    "inspect_index",
    "cache_root",
    "decode_image",
    "decode_split",
    "describe_index",
    "drop_samples",
    "default_cache_root",
    "fetch_medmnist",
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
