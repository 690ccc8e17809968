"""distmed.data.layout: image folders as they really arrive (split names, wrappers, clutter,
symbolic links) give the right classes, splits and counts, or one line naming the folder."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_image_folder

import distmed.pipeline
import distmed.train
from distmed.config import DataConfig
from distmed.data import scan_folder, scan_source
from distmed.data.layout import CLUTTER_NAMES, clutter_reason, split_of
from distmed.errors import UserError


def scan(root: Path):
    return scan_folder(root, DataConfig())


def counts(split) -> Counter:
    """(origin split, label) -> images: what a person would count by hand."""
    return Counter(
        (str(o), int(label)) for o, label in zip(split.origins, split.labels, strict=True)
    )


def write_split_folder(root: Path, names=("train", "valid", "test"), sizes=(4, 2, 3)) -> Path:
    for seed, (name, n) in enumerate(zip(names, sizes, strict=True)):
        write_image_folder(root / name, {"NORMAL": n, "PNEUMONIA": n}, seed=seed)
    return root


def user_error(root: Path) -> str:
    with pytest.raises(UserError) as info:
        scan(root)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- split names


@pytest.mark.parametrize(
    "names",
    [
        ("train", "valid", "test"),  # case 08: the Roboflow export
        ("Training", "Validation", "Testing"),
        ("TRAIN", "dev", "holdout"),
        ("train", "val", "test"),
        ("training", "VAL", "Test"),
    ],
)
def test_split_folder_names_are_recognised_case_insensitively(tmp_path, names):
    root = write_split_folder(tmp_path / "d", names)
    index = scan(root)
    assert index.class_names == ["NORMAL", "PNEUMONIA"]  # never the split names
    assert counts(index.pool) == {("train", 0): 4, ("train", 1): 4, ("val", 0): 2, ("val", 1): 2}
    assert index.test is not None and len(index.test) == 6
    assert all(i.startswith(f"{names[2]}/") for i in index.test.ids)
    assert not set(index.pool.ids) & set(index.test.ids)
    assert names[1] in index.layout


def test_split_folder_without_validation_split(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "Training", {"a": 3, "b": 3})
    write_image_folder(root / "Testing", {"a": 2, "b": 2}, seed=1)
    index = scan(root)
    assert len(index.pool) == 6 and len(index.test) == 4


def test_split_names_table():
    assert [split_of(n) for n in ("TRAINING", "Dev", "holdout", "validation", "x")] == [
        "train",
        "val",
        "test",
        "val",
        None,
    ]


# --------------------------------------------------------------------------- wrapper level


@pytest.mark.parametrize("inner", ["chest_xray", "d"])  # another name, or the same as ROOT
def test_one_wrapper_level_is_unwrapped(tmp_path, inner):
    root = tmp_path / "d"
    write_split_folder(root / inner, ("train", "val", "test"))
    (root / "__MACOSX" / inner).mkdir(parents=True)  # what a zip made on a Mac adds
    (root / "__MACOSX" / inner / "._x.png").write_bytes(b"\x00\x05\x16\x07")
    index = scan(root)
    assert index.class_names == ["NORMAL", "PNEUMONIA"]
    assert len(index.pool) == 12 and len(index.test) == 6
    assert index.pool.ids[0].startswith(f"{inner}/train/")
    assert f"wrapper {inner}/" in index.layout
    assert index.ignored == {"__MACOSX/": "macOS archive folder (__MACOSX)"}


def test_wrapper_around_class_folders(tmp_path):
    write_image_folder(tmp_path / "d" / "brain_mri", {"no": 3, "yes": 2})
    index = scan(tmp_path / "d")
    assert index.class_names == ["no", "yes"] and len(index.pool) == 5


def test_only_one_wrapper_level(tmp_path):
    write_image_folder(tmp_path / "d" / "outer" / "inner", {"a": 2, "b": 2})
    message = user_error(tmp_path / "d")  # `inner` would be the only class
    assert "only one class (inner)" in message


# --------------------------------------------------------------------------- clutter


CLUTTER = [".DS_Store", "._p00_img00.png", "Thumbs.db", "desktop.ini", ".hidden.png"]
CLUTTER_DIRS = ["__MACOSX", "@eaDir", ".ipynb_checkpoints", ".git", ".thumbnails"]


@pytest.mark.parametrize("where", ["", "train", "train/a", "train/a/patient1", "test/b"])
def test_clutter_is_skipped_everywhere_and_counted(tmp_path, where):
    root = tmp_path / "d"
    write_image_folder(root / "train", {"a": 4, "b": 4})
    write_image_folder(root / "test", {"a": 2, "b": 2}, seed=1)
    write_image_folder(root / "train" / "a" / "patient1", {"x": 1}, seed=2)  # 1 more image of a
    folder = root / where
    for name in CLUTTER:
        (folder / name).write_bytes(b"\x00\x05\x16\x07 clutter")
    for name in CLUTTER_DIRS:  # clutter folders holding real images must not add any
        write_image_folder(folder / name, {"copies": 3}, seed=3)
    index = scan(root)
    assert counts(index.pool) == {("train", 0): 5, ("train", 1): 4}
    assert len(index.test) == 4
    prefix = f"{where}/" if where else ""
    expected = {prefix + n for n in CLUTTER} | {f"{prefix}{n}/" for n in CLUTTER_DIRS}
    assert expected <= set(index.ignored)
    assert not any("copies" in i for i in index.pool.ids + index.test.ids)


def test_case_01_hidden_clutter(tmp_path):
    """Finder and Jupyter leftovers, also a checkpoint folder of images inside a class."""
    root = write_image_folder(tmp_path / "d", {"NORMAL": 8, "PNEUMONIA": 8})
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(8):
            (root / cls / f"._p{i // 2:02d}_img{i:02d}.png").write_bytes(b"\x00\x05\x16\x07")
        (root / cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".DS_Store").write_bytes(b"Bud1")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "explore-checkpoint.ipynb").write_text("{}")
    write_image_folder(root / "PNEUMONIA", {".ipynb_checkpoints": 3}, seed=5)
    index = scan(root)
    assert index.class_names == ["NORMAL", "PNEUMONIA"]
    assert counts(index.pool) == {("all", 0): 8, ("all", 1): 8}
    assert len(index.ignored) == 21  # 16 AppleDouble twins, 3 .DS_Store, 2 checkpoint folders


@pytest.mark.parametrize("name", sorted(CLUTTER_NAMES))
def test_every_clutter_name_is_known_in_any_case(name):
    assert clutter_reason(name) and clutter_reason(name.upper())
    assert clutter_reason("NORMAL") is None and clutter_reason("img.png") is None


def test_loose_files_and_non_images_are_counted(tmp_path):
    root = write_image_folder(tmp_path / "d", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "tmp", {"x": 1})
    (tmp_path / "tmp" / "x" / "p00_img00.png").rename(root / "stray.png")
    (root / "labels.csv").write_text("path,label\n")
    (root / "a" / "notes.txt").write_text("n")
    index = scan(root)
    assert len(index.pool) == 4
    assert index.ignored == {
        "a/notes.txt": "not an image file (.txt)",
        "labels.csv": "not an image file (.csv)",
        "stray.png": "image outside any class folder",
    }


# --------------------------------------------------------------------------- symbolic links


def _patient_store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    for p in range(1, 9):
        write_image_folder(store / f"P{p:02d}", {"scans": 3}, seed=p)
    write_image_folder(store, {"extra_normal": 4}, seed=9)
    return store


@pytest.mark.parametrize("linked", ["all", "some"])
def test_symlinked_folders_are_followed(tmp_path, linked):
    """Case 11: class folders assembled from links to patient folders (all or some)."""
    store = _patient_store(tmp_path)
    root = tmp_path / "data"
    for label, patients in (("normal", range(1, 5)), ("abnormal", range(5, 9))):
        (root / label).mkdir(parents=True)
        for p in patients:
            target = store / f"P{p:02d}" / "scans"
            if linked == "all":
                os.symlink(target, root / label / f"P{p:02d}")
            else:
                target.rename(root / label / f"P{p:02d}")
    os.symlink(store / "extra_normal", root / "normal" / "extra_scans")
    index = scan(root)
    assert index.class_names == ["abnormal", "normal"]
    assert counts(index.pool) == {("all", 0): 12, ("all", 1): 16}
    assert "normal/extra_scans/p00_img00.png" in index.pool.ids  # ids keep the link's path


def test_symlinked_class_folders_are_followed(tmp_path):
    store = write_image_folder(tmp_path / "store", {"a": 3, "b": 2})
    (tmp_path / "d").mkdir()
    for name in ("a", "b"):
        os.symlink(store / name, tmp_path / "d" / name)
    assert counts(scan(tmp_path / "d").pool) == {("all", 0): 3, ("all", 1): 2}


@pytest.mark.parametrize("target", ["class", "root", "above-root"])
def test_symlink_loop_is_one_line_naming_it(tmp_path, target):
    root = write_image_folder(tmp_path / "d", {"a": 2, "b": 2})
    (root / "a" / "sub").mkdir()
    points_to = {"class": root / "a", "root": root, "above-root": tmp_path}[target]
    os.symlink(points_to, root / "a" / "sub" / "again")
    message = user_error(root)
    assert "link loop" in message and "a/sub/again" in message and "remove" in message


def test_broken_link_is_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "d", {"a": 2, "b": 2})
    os.symlink(tmp_path / "gone.png", root / "a" / "moved.png")
    index = scan(root)
    assert len(index.pool) == 4
    assert index.ignored == {"a/moved.png": "broken symbolic link"}


# --------------------------------------------------------------------------- ambiguous layouts


def test_split_folder_beside_class_folders(tmp_path):
    root = write_image_folder(tmp_path / "d", {"NORMAL": 3, "PNEUMONIA": 3})
    write_image_folder(root / "test", {"NORMAL": 1, "PNEUMONIA": 1})
    message = user_error(root)
    assert str(root) in message and "test/" in message and "NORMAL/" in message
    assert "move every class folder into the split folders" in message


def test_two_folders_for_one_split(tmp_path):
    root = write_split_folder(tmp_path / "d", ("train", "val", "valid"))
    message = user_error(root)
    assert "val/ and valid/ are both the val split" in message and "merge" in message


def test_split_folders_without_a_training_split(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "valid", {"a": 2, "b": 2})
    write_image_folder(root / "test", {"a": 2, "b": 2})
    message = user_error(root)
    assert "no training split" in message and "train/" in message


def test_class_folder_named_like_a_split(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "train", {"cat": 2, "test": 2})
    write_image_folder(root / "test", {"cat": 2, "test": 2})
    message = user_error(root)
    assert "class folder" in message and "train/test" in message and "split's name" in message


@pytest.mark.parametrize("inner", [("train", "test"), ("site_a", "site_b", "site_c")])
def test_same_sub_folders_under_every_class_folder(tmp_path, inner):
    root = tmp_path / "d"
    for cls in ("NORMAL", "PNEUMONIA"):
        write_image_folder(root / cls, dict.fromkeys(inner, 2))
    message = user_error(root)
    assert "NORMAL/, PNEUMONIA/" in message and "one level off" in message
    assert all(name in message for name in inner)
    assert "ROOT/<split>/<class>/" in message


def test_patient_sub_folders_are_not_one_level_off(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "a", {"P1": 2, "P2": 2})
    write_image_folder(root / "b", {"P3": 2, "P4": 2})
    assert len(scan(root).pool) == 8


def test_classes_differ_between_splits_names_the_real_folder(tmp_path):
    root = write_split_folder(tmp_path / "d", ("Training", "Valid", "Testing"))
    write_image_folder(root / "Valid", {"COVID": 1})
    message = user_error(root)
    assert "Valid/" in message and "COVID" in message and "Training/" in message


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("layout", ["split-beside-class", "loop"])
def test_ambiguous_layout_through_the_train_cli_is_one_line(tmp_path, capsys, layout, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(distmed.pipeline, "start_ray", no_ray)
    root = write_image_folder(tmp_path / "d", {"a": 6, "b": 6})
    if layout == "loop":
        os.symlink(root, root / "a" / "loop")
    else:
        write_image_folder(root / "Testing", {"a": 2, "b": 2})
    out = tmp_path / "out"
    code = distmed.train.main(["--data", str(root), "--output", str(out), "--cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_scan_source_of_a_split_folder_reports_the_layout(tmp_path):
    root = write_split_folder(tmp_path / "d", ("train", "valid", "test"))
    index = scan_source(DataConfig(root=str(root)))
    assert index.layout == "split folders train/, valid/ (val), test/"
