"""distmed.data.inspection and `python -m distmed.data`: counts, formats, skipped files,
patients and planted duplicates (copied into test, same pixels under two names, one image in
two classes), and how train/tune print, store and act on it (no Ray is started here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_npz, write_image_folder
from PIL import Image

import distmed.data.inspection as inspection_mod
import distmed.pipeline
import distmed.train
from distmed.config import DataConfig
from distmed.data import describe_index, scan_source
from distmed.data.__main__ import main as inspect_main
from distmed.data.inspection import (
    check_duplicates,
    duplicate_problem,
    format_summary,
    inspect_index,
)
from distmed.errors import UserError


def inspect(root: Path, **kwargs) -> dict:
    config = DataConfig(root=str(root), **kwargs)
    return inspect_index(scan_source(config), config)


def planted(tmp_path: Path) -> Path:
    """train/valid/test with three planted duplicates of the three kinds."""
    root = tmp_path / "d"
    for seed, (split, n) in enumerate((("train", 6), ("valid", 2), ("test", 3))):
        write_image_folder(root / split, {"NORMAL": n, "PNEUMONIA": n}, seed=seed)
    # 1. the same file copied into test (test leakage, byte-identical)
    shutil.copy(root / "train/NORMAL/p00_img00.png", root / "test/NORMAL/copy_of_train.png")
    # 2. the same pixels saved under another name and format, same split and class
    with Image.open(root / "train/PNEUMONIA/p01_img02.png") as image:
        image.save(root / "train/PNEUMONIA/resaved.bmp")
    # 3. one image in two classes (label conflict)
    shutil.copy(root / "train/NORMAL/p02_img05.png", root / "train/PNEUMONIA/from_normal.png")
    return root


def files_of(summary: dict, kind: str) -> list[list[str]]:
    return [group["files"] for group in summary["duplicates"][kind]["groups"]]


def test_planted_duplicates_are_all_reported_with_their_paths(tmp_path):
    summary = inspect(planted(tmp_path))
    assert files_of(summary, "across_splits") == [
        ["train/NORMAL/p00_img00.png (NORMAL)", "test/NORMAL/copy_of_train.png (NORMAL)"]
    ]
    assert summary["duplicates"]["across_splits"]["groups"][0]["kind"] == "byte-identical"
    assert files_of(summary, "within_split") == [
        ["train/PNEUMONIA/p01_img02.png (PNEUMONIA)", "train/PNEUMONIA/resaved.bmp (PNEUMONIA)"]
    ]
    assert summary["duplicates"]["within_split"]["groups"][0]["kind"] == "same pixels"
    assert files_of(summary, "across_classes") == [
        ["train/NORMAL/p02_img05.png (NORMAL)", "train/PNEUMONIA/from_normal.png (PNEUMONIA)"]
    ]
    assert [summary["duplicates"][k]["count"] for k in inspection_mod.DUPLICATE_KINDS] == [2, 2, 2]
    problem = duplicate_problem(summary)
    assert "2 in more than one split" in problem and "2 in more than one class" in problem
    assert "copy_of_train.png" in problem and "\n" not in problem


def test_counts_formats_modes_sizes_and_bit_depths(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "Training", {"a": 3, "b": 2}, size=20)
    write_image_folder(root / "Testing", {"a": 1, "b": 1}, size=12, mode="RGB", suffix=".jpg")
    Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 100).save(
        root / "Training/a/deep.png"
    )
    (root / "Training/a/.DS_Store").write_bytes(b"Bud1")
    (root / "Training/b/broken.png").write_bytes(b"")
    summary = inspect(root)
    assert summary["layout"] == "split folders Training/ (train), Testing/ (test)"
    assert summary["splits"] == {
        "train": {"images": 7, "per_class": {"a": 4, "b": 3}},
        "test": {"images": 2, "per_class": {"a": 1, "b": 1}},
    }
    images = summary["images"]
    assert images["formats"] == {"PNG": 6, "JPEG": 2}
    assert images["modes"] == {"L": 5, "RGB": 2, "I;16": 1} or images["modes"]["I;16"] == 1
    assert images["sizes"] == {"20x20": 6, "12x12": 2}
    assert images["bit_depths"] == {"8-bit": 7, "16-bit": 1}
    assert summary["skipped"]["count"] == 1 and summary["skipped"]["first"] == [
        "Training/a/.DS_Store (hidden (.*))"
    ]
    assert summary["unreadable"]["count"] == 1
    assert summary["unreadable"]["first"][0].startswith("Training/b/broken.png")


def test_patients_per_split_and_patients_shared_with_test(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "train", {"a": 4, "b": 4})  # patients p00, p01
    write_image_folder(root / "test", {"a": 2, "b": 2}, seed=1)  # p00 again: shared
    summary = inspect(root, group_regex=r"^(p\d+)_")
    assert summary["patients"]["train"] == 2 and summary["patients"]["test"] == 1
    assert summary["patients"]["in_pool_and_test"] == {"count": 1, "first": ["p00"]}
    # a patient with images of both classes counts in each, as the fold check counts them
    assert summary["patients"]["per_class"] == {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}
    assert "train: 8 images (a 4, b 4), 2 patients (a 2, b 2)" in format_summary(summary)
    assert inspect(root)["patients"] is None


def test_breastmnist_npz_counts_and_its_duplicate():
    summary = inspect(shared_npz("breastmnist.npz"))
    assert summary["splits"] == {
        "train": {"images": 546, "per_class": {"0": 147, "1": 399}},
        "val": {"images": 78, "per_class": {"0": 21, "1": 57}},
        "test": {"images": 156, "per_class": {"0": 42, "1": 114}},
    }
    assert summary["images"]["sizes"] == {"28x28": 780}
    # a real finding: the same 28x28 pixels in train (benign) and in test (malignant)
    assert files_of(summary, "across_classes") == [["train/115 (0)", "test/76 (1)"]]


def test_inspection_is_cached_per_fingerprint(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "d", {"a": 2, "b": 2})
    first = inspect(root)

    def no_reading(*args):
        raise AssertionError("the cached inspection should have been reused")

    monkeypatch.setattr(inspection_mod, "_file_survey", no_reading)
    assert inspect(root) == first


def test_inspect_cli_prints_counts_and_writes_json(tmp_path, capsys):
    root = planted(tmp_path)
    out = tmp_path / "summary.json"
    assert inspect_main([str(root), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "split folders train/, valid/ (val), test/" in text
    assert "train: 14 images (NORMAL 6, PNEUMONIA 8)" in text
    assert "val: 4 images (NORMAL 2, PNEUMONIA 2)" in text
    assert "test: 7 images (NORMAL 4, PNEUMONIA 3)" in text
    assert "formats: PNG 24, BMP 1" in text
    assert "test/NORMAL/copy_of_train.png" in text and "resaved.bmp" in text
    assert "warning: identical images" in text
    assert json.loads(out.read_text()) == inspect(root)


def test_the_scored_class_of_a_binary_set_is_said(tmp_path, capsys):
    """abnormal/normal sorts 'normal' second: without a word the user reads sensitivity as
    the abnormal class's (new-user try)."""
    root = write_image_folder(tmp_path / "d", {"abnormal": 2, "normal": 2})
    assert inspect_main([str(root)]) == 0
    assert "positive class (sensitivity, ROC, threshold): normal;" in capsys.readouterr().out
    chosen = DataConfig(root=str(root), positive_class="abnormal")
    assert inspect_index(scan_source(chosen), chosen)["positive_class"] == "abnormal"
    three = write_image_folder(tmp_path / "three", {"a": 2, "b": 2, "c": 2})
    assert inspect(three)["positive_class"] is None  # multi-class: every class is scored


def test_a_sheet_with_ids_in_its_label_column_gets_a_note(tmp_path, capsys):
    """A new user's sheet with `group` and `label` swapped inspected as 40 classes of 2
    images without a word; a real set of a few classes gets no note."""
    root = write_image_folder(tmp_path / "d", {"lesion": 40, "normal": 40})
    files = sorted(root.rglob("*.png"))
    sheet = root / "swapped.csv"
    ids = [f.parent.name[0] + f.name.split("_")[0] for f in files]  # l00, n00: 2 images each
    rows = [f"{f.relative_to(root)},{f.parent.name},{i}" for f, i in zip(files, ids, strict=True)]
    sheet.write_text("path,group,label\n" + "\n".join(rows) + "\n")
    assert inspect_main([str(sheet)]) == 0
    text = capsys.readouterr().out
    assert "note: 40 classes with a median of 2 image(s) each: is the label the one you" in text
    assert inspect_main([str(root)]) == 0
    assert "note:" not in capsys.readouterr().out


def test_unreadable_reasons_are_whole_and_the_file_named_in_full(tmp_path, capsys):
    """A decoder's reason naming the file's long path was cut mid-path at 60 characters
    (new-user try): the listing names the file, its reason is said whole and counted once."""
    root = write_image_folder(tmp_path / ("site_export_" * 6) / "deeper", {"a": 3, "b": 3})
    for name in ("a/not_an_image_at_all.png", "b/also_not_an_image.jpg"):
        (root / name).write_bytes(b"hello, this is text")
    assert inspect_main([str(root)]) == 0
    text = capsys.readouterr().out
    reason = "UnidentifiedImageError: cannot identify image file"
    assert f"unreadable: 2 ({reason} 2)" in text
    assert f"    a/not_an_image_at_all.png ({reason})" in text
    assert f"    b/also_not_an_image.jpg ({reason})" in text


def test_a_long_unreadable_reason_is_cut_at_a_space_not_in_a_path(tmp_path):
    other = "/".join(["folder"] * 40) + "/lib.so"  # a path the decoder names, not the file
    exc = OSError(f"decoder plugin failed: {'x' * 150} cannot load {other} (code 7)")
    reason = inspection_mod.unreadable_reason(exc, tmp_path / "scan.png")
    assert reason.startswith("OSError: decoder plugin failed: ") and reason.endswith(" …")
    assert other not in reason and "folder/" not in reason
    assert len(reason) <= inspection_mod.MAX_REASON_CHARS + 2
    short = OSError(f"cannot load {other}")
    assert inspection_mod.unreadable_reason(short, tmp_path / "x.png") == "OSError: cannot load …"


def test_inspect_cli_bad_root_is_one_line(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.root") and "\n" not in err


def test_on_duplicates_warns_by_default_and_errors_when_asked(tmp_path):
    summary = inspect(planted(tmp_path))
    assert "identical images" in check_duplicates(summary, DataConfig())
    with pytest.raises(UserError, match="data.on_duplicates=warn"):
        check_duplicates(summary, DataConfig(on_duplicates="error"))
    clean = inspect(write_image_folder(tmp_path / "clean", {"a": 2, "b": 2}))
    assert check_duplicates(clean, DataConfig(on_duplicates="error")) is None


class RayStarted(Exception):
    pass


def _no_ray(*args, **kwargs):
    raise RayStarted("stop before Ray")


def test_train_prints_the_short_summary_and_warns_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distmed.pipeline, "start_ray", _no_ray)
    root = planted(tmp_path)
    argv = ["--data", str(root), "--output", str(tmp_path / "out"), "--cpu"]
    argv += ["--set", "cv.folds=2", "--set", "data.image_size=8", "--set", "model.weights=none"]
    argv += ["--set", "train.batch_size=4"]
    assert distmed.train.main(argv) == 1  # stopped at Ray by the test
    captured = capsys.readouterr()
    assert "data: d: split folders train/, valid/ (val), test/" in captured.out
    assert "duplicates: 2 within split, 2 across splits, 2 across classes" in captured.out
    assert "warning: identical images" in captured.err


def test_train_with_on_duplicates_error_stops_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distmed.pipeline, "start_ray", _no_ray)
    root = planted(tmp_path)
    argv = ["--data", str(root), "--output", str(tmp_path / "out")]
    code = distmed.train.main([*argv, "--set", "data.on_duplicates=error"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: identical images") and "\n" not in err


def test_results_store_the_inspection(tmp_path):
    config = DataConfig(root=str(planted(tmp_path)))
    index = scan_source(config)
    summary = inspect_index(index, config)
    described = describe_index(index, summary)
    assert described["layout"] == index.layout and described["num_test_images"] == 7
    assert described["inspection"]["duplicates"]["across_splits"]["count"] == 2
    json.dumps(described)  # it goes into cv_result.json / summary.json as it is


def test_the_inspect_command_prints_every_duplicate_group(tmp_path, capsys):
    # Eight images each copied into the other class: more groups than the short lists show.
    root = write_image_folder(tmp_path / "data", {"a": 8, "b": 8})
    for image in sorted((root / "a").glob("*.png")):
        shutil.copy(image, root / "b" / f"copy_{image.name}")
    assert inspect_main([str(root)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("across classes, ") == 8, printed
    for image in sorted((root / "a").glob("*.png")):
        assert f"copy_{image.name}" in printed
