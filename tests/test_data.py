"""distmed.data: scanning sources, decoding files, the decoded cache, datasets, transforms."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_npz, write_image_folder
from PIL import Image

import distmed.data as data_mod
from distmed.config import AugmentConfig, DataConfig
from distmed.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CachedImageDataset,
    augment_batch,
    build_cache,
    decode_image,
    decode_split,
    drop_samples,
    load_cached,
    scan_folder,
    scan_source,
    to_model_input,
    unreadable_message,
)
from distmed.demo import write_demo_images
from distmed.errors import UserError


def cfg(**kwargs) -> DataConfig:
    return DataConfig(**kwargs)


def files_split(paths: list[Path]) -> data_mod.Split:
    return data_mod.Split(
        ids=[p.name for p in paths], labels=np.zeros(len(paths), dtype=np.int64), paths=paths
    )


def write_npz(path: Path, sizes=(6, 2, 3), drop: str | None = None, **replace) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 10, 10), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    arrays.update(replace)
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------- scanning folders


def test_scan_flat_folder(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"normal": 5, "abnormal": 3})
    index = scan_folder(root, cfg())
    assert index.class_names == ["abnormal", "normal"]  # sorted
    assert index.test is None
    assert len(index.pool) == 8
    assert index.pool.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert index.pool.ids[0] == "abnormal/p00_img00.png"
    assert all(i.startswith("normal/") for i in index.pool.ids[3:])
    assert index.pool.groups is None
    assert index.name == "flat"
    assert index.pool.paths is not None and index.pool.images is None


def test_scan_flat_folder_is_deterministic_and_fingerprinted(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 3, "b": 3})
    first, second = scan_folder(root, cfg()), scan_folder(root, cfg())
    assert first.pool.ids == second.pool.ids
    assert first.fingerprint == second.fingerprint
    (root / "a" / "p00_img00.png").write_bytes((root / "b" / "p00_img00.png").read_bytes() * 2)
    assert scan_folder(root, cfg()).fingerprint != first.fingerprint


def test_scan_ignores_non_images_and_hidden_files(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".hidden.png").write_bytes(b"junk")
    (root / ".git").mkdir()
    index = scan_folder(root, cfg())
    assert index.class_names == ["a", "b"]
    assert len(index.pool) == 4


def test_scan_split_folder(tmp_path):
    root = tmp_path / "split"
    write_image_folder(root / "train", {"cat": 4, "dog": 3}, seed=1)
    write_image_folder(root / "val", {"cat": 2, "dog": 1}, seed=2)
    write_image_folder(root / "test", {"cat": 2, "dog": 2}, seed=3)
    index = scan_folder(root, cfg())
    assert index.class_names == ["cat", "dog"]
    assert len(index.pool) == 4 + 3 + 2 + 1  # train + val
    assert index.test is not None and len(index.test) == 4
    assert sum(i.startswith("train/") for i in index.pool.ids) == 7
    assert sum(i.startswith("val/") for i in index.pool.ids) == 3
    assert all(i.startswith("test/") for i in index.test.ids)
    assert not set(index.pool.ids) & set(index.test.ids)
    assert index.pool.labels.tolist() == [0] * 4 + [1] * 3 + [0] * 2 + [1]
    assert index.test.labels.tolist() == [0, 0, 1, 1]


def test_scan_split_folder_train_only_has_no_test(tmp_path):
    root = tmp_path / "split"
    write_image_folder(root / "train", {"cat": 2, "dog": 2})
    index = scan_folder(root, cfg())
    assert index.test is None
    assert len(index.pool) == 4


@pytest.mark.parametrize("split", ["val", "test"])
def test_split_class_mismatch_names_split(tmp_path, split):
    root = tmp_path / "split"
    write_image_folder(root / "train", {"cat": 2, "dog": 2})
    write_image_folder(root / split, {"cat": 2, "dog": 1, "fox": 1})
    with pytest.raises(UserError) as info:
        scan_folder(root, cfg())
    assert f"{split}/" in str(info.value)
    assert "fox" in str(info.value)


def test_empty_class_folder_is_named(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    (root / "empty_class").mkdir()
    with pytest.raises(UserError) as info:
        scan_folder(root, cfg())
    assert "empty_class" in str(info.value)


def test_single_class_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"only": 3})
    with pytest.raises(UserError, match="one class"):
        scan_folder(root, cfg())


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "loose").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "loose" / "x.png")
    with pytest.raises(UserError, match="no class folders"):
        scan_folder(tmp_path / "loose", cfg())


def test_missing_root_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(UserError) as info:
        scan_source(cfg(root=str(missing)))
    assert str(missing) in str(info.value)


def test_root_not_set():
    with pytest.raises(UserError, match="data.root"):
        scan_source(cfg())


def test_scan_source_folder(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    index = scan_source(cfg(root=str(root)))
    assert index.class_names == ["a", "b"] and len(index.pool) == 4


def test_non_npz_file_is_refused(tmp_path):
    path = tmp_path / "image.png"
    Image.new("L", (8, 8)).save(path)
    with pytest.raises(UserError, match="npz"):
        scan_source(cfg(root=str(path)))


# --------------------------------------------------------------------------- groups


def test_group_regex_gives_groups(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 4, "b": 2})
    index = scan_folder(root, cfg(group_regex=r"^(p\d+)_"))
    assert index.pool.groups is not None
    assert index.pool.groups.tolist() == ["p00", "p00", "p01", "p01", "p00", "p00"]


def test_group_regex_without_group_uses_whole_match(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    index = scan_folder(root, cfg(group_regex=r"img0[0-9]"))
    assert index.pool.groups.tolist() == ["img00", "img01", "img00", "img01"]


def test_group_regex_not_matching_names_file(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    with pytest.raises(UserError) as info:
        scan_folder(root, cfg(group_regex=r"^(patient\d+)_"))
    assert "p00_img00.png" in str(info.value)


def test_group_regex_invalid(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    with pytest.raises(UserError, match="group_regex"):
        scan_folder(root, cfg(group_regex="(unclosed"))


def test_group_csv(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    table = tmp_path / "groups.csv"
    table.write_text(
        "path,group\na/p00_img00.png,P1\np00_img01.png,P2\nb/p00_img00.png,P3\nb/p00_img01.png,P3\n"
    )
    index = scan_folder(root, cfg(group_csv=str(table)))
    # rows match the relative id, or the bare file name
    assert index.pool.groups.tolist() == ["P1", "P2", "P3", "P3"]


def test_group_csv_missing_row(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    table = tmp_path / "groups.csv"
    table.write_text("path,group\na/p00_img00.png,P1\n")
    with pytest.raises(UserError, match="a/p00_img01.png"):
        scan_folder(root, cfg(group_csv=str(table)))


# --------------------------------------------------------------------------- decoding files


@pytest.mark.parametrize(
    ("mode", "suffix", "shape"),
    [
        ("L", ".png", (16, 16)),
        ("RGB", ".png", (16, 16, 3)),
        ("RGBA", ".png", (16, 16, 3)),
        ("L", ".jpg", (16, 16)),
        ("RGB", ".jpg", (16, 16, 3)),
        ("RGB", ".jpeg", (16, 16, 3)),
        ("L", ".bmp", (16, 16)),
        ("RGB", ".bmp", (16, 16, 3)),
        ("L", ".tif", (16, 16)),
        ("RGB", ".tiff", (16, 16, 3)),
        ("P", ".png", (16, 16)),  # grey palette
        ("1", ".png", (16, 16)),
    ],
)
def test_decode_image_formats(tmp_path, mode, suffix, shape):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(grey).convert(mode).save(path)
    out = decode_image(path, 16)
    assert out.dtype == np.uint8
    assert out.shape == shape


def test_decode_colour_palette_is_rgb(tmp_path):
    image = Image.new("RGB", (12, 12), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    image.save(tmp_path / "pal.png")
    out = decode_image(tmp_path / "pal.png", 12)
    assert out.shape == (12, 12, 3)
    assert out[..., 0].mean() > 150 > out[..., 1].mean()


def test_decode_grey_values_are_kept(tmp_path):
    pixels = np.full((16, 16), 77, dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "g.png")
    assert (decode_image(tmp_path / "g.png", 16) == 77).all()


def test_decode_16bit_is_min_max_scaled(tmp_path):
    values = np.linspace(100, 4000, 16 * 16).reshape(16, 16).astype(np.uint16)  # 12-bit data
    path = tmp_path / "xray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = decode_image(path, 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    assert out.min() == 0 and out.max() == 255
    expected = np.round((values.astype(np.float64) - 100) / 3900 * 255)
    assert np.abs(out.astype(np.int64) - expected).max() <= 1
    # a fixed 65535 divide would have left it nearly black
    resized = decode_image(path, 8)
    assert resized.min() < 30 and resized.max() > 225


def test_decode_16bit_constant_image_is_black(tmp_path):
    Image.fromarray(np.full((8, 8), 1234, dtype=np.uint16)).save(tmp_path / "flat16.png")
    assert (decode_image(tmp_path / "flat16.png", 8) == 0).all()


def test_decode_split_all_formats_in_one_set_is_colour(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    paths = []
    for mode, suffix in [
        ("L", ".png"),
        ("RGB", ".png"),
        ("RGBA", ".png"),
        ("L", ".jpg"),
        ("L", ".bmp"),
        ("RGB", ".tif"),
    ]:
        path = tmp_path / f"{mode}{suffix}"
        Image.fromarray(grey).convert(mode).save(path)
        paths.append(path)
    path16 = tmp_path / "deep.png"
    Image.fromarray(grey.astype(np.uint16) * 16).save(path16)
    paths.append(path16)
    out, bad = decode_split(files_split(paths), 16)
    assert bad == {}
    assert out.dtype == np.uint8
    assert out.shape == (7, 3, 16, 16)
    # grey images are replicated into equal channels
    assert (out[0, 0] == out[0, 1]).all() and (out[0, 1] == out[0, 2]).all()


def test_decode_split_grey_only_has_one_channel(tmp_path):
    rng = np.random.default_rng(2)
    paths = []
    for i, suffix in enumerate([".png", ".jpg", ".bmp", ".tif"]):
        path = tmp_path / f"g{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(path)
        paths.append(path)
    path16 = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 4096, (16, 16)).astype(np.uint16)).save(path16)
    paths.append(path16)
    out, _ = decode_split(files_split(paths), 16)
    assert out.shape == (5, 1, 16, 16)
    assert out.dtype == np.uint8


def test_mixed_sizes_are_resized(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(20, 24), (40, 12), (16, 16), (7, 9)]):
        path = tmp_path / f"s{i}.png"
        Image.new("L", (w, h), 100 + i).save(path)
        paths.append(path)
    out, _ = decode_split(files_split(paths), 16)
    assert out.shape == (4, 1, 16, 16)
    for i in range(4):
        assert (out[i] == 100 + i).all()  # a flat image stays flat under resizing


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (np.random.default_rng(0).bytes(300), "not an image")],
    ids=["empty", "random"],
)
def test_unreadable_file_is_reported_with_its_reason(tmp_path, content, reason):
    good = tmp_path / "good.png"
    Image.new("L", (8, 8), 3).save(good)
    bad = tmp_path / "broken_scan.png"
    bad.write_bytes(content)
    out, unreadable = decode_split(files_split([good, bad]), 8)
    assert out.shape == (1, 1, 8, 8) and (out == 3).all()  # the readable file is kept
    assert unreadable == {"broken_scan.png": reason}


def test_truncated_png_is_reported(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(good)
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _, unreadable = decode_split(files_split([good, bad]), 8)
    assert list(unreadable) == ["cut.png"]
    assert unreadable["cut.png"].startswith("truncated or corrupt")


def test_many_unreadable_files_are_summarised_in_one_line():
    message = unreadable_message({f"bad{i}.png": "empty file" for i in range(7)})
    assert message.startswith("7 unreadable")
    assert "bad0.png (empty file)" in message and "2 more" in message
    assert "bad6.png" not in message and "\n" not in message
    assert "data.skip_invalid=true" in message


def _folder_with_broken_files(root: Path) -> Path:
    write_image_folder(root / "train", {"a": 4, "b": 4}, size=12)
    write_image_folder(root / "test", {"a": 2, "b": 2}, size=12, seed=1)
    (root / "train" / "a" / "zero.png").write_bytes(b"")
    (root / "train" / "b" / "notes.jpg").write_text("not a picture")
    (root / "test" / "b" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


def test_unreadable_files_stop_the_run_by_default_naming_them(tmp_path):
    root = _folder_with_broken_files(tmp_path / "d")
    config = cfg(root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError) as info:
        build_cache(scan_source(config), config)
    message = str(info.value)
    assert message.startswith("3 unreadable image file(s)")
    for name in ("train/a/zero.png", "train/b/notes.jpg", "test/b/cut.png"):
        assert name in message


def test_skip_invalid_leaves_unreadable_files_out_and_counts_them(tmp_path):
    root = _folder_with_broken_files(tmp_path / "d")
    config = cfg(root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    config = config.model_copy(update={"skip_invalid": True})
    index = scan_source(config)
    cached = build_cache(index, config)
    kept = drop_samples(index, cached.skipped)
    assert sorted(kept.skipped) == ["test/b/cut.png", "train/a/zero.png", "train/b/notes.jpg"]
    assert len(kept.pool) == 8 and len(kept.test) == 4  # 10 - 2 and 5 - 1
    assert load_cached(cached.pool_path).shape[0] == len(kept.pool)
    assert load_cached(cached.test_path).shape[0] == len(kept.test)
    assert all("zero" not in i and "notes" not in i for i in kept.pool.ids)
    assert kept.pool.labels.tolist() == [0] * 4 + [1] * 4
    # Reusing that cache without skip_invalid still names the files: nothing is hidden.
    strict = config.model_copy(update={"skip_invalid": False})
    with pytest.raises(UserError, match="train/a/zero.png"):
        build_cache(scan_source(strict), strict)


def test_a_split_with_no_readable_file_is_an_error(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "train", {"a": 3, "b": 3}, size=12)
    for name in ("a", "b"):
        (root / "test" / name).mkdir(parents=True)
        (root / "test" / name / "x.png").write_bytes(b"")
    config = cfg(root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    config = config.model_copy(update={"skip_invalid": True})
    with pytest.raises(UserError, match="none of the 2 test image files can be read"):
        build_cache(scan_source(config), config)


# --------------------------------------------------------------------------- npz sources


def test_breastmnist_npz():
    index = scan_source(cfg(root=str(shared_npz("breastmnist.npz"))))
    assert index.class_names == ["0", "1"]
    assert len(index.pool) == 546 + 78
    assert index.test is not None and len(index.test) == 156
    assert index.pool.images.shape == (624, 28, 28)
    assert index.pool.ids[0] == "train/0" and index.pool.ids[546] == "val/0"
    assert set(np.unique(index.pool.labels)) == {0, 1}
    assert index.name == "breastmnist"


def test_synthetic_npz_pool_and_test(tmp_path):
    index = scan_source(cfg(root=str(write_npz(tmp_path / "tiny.npz"))))
    assert len(index.pool) == 8 and len(index.test) == 3
    assert index.pool.labels.dtype == np.int64
    decoded, _ = decode_split(index.pool, 16)
    assert decoded.shape == (8, 1, 16, 16) and decoded.dtype == np.uint8


def test_npz_rgb_images(tmp_path):
    rng = np.random.default_rng(0)
    path = write_npz(
        tmp_path / "rgb.npz",
        train_images=rng.integers(0, 256, (6, 10, 10, 3), dtype=np.uint8),
        val_images=rng.integers(0, 256, (2, 10, 10, 3), dtype=np.uint8),
        test_images=rng.integers(0, 256, (3, 10, 10, 3), dtype=np.uint8),
    )
    index = scan_source(cfg(root=str(path)))
    decoded, _ = decode_split(index.pool, 10)
    assert decoded.shape == (8, 3, 10, 10)
    assert (decoded[0] == index.pool.images[0].transpose(2, 0, 1)).all()


def test_npz_missing_key_is_named(tmp_path):
    path = write_npz(tmp_path / "partial.npz", drop="val_labels")
    with pytest.raises(UserError) as info:
        scan_source(cfg(root=str(path)))
    assert "val_labels" in str(info.value)


def test_npz_length_mismatch(tmp_path):
    path = write_npz(tmp_path / "mismatch.npz", train_labels=np.zeros((5, 1), dtype=np.uint8))
    with pytest.raises(UserError) as info:
        scan_source(cfg(root=str(path)))
    assert "train_images" in str(info.value) and "train_labels" in str(info.value)


def test_npz_label_arrays_of_different_widths_are_refused(tmp_path):
    # train (6, 3) beside val/test (N, 1): neither one label nor L findings per image
    path = write_npz(tmp_path / "multi.npz", train_labels=np.zeros((6, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="differ in columns"):
        scan_source(cfg(root=str(path)))


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_bytes(b"definitely not a zip")
    with pytest.raises(UserError, match="fake.npz"):
        scan_source(cfg(root=str(path)))


def test_npz_with_group_settings_is_refused(tmp_path):
    path = write_npz(tmp_path / "tiny.npz")
    with pytest.raises(UserError, match="group"):
        scan_source(cfg(root=str(path), group_regex=r"^(p\d+)_"))


def test_medmnist_source_without_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # `import medmnist` -> ImportError
    with pytest.raises(UserError) as info:
        scan_source(cfg(root="medmnist:breastmnist", cache_dir=str(tmp_path)))
    assert type(info.value) is UserError
    assert "pip install" in str(info.value)
    assert "breastmnist" in str(info.value)


# --------------------------------------------------------------------------- decoded cache


def test_build_cache_writes_and_reuses(tmp_path, monkeypatch):
    root = tmp_path / "split"
    write_image_folder(root / "train", {"a": 3, "b": 3}, size=20)
    write_image_folder(root / "test", {"a": 2, "b": 2}, size=20, mode="RGB")
    config = cfg(root=str(root), image_size=16, cache_dir=str(tmp_path / "cache"))
    index = scan_source(config)
    cached = build_cache(index, config)
    assert cached.pool_path.is_file() and cached.test_path is not None
    pool, test = load_cached(cached.pool_path), load_cached(cached.test_path)
    assert isinstance(pool, np.memmap)
    assert pool.shape == (6, 1, 16, 16) and pool.dtype == np.uint8
    assert test.shape == (4, 3, 16, 16)
    assert cached.channels == 3
    assert cached.pool_path.is_relative_to(tmp_path / "cache")
    assert (pool[0, 0] == decode_image(index.pool.paths[0], 16)).all()

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(data_mod.cache, "decode_split", no_decoding)  # where build_cache looks
    again = build_cache(scan_source(config), config)
    assert again == cached


def test_build_cache_keys_on_image_size(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2}, size=20)
    small = cfg(root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    large = cfg(root=str(root), image_size=16, cache_dir=str(tmp_path / "cache"))
    index = scan_source(small)
    first, second = build_cache(index, small), build_cache(index, large)
    assert first.pool_path.parent != second.pool_path.parent
    assert load_cached(first.pool_path).shape == (4, 1, 8, 8)
    assert load_cached(second.pool_path).shape == (4, 1, 16, 16)
    assert first.test_path is None


def test_build_cache_misses_after_file_change(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    config = cfg(root=str(root), image_size=16, cache_dir=str(tmp_path / "cache"))
    first = build_cache(scan_source(config), config)
    Image.new("L", (16, 16), 255).save(root / "a" / "p00_img00.png")
    second = build_cache(scan_source(config), config)
    assert second.pool_path.parent != first.pool_path.parent
    assert (load_cached(second.pool_path)[0] == 255).all()


def test_build_cache_npz(tmp_path):
    config = cfg(root=str(shared_npz("breastmnist.npz")), image_size=16, cache_dir=str(tmp_path))
    index = scan_source(config)
    cached = build_cache(index, config)
    assert load_cached(cached.pool_path).shape == (624, 1, 16, 16)
    assert load_cached(cached.test_path).shape == (156, 1, 16, 16)


# --------------------------------------------------------------------------- datasets + transforms


def test_cached_image_dataset_items():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 1, 0])
    dataset = CachedImageDataset(images, labels, np.array([4, 1, 3]))
    assert len(dataset) == 3
    image, label, index = dataset[0]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
    assert image.shape == (1, 8, 8)
    assert torch.equal(image, torch.from_numpy(images[4]))
    assert (label, index) == (1, 4)
    assert isinstance(label, int) and isinstance(index, int)
    assert dataset[2][1:] == (1, 3)


def test_augment_batch_flips_each_image_on_its_own_coin():
    torch.manual_seed(0)
    batch = torch.rand(64, 1, 6, 6)
    out = augment_batch(batch, AugmentConfig(hflip=True, vflip=False, rotation=0))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    flipped = [torch.equal(o, b.flip(-1)) for o, b in zip(out, batch, strict=True)]
    kept = [torch.equal(o, b) for o, b in zip(out, batch, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48  # per image, not one coin for the whole batch


def _line_angle_degrees(image: torch.Tensor) -> float:
    """Orientation of the bright structure from its intensity-weighted second moments."""
    rows, cols = torch.meshgrid(
        torch.arange(image.shape[0]), torch.arange(image.shape[1]), indexing="ij"
    )
    weight = image / image.sum()
    mean_r, mean_c = (weight * rows).sum(), (weight * cols).sum()
    mu_rr = (weight * (rows - mean_r) ** 2).sum()
    mu_cc = (weight * (cols - mean_c) ** 2).sum()
    mu_rc = (weight * (rows - mean_r) * (cols - mean_c)).sum()
    return math.degrees(0.5 * math.atan2(2 * mu_rc, mu_cc - mu_rr))


def test_augment_batch_rotates_each_image_by_its_own_angle_within_the_limit():
    line = torch.zeros(1, 33, 33)
    line[0, 16, 4:29] = 1.0  # a horizontal line through the centre
    batch = line.expand(64, -1, -1, -1).clone()
    torch.manual_seed(1)
    out = augment_batch(batch, AugmentConfig(hflip=False, vflip=False, rotation=10))
    angles = [_line_angle_degrees(image[0]) for image in out]
    assert max(abs(a) for a in angles) <= 10.5
    assert min(angles) < -4 and max(angles) > 4  # both directions, spread over the range
    assert len({round(a, 3) for a in angles}) > 50  # one angle per image
    assert out[:, 0, 16, 16].min() > 0.9  # the centre stays put
    assert out.min() >= 0 and out.max() <= 1.0 + 1e-6


def test_augment_batch_is_seeded_and_a_no_op_when_off():
    batch = torch.rand(8, 3, 16, 16)
    torch.manual_seed(5)
    first = augment_batch(batch, AugmentConfig(vflip=True))
    torch.manual_seed(5)
    assert torch.equal(first, augment_batch(batch, AugmentConfig(vflip=True)))
    off = AugmentConfig(hflip=False, vflip=False, rotation=0)
    assert torch.equal(augment_batch(batch, off), batch)
    uint8 = (batch * 255).to(torch.uint8)
    assert torch.equal(to_model_input(uint8, off), to_model_input(uint8))


def test_cached_image_dataset_reads_memmap(tmp_path):
    array = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    np.save(tmp_path / "pool.npy", array)
    dataset = CachedImageDataset(load_cached(tmp_path / "pool.npy"), np.array([0, 1]), [1])
    image, label, index = dataset[0]
    assert torch.equal(image, torch.from_numpy(array[1])) and (label, index) == (1, 1)


def test_to_model_input_grey():
    batch = torch.zeros((2, 1, 4, 4), dtype=torch.uint8)
    batch[1, 0, 2, 3] = 51  # 51 / 255 = 0.2
    batch[0, 0, 0, 0] = 255
    out = to_model_input(batch)
    assert out.dtype == torch.float32
    assert out.shape == (2, 3, 4, 4)
    for c in range(3):
        assert out[1, c, 2, 3].item() == pytest.approx(
            (0.2 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-5
        )
        assert out[0, c, 0, 0].item() == pytest.approx(
            (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-5
        )
        assert out[0, c, 1, 1].item() == pytest.approx(
            -IMAGENET_MEAN[c] / IMAGENET_STD[c], abs=1e-5
        )
    # red channel by hand: (0.2 - 0.485) / 0.229
    assert out[1, 0, 2, 3].item() == pytest.approx(-1.2445415, abs=1e-5)


def test_to_model_input_rgb_channels_are_independent():
    batch = torch.zeros((1, 3, 2, 2), dtype=torch.uint8)
    batch[0, 0], batch[0, 1], batch[0, 2] = 0, 102, 204  # 0.0, 0.4, 0.8
    out = to_model_input(batch)
    assert out[0, 0, 0, 0].item() == pytest.approx((0.0 - 0.485) / 0.229, abs=1e-5)
    assert out[0, 1, 0, 0].item() == pytest.approx((0.4 - 0.456) / 0.224, abs=1e-5)
    assert out[0, 2, 0, 0].item() == pytest.approx((0.8 - 0.406) / 0.225, abs=1e-5)


# --------------------------------------------------------------------------- demo data


def test_demo_source_has_two_classes():
    index = scan_source(DataConfig(root="demo"))
    assert index.name == "demo"
    assert index.class_names == ["lesion", "normal"]
    assert len(index.pool) == 400
    assert np.bincount(index.pool.labels).tolist() == [200, 200]
    # 25 held-back patients (odd numbers have lesions): 12 x 4 lesion, 13 x 4 normal images
    assert index.test is not None and np.bincount(index.test.labels).tolist() == [48, 52]
    # the demo is written into the session's private cache, not ~/.cache
    assert str(index.pool.paths[0]).startswith(str(data_mod.default_cache_root()))
    grouped = scan_source(DataConfig(root="demo", group_regex=r"^(p\d+)_"))
    assert len(set(grouped.pool.groups)) == 100
    assert not set(grouped.pool.groups) & set(grouped.test.groups)  # test patients are new


def test_demo_is_deterministic(tmp_path):
    write_demo_images(tmp_path / "one")
    write_demo_images(tmp_path / "two")
    first = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    second = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    assert first == second and len(first) == 500

    def digest(folder: Path) -> str:
        hasher = hashlib.sha256()
        for relative in first:
            hasher.update((folder / relative).read_bytes())
        return hasher.hexdigest()

    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    with Image.open(tmp_path / "one" / first[0]) as image:
        assert image.mode == "L" and image.size == (64, 64)


# --------------------------------------------------------------------------- cache failures


@pytest.mark.parametrize(
    "error",
    [
        OSError("Not enough free space to write 12345 bytes"),  # numpy's tofile: no errno
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["numpy-message", "ENOSPC"],
)
def test_full_disk_as_cache_dir_is_one_line_naming_it(tmp_path, monkeypatch, error):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    cache = tmp_path / "full-disk"
    config = cfg(root=str(root), image_size=8, cache_dir=str(cache))

    def disk_full(handle, array, *args, **kwargs):
        handle.write(b"\x93NUMPY partial")  # a torn write, then the disk is full
        raise error

    monkeypatch.setattr(data_mod.cache, "write_block", disk_full)  # where the cache writes
    with pytest.raises(UserError) as info:
        build_cache(scan_source(config), config)
    message = str(info.value)
    assert message.startswith(f"data.cache_dir {cache}: the disk is full")
    assert "free space there, or set data.cache_dir" in message and "\n" not in message
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]  # no partial file left


def test_unwritable_cache_dir_is_one_line(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    config = cfg(root=str(root), image_size=8, cache_dir=str(tmp_path / "ro"))

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(data_mod.cache, "write_block", read_only)
    with pytest.raises(UserError, match="cannot write the decoded images .Permission denied"):
        build_cache(scan_source(config), config)


def test_full_disk_through_the_train_cli(tmp_path, monkeypatch, capsys):
    import distmed.pipeline
    import distmed.train

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start")

    def disk_full(*args, **kwargs):
        raise OSError("Not enough free space to write 4096 bytes")

    monkeypatch.setattr(distmed.pipeline, "start_ray", no_ray)
    monkeypatch.setattr(data_mod.cache, "write_block", disk_full)
    root = write_image_folder(tmp_path / "flat", {"a": 6, "b": 6})
    argv = ["--data", str(root), "--output", str(tmp_path / "out"), "--set", "cv.folds=2"]
    argv += ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "model.weights=none"]
    argv += ["--set", "train.batch_size=2", "--set", "data.image_size=8"]
    assert distmed.train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: data.cache_dir {tmp_path / 'cache'}: the disk is full")
    assert "\n" not in err


def test_a_killed_decode_leaves_no_temporary_file_after_the_next_run(tmp_path):
    """A writer SIGKILLed mid-write leaves `.pool.npy.tmp<pid>`; the next build removes it."""
    import subprocess

    cache = tmp_path / "cache"
    victim = cache / "decoded" / "killed-8px-0123" / "pool.npy"
    victim.parent.mkdir(parents=True)
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from distmed.artifacts import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_bytes(b'x' * 100000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(victim)], check=False)
    assert done.returncode == -9
    (left,) = victim.parent.glob(".pool.npy.tmp*")  # what the kill left behind
    live = victim.parent / f".test.npy.tmp{os.getpid()}"  # a writer still at work
    live.write_bytes(b"in progress")
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    config = cfg(root=str(root), image_size=8, cache_dir=str(cache))
    build_cache(scan_source(config), config)
    assert not left.exists()
    assert live.exists()  # never another live process's file


def test_very_old_temporary_files_are_removed(tmp_path):
    folder = tmp_path / "decoded" / "x"
    folder.mkdir(parents=True)
    old = folder / f".pool.npy.tmp{os.getpid()}"  # e.g. written from another host long ago
    old.write_bytes(b"x")
    os.utime(old, (1, 1))
    (folder / "pool.npy").write_bytes(b"kept")
    assert data_mod.cache.remove_stale_temporaries(tmp_path) == 1
    assert not old.exists() and (folder / "pool.npy").exists()


def test_group_csv_with_a_byte_order_mark(tmp_path):
    """Spreadsheets save "CSV UTF-8" with a BOM before the first column name."""
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    table = tmp_path / "groups.csv"
    rows = "path,group\na/p00_img00.png,P1\na/p00_img01.png,P1\nb/p00_img00.png,Ö2\n"
    rows += "b/p00_img01.png,Ö2\n"
    table.write_bytes(rows.encode("utf-8-sig"))
    assert table.read_bytes().startswith(b"\xef\xbb\xbf")
    index = scan_folder(root, cfg(group_csv=str(table)))
    assert index.pool.groups.tolist() == ["P1", "P1", "Ö2", "Ö2"]


def test_group_csv_in_cp1252_is_read_and_other_bytes_are_one_line(tmp_path):
    """Excel's plain "CSV" in Western locales is Windows-1252 (and ';'-separated in Europe);
    bytes that are not text in it either are refused naming the encoding."""
    root = write_image_folder(tmp_path / "flat", {"a": 2, "b": 2})
    table = tmp_path / "groups.csv"
    rows = [
        f"{c}/p00_img0{i}.png;{name}" for c, name in (("a", "Jürgen"), ("b", "Zoë")) for i in (0, 1)
    ]
    table.write_bytes("\r\n".join(["path;group", *rows]).encode("cp1252"))
    index = scan_folder(root, cfg(group_csv=str(table)))
    assert index.pool.groups.tolist() == ["Jürgen", "Jürgen", "Zoë", "Zoë"]
    table.write_bytes(b"path,group\na/p00_img00.png,J\x81rgen\n")
    with pytest.raises(UserError, match=r"neither UTF-8 nor Windows-1252 text \(byte 0x81"):
        scan_folder(root, cfg(group_csv=str(table)))


def test_npz_classes_are_named_by_data_class_names(tmp_path):
    npz = str(write_npz(tmp_path / "tiny.npz"))
    assert scan_source(cfg(root=npz)).class_names == ["0", "1"]
    named = scan_source(cfg(root=npz, class_names=["normal", "malignant"]))
    assert named.class_names == ["normal", "malignant"]
    with pytest.raises(UserError, match="give 2 distinct names, got 3"):
        scan_source(cfg(root=npz, class_names=["a", "b", "c"]))
    with pytest.raises(UserError, match="with repeats"):
        scan_source(cfg(root=npz, class_names=["a", "a"]))
    folder = write_image_folder(tmp_path / "f", {"a": 2, "b": 2})
    with pytest.raises(UserError, match="named by its folders"):
        scan_source(cfg(root=str(folder), class_names=["x", "y"]))
