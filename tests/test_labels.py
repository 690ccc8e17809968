"""Labels as the user meant them: spellings of one label, label sets, two columns of one name,
spreadsheet dialects (separator, encoding, `sep=` line, backslash paths), impossible paths and
`.npz` labels that are not class numbers; through the scan and `python -m distmed.data`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

from distmed.config import DataConfig
from distmed.data import inspect_index, scan_source
from distmed.data.__main__ import main as inspect_main
from distmed.data.inspection import duplicate_problem, format_summary
from distmed.errors import UserError


def write_sheet(root: Path, labels: list[str], name: str = "labels.csv") -> Path:
    """ROOT/images/imgNN.png, one per label, and a comma sheet `path,label`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for i, label in enumerate(labels):
        pixels = np.full((8, 8), i * 7 % 256, dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"img{i:02d}.png")
        cell = f'"{label}"' if "," in label else label
        rows.append(f"images/img{i:02d}.png,{cell}")
    sheet = root / name
    sheet.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return sheet


def scan(sheet: Path, **fields) -> object:
    return scan_source(DataConfig(root=str(sheet), **fields))


def refusal(source: Path, *overrides: str, capsys) -> str:
    """`python -m distmed.data SOURCE`: exit 2 and the one line it printed."""
    assert inspect_main([str(source), *(f"--set={o}" for o in overrides)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# --------------------------------------------------------------------------- label spellings

COVID = ["COVID"] * 4 + ["covid"] * 2 + [" Covid "] * 2 + ["Healthy"] * 5 + ["healthy"] * 3


def test_spellings_of_one_label_stop_with_the_spellings(tmp_path, capsys):
    sheet = write_sheet(tmp_path, COVID)
    with pytest.raises(UserError) as info:
        scan(sheet)
    message = str(info.value)
    assert "labels `COVID` ×4, `covid` ×2, ` Covid ` ×2 differ only in case/spaces" in message
    assert "`Healthy` = `healthy`" in message and "data.normalize_labels: true" in message
    assert "labels `COVID`" in refusal(sheet, capsys=capsys)


def test_normalize_labels_merges_into_the_most_common_spelling(tmp_path, capsys):
    sheet = write_sheet(tmp_path, COVID)
    index = scan(sheet, normalize_labels=True)
    assert index.class_names == ["COVID", "Healthy"]
    assert np.bincount(index.pool.labels).tolist() == [8, 8]
    assert index.merged_labels == {
        "COVID": {"COVID": 4, "covid": 2, " Covid ": 2},
        "Healthy": {"Healthy": 5, "healthy": 3},
    }
    config = DataConfig(root=str(sheet), normalize_labels=True, cache_dir=str(tmp_path / "c"))
    summary = inspect_index(index, config)  # what train/tune store in their results
    assert summary["merged_labels"] == index.merged_labels
    assert "labels merged (data.normalize_labels): COVID <- `COVID` 4" in format_summary(
        summary, short=True
    )
    out = tmp_path / "summary.json"
    argv = [str(sheet), "--set", "data.normalize_labels=true", "--json", str(out)]
    assert inspect_main([*argv, "--set", f"data.cache_dir={tmp_path / 'c'}"]) == 0
    assert "train: 16 images (COVID 8, Healthy 8)" in capsys.readouterr().out
    assert json.loads(out.read_text())["merged_labels"]["Healthy"] == {"Healthy": 5, "healthy": 3}


def test_a_tie_is_named_by_the_spelling_first_in_the_sheet(tmp_path):
    index = scan(
        write_sheet(tmp_path, ["benign", "Benign", "malignant", "malignant"]), normalize_labels=True
    )
    assert index.class_names == ["benign", "malignant"]


def test_one_number_written_two_ways_stops(tmp_path):
    with pytest.raises(UserError, match=r"labels `1` ×2, `1\.0` ×1 differ only in number format"):
        scan(write_sheet(tmp_path, ["0", "1", "0", "1", "1.0"]))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            ["0", "1", "-1", "1", "-1"],
            r"labels `-1` ×2 are not class numbers \(first in row 4; 2 of 5 rows\); a negative",
        ),
        (["0", "1", "0.5", "1"], r"labels `0\.5` ×1 are not class numbers .*fractional"),
        (["normal", "NaN", "tumour", "normal"], r"row 3: label `NaN` marks a missing value"),
    ],
    ids=["uncertain-minus-one", "fraction", "nan"],
)
def test_manifest_labels_that_are_no_class(tmp_path, labels, message):
    with pytest.raises(UserError, match=message):
        scan(write_sheet(tmp_path, labels))


# --------------------------------------------------------------------------- label sets


@pytest.mark.parametrize(
    "labels",
    [
        ["Mass", "Nodule", "Mass;Nodule", "Nodule", "Mass"],
        ["Edema", "Consolidation", "Edema, Consolidation", "Edema"],
        ["No Finding", "Hernia", "Hernia|Pneumothorax", "No Finding"],
    ],
    ids=["semicolon", "comma", "pipe-one-known"],
)
def test_label_sets_point_at_multilabel(tmp_path, capsys, labels):
    sheet = write_sheet(tmp_path, labels)
    with pytest.raises(UserError) as info:
        scan(sheet)
    message = str(info.value)
    assert "distmed trains one label per image; these are label sets (multi-label)" in message
    assert "data.label_delimiter:" in message and "row 4" in message
    assert "label sets (multi-label)" in refusal(sheet, capsys=capsys)


def test_a_comma_inside_a_class_name_is_not_a_set(tmp_path):
    """Only one part ('Benign') is a label of its own: a class name, not a set."""
    index = scan(write_sheet(tmp_path, ["Benign", "Benign, NOS", "Malignant", "Benign, NOS"]))
    assert index.class_names == ["Benign", "Benign, NOS", "Malignant"]


def test_class_folders_are_checked_as_labels(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", {"Tumor": 3, "tumor": 2, "healthy": 4})
    with pytest.raises(UserError, match=r"class folders in .*`Tumor` ×3, `tumor` ×2 .*merge the"):
        scan_source(DataConfig(root=str(root)))
    index = scan_source(DataConfig(root=str(root), normalize_labels=True))
    assert index.class_names == ["Tumor", "healthy"]
    assert np.bincount(index.pool.labels).tolist() == [5, 4]


def test_class_folders_that_differ_between_splits_only_in_case_are_spellings(tmp_path):
    """A new user's export: `train/normal` and `test/Normal ` are one class written two ways;
    refused as spellings (not as 'different classes'), merged with normalize_labels, the test
    split's images labelled as the train split's class of that name."""
    root = tmp_path / "d"
    write_image_folder(root / "train", {"normal": 4, "Effusion": 3})
    write_image_folder(root / "test", {"Normal ": 2, "effusion": 2}, seed=2)
    with pytest.raises(
        UserError,
        match=r"`Effusion` ×3, `effusion` ×2 differ only in case.*"
        r"`normal` = `Normal `: merge the folders or set data.normalize_labels",
    ):
        scan_source(DataConfig(root=str(root)))
    index = scan_source(DataConfig(root=str(root), normalize_labels=True))
    assert index.class_names == ["Effusion", "normal"]  # the most common spellings
    assert np.bincount(index.pool.labels).tolist() == [3, 4]
    assert np.bincount(index.test.labels).tolist() == [2, 2]
    named = {
        p.parent.name: index.class_names[k]
        for p, k in zip(index.test.paths, index.test.labels, strict=True)
    }
    assert named == {"Normal ": "normal", "effusion": "Effusion"}
    assert set(index.merged_labels) == {"normal", "Effusion"}


# --------------------------------------------------------------------------- columns


@pytest.mark.parametrize(
    ("header", "column"), [("path,Label,label ", "label"), ("PATH,label,Path", "path")]
)
def test_two_columns_of_one_name_stop_naming_both(tmp_path, capsys, header, column):
    sheet = write_sheet(tmp_path, ["a", "b"])
    rows = sheet.read_text().splitlines()[1:]
    sheet.write_text("\n".join([header, *[f"{r},x" for r in rows]]) + "\n")
    first, second = header.split(",")[1:] if column == "label" else (header.split(",")[0], "Path")
    with pytest.raises(UserError) as info:
        scan(sheet)
    assert f"'{first}' (column " in str(info.value) and f"'{second}' (column " in str(info.value)
    assert f"both mean '{column}'" in refusal(sheet, capsys=capsys)


# --------------------------------------------------------------------------- dialects

NEGATIF = ["Négatif"] * 3 + ["Positif"] * 3


def dialect_sheet(tmp_path: Path, separator: str, encoding: str, eol: str, first: str = "") -> Path:
    write_sheet(tmp_path, NEGATIF)
    rows = [f"images/img{i:02d}.png{separator}{label}" for i, label in enumerate(NEGATIF)]
    sheet = tmp_path / "export.csv"
    sheet.write_bytes((first + eol.join([f"Path{separator}Label", *rows]) + eol).encode(encoding))
    return sheet


@pytest.mark.parametrize(
    ("separator", "encoding", "eol", "first", "dialect"),
    [
        (";", "utf-8-sig", "\r\n", "", "';'-separated"),
        ("\t", "utf-8", "\n", "", "tab-separated"),
        (";", "cp1252", "\r\n", "", "';'-separated, cp1252 (not UTF-8)"),
        (",", "cp1252", "\r", "", "','-separated, cp1252 (not UTF-8)"),
        (";", "utf-8", "\r\n", "sep=;\r\n", "';'-separated, 'sep=' line"),
        ("\t", "utf-16", "\r\n", "", "tab-separated, UTF-16"),  # Excel's "Unicode Text"
        ("|", "utf-8-sig", "\n", "", "'|'-separated"),
    ],
    ids=["semicolon-bom-crlf", "tab", "cp1252", "cp1252-comma-cr", "sep-line", "utf16-tab", "pipe"],
)
def test_spreadsheet_dialects_are_read(tmp_path, separator, encoding, eol, first, dialect):
    index = scan(dialect_sheet(tmp_path, separator, encoding, eol, first))
    assert index.class_names == ["Négatif", "Positif"] and len(index.pool) == 6
    assert np.bincount(index.pool.labels).tolist() == [3, 3]
    assert f"({dialect}; splits: train)" in index.layout


def test_a_tsv_suffix_is_a_sheet(tmp_path):
    tsv = dialect_sheet(tmp_path, "\t", "utf-8", "\n").rename(tmp_path / "labels.tsv")
    assert scan(tsv).class_names == ["Négatif", "Positif"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path:label\nimages/img00.png:a\n", "its header is one column 'path:label': separate"),
        (b"file;class\nimages/img00.png;a\n", "missing path, label; found file, class (';'-sep"),
        (b"path,label\nimages/img00.png,\x81\n", "neither UTF-8 nor Windows-1252 text (byte 0x81"),
        (
            b"sep=;\npath,label\nimages/img00.png,a\n",
            "found path,label (';'-separated, as its 'sep=",
        ),
        (b"path,label\nimages/img00.png,Mass,Nodule\n", "row 2: 3 cells but the header has 2"),
    ],
    ids=["colon", "other-names", "encoding", "wrong-sep-line", "unquoted-comma"],
)
def test_unreadable_sheets_name_the_cause(tmp_path, capsys, content, message):
    write_sheet(tmp_path, ["a", "b"])
    sheet = tmp_path / "bad.csv"
    sheet.write_bytes(content)
    with pytest.raises(UserError) as info:
        scan(sheet)
    assert message in str(info.value) and str(sheet) in str(info.value)
    assert message in refusal(sheet, capsys=capsys)


def test_a_workbook_is_refused_by_name(tmp_path, capsys):
    book = tmp_path / "labels.xlsx"
    book.write_bytes(b"PK\x03\x04")
    assert "a spreadsheet workbook (.xlsx); save the sheet as 'CSV UTF-8'" in refusal(
        book, capsys=capsys
    )


def test_windows_backslash_paths_are_read_when_the_slash_form_exists(tmp_path):
    sheet = write_sheet(tmp_path, ["a", "b", "a", "b"])
    sheet.write_text(sheet.read_text().replace("images/", "images\\"))
    index = scan(sheet)
    assert index.pool.ids[0] == "images/img00.png" and index.pool.paths[0].is_file()
    sheet.write_text(sheet.read_text().replace("images\\img00", "C:\\Users\\me\\img00"))
    with pytest.raises(
        UserError, match=r"row 2: no such file C:\\Users\\me\\img00.png \(a Windows path"
    ):
        scan(sheet)


# --------------------------------------------------------------------------- impossible paths


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        (
            "images/img\x0000.png",
            r"row 3: the path 'images/img\\x0000.png' holds a control character",
        ),
        (
            "images/" + "x" * 300 + ".png",
            r"row 3: the path 'images/xxx+\.\.\.x+\.png' cannot name a file \(File name too long\)",
        ),
        (
            "a/" * 3000 + "b.png",
            r"row 3: the path 'a/a/a[a/]*\.\.\.[a/]*b\.png' cannot name a file",
        ),
        ("x" * 140_000, r"row 3: not readable as CSV \(field larger than field limit"),
    ],
    ids=["nul-byte", "long-name", "long-path", "over-csv-field-limit"],
)
def test_paths_that_cannot_exist_name_the_row(tmp_path, capsys, cell, message):
    sheet = write_sheet(tmp_path, ["a", "b", "a"])
    lines = sheet.read_text().splitlines()
    lines[2] = f"{cell},b"
    sheet.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message) as info:
        scan(sheet)
    assert len(str(info.value)) < 300
    assert len(refusal(sheet, capsys=capsys)) < 300


# --------------------------------------------------------------------------- npz class numbers


def write_npz(path: Path, train_labels: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", len(train_labels)), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(train_labels.dtype)
    arrays["train_labels"] = train_labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, -1, 1, -1, 0], r"train_labels -1 ×2 \(2 of 14 labels\); a negative label"),
        (
            [0, 1, np.nan, 1, 0, np.nan, np.nan],
            r"train_labels NaN ×3 \(3 of 15 labels\); NaN/inf marks",
        ),
        (
            [0, 1, 300, 1, 0],
            r"train_labels 300 ×1 \(1 of 13 labels\); label 2 has no image \(classes run "
            r"0\.\.K-1 without gaps\): renumber",
        ),
        ([0, 1, 1.5, 1, 0], r"train_labels 1\.5 ×1 \(1 of 13 labels\); a fractional label"),
    ],
    ids=["minus-one", "nan", "out-of-range", "fraction"],
)
def test_npz_labels_that_are_not_class_numbers(tmp_path, capsys, labels, message):
    array = np.array(
        labels, dtype=np.float64 if any(isinstance(v, float) for v in labels) else np.int64
    )
    path = write_npz(tmp_path / "bad.npz", array)
    with pytest.raises(UserError, match=message):
        scan(path)
    err = refusal(path, capsys=capsys)
    assert str(path) in err and len(err) < 300


@pytest.mark.parametrize("where", ["test-only", "val-only"])
def test_a_class_with_no_image_to_learn_from_stops(tmp_path, capsys, where):
    """A new user's .npz: class 2 only in the test split (no warning before) stops, naming it
    and its test images; a class only in val (part of the CV pool) is learnable."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 9)):
        k = 3 if split == where.split("-")[0] else 2
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % k).reshape(n, 1)
    path = tmp_path / "extra.npz"
    np.savez(path, **arrays)
    if where == "val-only":
        assert scan(path).class_names == ["0", "1", "2"]
        return
    with pytest.raises(
        UserError,
        match=r"class\(es\) '2' \(3 in test\) have no image in train "
        r"\+ val \(18 images\), so no model can learn them",
    ):
        scan(path)
    err = refusal(path, capsys=capsys)
    assert str(path) in err and len(err.splitlines()) == 1


def test_npz_labels_beyond_data_class_names(tmp_path):
    path = write_npz(tmp_path / "named.npz", np.array([0, 1, 2, 1, 0]))
    with pytest.raises(
        UserError, match=r"train_labels 2 ×1 .*data.class_names names 2 classes \(0-1\)"
    ):
        scan(path, class_names=["benign", "malignant"])
    assert scan(path, class_names=["a", "b", "c"]).class_names == ["a", "b", "c"]


def test_one_based_npz_labels(tmp_path):
    path = write_npz(tmp_path / "one.npz", np.array([1, 2, 1, 2]))
    path = tmp_path / "one.npz"
    arrays = dict(np.load(path))
    for split in ("val", "test"):
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"] + 1
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=r"no image is labelled 0: .*1-based labels\? subtract 1"):
        scan(path)


def test_whole_float_npz_labels_are_classes(tmp_path):
    index = scan(write_npz(tmp_path / "f.npz", np.array([0.0, 1.0, 1.0, 0.0])))
    assert index.class_names == ["0", "1"] and index.pool.labels.dtype == np.int64


def test_one_file_in_several_class_folders_is_called_a_label_set(tmp_path):
    root = write_image_folder(tmp_path / "d", {"Effusion": 3, "Mass": 3})
    config = DataConfig(root=str(root), cache_dir=str(tmp_path / "c"))
    (root / "Mass" / "copied.png").write_bytes((root / "Effusion" / "p00_img00.png").read_bytes())
    problem = duplicate_problem(inspect_index(scan_source(config), config))
    assert problem is not None and "label set (multi-label)" not in problem  # another name
    (root / "Effusion" / "copied.png").write_bytes((root / "Mass" / "copied.png").read_bytes())
    problem = duplicate_problem(inspect_index(scan_source(config), config))
    assert problem is not None and "one file copied into several class folders" in problem


def test_a_gap_in_npz_labels_is_named_with_the_fix(tmp_path, capsys):
    path = write_npz(tmp_path / "gap.npz", np.array([0, 2, 2, 0]))
    arrays = dict(np.load(path))
    for split in ("val", "test"):
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"] * 2  # {0, 2} everywhere
    np.savez(path, **arrays)
    err = refusal(path, capsys=capsys)
    assert "label 1 has no image (classes run 0..K-1 without gaps)" in err
    assert "renumber, or name all K classes in data.class_names" in err
    assert scan(path, class_names=["a", "empty", "c"]).class_names == ["a", "empty", "c"]


# --------------------------------------------------------------------------- control characters


@pytest.mark.parametrize(
    ("cell", "shown"),
    [("b\x00x", r"'b\x00x'"), ("b\x1b[31mred", r"'b\x1b[31mred'"), ('"b\nc"', r"'b\nc'")],
    ids=["nul", "ansi-escape", "quoted-newline"],
)
def test_control_characters_in_labels_are_refused_escaped(tmp_path, capsys, cell, shown):
    sheet = write_sheet(tmp_path, ["a", "b", "a", "b"])
    lines = sheet.read_text().splitlines()
    lines[2] = f"images/img01.png,{cell}"
    sheet.write_text("\n".join(lines) + "\n")
    err = refusal(sheet, capsys=capsys)
    assert f"row 3: label {shown} holds a control character (1 rows); fix the cell" in err
    assert "\x1b" not in err and "\x00" not in err


def test_control_characters_in_class_folders_are_refused_escaped(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", {"a": 2, "b\x1b[31mred": 2, "c\td": 2})
    err = refusal(root, capsys=capsys)
    assert ": folder 'b\\x1b[31mred' holds a control character (4 images; 1 more" in err
    assert "rename the folder" in err and "\x1b" not in err and "\t" not in err


# --------------------------------------------------------------------------- Unicode forms

NFC_NAME, NFD_NAME = "r\u00f6ntgen", "ro\u0308ntgen"


@pytest.mark.parametrize(("written", "on_disk"), [(NFD_NAME, NFC_NAME), (NFC_NAME, NFD_NAME)])
def test_a_path_in_another_unicode_form_is_found(tmp_path, written, on_disk):
    sheet = write_sheet(tmp_path, ["a", "b"])
    (tmp_path / "Bilder").mkdir()
    (tmp_path / "images" / "img00.png").rename(tmp_path / "Bilder" / f"{on_disk}_0.png")
    lines = sheet.read_text(encoding="utf-8").splitlines()
    lines[1] = f"Bilder/{written}_0.png,a"
    sheet.write_text("\n".join(lines) + "\n", encoding="utf-8")
    index = scan(sheet)
    assert index.pool.paths is not None
    assert index.pool.paths[0] == (tmp_path / "Bilder" / f"{on_disk}_0.png").resolve()


def test_a_group_csv_row_in_another_unicode_form_is_found(tmp_path):
    root = write_image_folder(tmp_path / "d", {"a": 1, "b": 1})
    (root / "a" / "p00_img00.png").rename(root / "a" / f"{NFC_NAME}.png")
    table = tmp_path / "groups.csv"
    table.write_text(f"path,group\na/{NFD_NAME}.png,P1\nb/p00_img00.png,P2\n", encoding="utf-8")
    index = scan_source(DataConfig(root=str(root), group_csv=str(table)))
    assert index.pool.groups is not None and index.pool.groups.tolist() == ["P1", "P2"]


def test_a_name_in_mixed_unicode_forms_is_named(tmp_path, capsys):
    on_disk = "ro\u0308ntgen_\u00e9.png"  # o + combining diaeresis, precomposed é: mixed
    sheet = write_sheet(tmp_path, ["a", "b"])
    (tmp_path / "images" / "img00.png").rename(tmp_path / "images" / on_disk)
    lines = sheet.read_text(encoding="utf-8").splitlines()
    lines[1] = "images/r\u00f6ntgen_e\u0301.png,a"  # precomposed ö, e + combining acute
    sheet.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = refusal(sheet, capsys=capsys)
    assert "row 2: no such file" in err and "differs from" in err
    assert "only in Unicode form (NFC/NFD, mixed)" in err and repr(on_disk) in err


def test_labels_that_differ_only_in_unicode_form_are_spellings(tmp_path, capsys):
    sheet = write_sheet(tmp_path, [NFC_NAME, NFD_NAME, NFC_NAME, "normal"])
    err = refusal(sheet, capsys=capsys)
    assert "differ only in Unicode form (NFC/NFD" in err
    index = scan(sheet, normalize_labels=True)
    assert index.class_names == ["normal", NFC_NAME]
    assert np.bincount(index.pool.labels).tolist() == [1, 3]


# --------------------------------------------------------------------------- missing columns


def test_a_clinical_sheet_without_a_label_column_names_both_forms(tmp_path, capsys):
    sheet = tmp_path / "clinical.csv"
    sheet.write_text("Patient ID,Diagnosis\nP1,pneumonia\nP2,normal\n", encoding="utf-8")
    err = refusal(sheet, capsys=capsys)
    assert "needs columns 'path' and 'label'" in err and "found Patient ID, Diagnosis" in err
    assert "'PatientID,label'" in err and "name the label column 'label'" in err
