"""distmed.data.keyed: a sheet keyed by PatientID, StudyInstanceUID or `data.label_key` labels
every DICOM image below its folder from the headers, and the folds group by patient."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from test_data_not_classes import write_dicom, write_export

from distmed.config import ExperimentConfig
from distmed.data import scan_source
from distmed.data.__main__ import main as inspect_main
from distmed.errors import UserError


def data_cfg(**fields):
    return ExperimentConfig.model_validate({"data": fields}).data


def counts(index) -> Counter:
    return Counter(index.class_names[label] for label in index.pool.labels)


def write_sheet(path: Path, header: str, rows: list[tuple[str, ...]], sep: str = ",") -> Path:
    lines = [header.replace(",", sep)] + [sep.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def patients_sheet(case: Path, sep: str = ",") -> Path:
    """4 patients of 3 images each (export written as case 26): PAT001-2 normal, 3-4 pneumonia."""
    write_export(case / "export", patients=4, images=3)
    rows = [(f"PAT{p:03d}", "normal" if p <= 2 else "pneumonia") for p in range(1, 5)]
    return write_sheet(case / "labels.csv", "PatientID,label", rows, sep)


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_patient_sheet_labels_every_image_of_the_patient(tmp_path, sep):
    sheet = patients_sheet(tmp_path / "case", sep)
    index = scan_source(data_cfg(root=str(sheet)))
    assert index.class_names == ["normal", "pneumonia"]
    assert counts(index) == {"normal": 6, "pneumonia": 6}
    by_image = dict(zip(index.pool.ids, index.pool.groups, strict=True))
    assert by_image["export/PT000002/ST000000/SE000000/IM000001"] == "PAT003"
    assert Counter(index.pool.groups) == {f"PAT{p:03d}": 3 for p in range(1, 5)}
    labels = {
        g: index.class_names[y] for g, y in zip(index.pool.groups, index.pool.labels, strict=True)
    }
    assert labels == {
        "PAT001": "normal",
        "PAT002": "normal",
        "PAT003": "pneumonia",
        "PAT004": "pneumonia",
    }
    assert "keyed by PatientID" in index.layout
    assert index.ignored["export/DICOMDIR"] == "DICOMDIR (a DICOM export's index)"


def test_study_sheet_labels_studies_and_groups_by_patient(tmp_path):
    """One patient with a normal and an abnormal study: labels per study, one group."""
    case = tmp_path / "case"
    for study, n in (("1.2.9.1", 2), ("1.2.9.2", 3), ("1.2.9.3", 1)):
        patient = "P1" if study != "1.2.9.3" else "P2"
        for k in range(n):
            write_dicom(case / "dicom" / study / f"{k}.dcm", patient, study, seed=k)
    rows = [("1.2.9.1", "P1", "normal"), ("1.2.9.2", "P1", "effusion"), ("1.2.9.3", "P2", "normal")]
    sheet = write_sheet(case / "studies.csv", "Study Instance UID,PatientID,Label", rows)
    index = scan_source(data_cfg(manifest=str(sheet)))
    assert counts(index) == {"normal": 3, "effusion": 3}
    assert Counter(index.pool.groups) == {"P1": 5, "P2": 1}
    assert "keyed by StudyInstanceUID" in index.layout


def test_label_key_names_any_dicom_attribute(tmp_path):
    case = tmp_path / "case"
    for n, accession in enumerate(("A100", "A101", "A102", "A103")):
        write_dicom(case / f"{n}.dcm", f"P{n // 2}", seed=n, AccessionNumber=accession)
    rows = [("A100", "0"), ("A101", "1"), ("A102", "0"), ("A103", "1")]
    sheet = write_sheet(case / "acc.csv", "accession,label", rows)
    with pytest.raises(UserError, match="no column AccessionNumber .*change data.label_key"):
        scan_source(data_cfg(root=str(sheet), label_key="AccessionNumber"))
    sheet = write_sheet(case / "acc.csv", "AccessionNumber,label", rows)
    index = scan_source(data_cfg(root=str(sheet), label_key="accession_number"))
    assert counts(index) == {"0": 2, "1": 2}
    with pytest.raises(UserError, match="data.label_key Accession: not a DICOM attribute"):
        scan_source(data_cfg(root=str(sheet), label_key="Accession"))


def test_images_missing_from_the_sheet_stop_or_are_skipped(tmp_path, capsys):
    sheet = patients_sheet(tmp_path / "case")
    write_sheet(sheet, "PatientID,label", [("PAT001", "normal"), ("PAT003", "pneumonia")])
    capsys.readouterr()
    assert inspect_main([str(sheet)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"data.manifest {sheet}: 6 of 12 DICOM images have a PatientID not in the sheet" in err
    assert "export/PT000001/ST000000/SE000000/IM000000 (PatientID PAT002)" in err
    assert "data.skip_invalid=true" in err
    index = scan_source(data_cfg(root=str(sheet), skip_invalid=True))
    assert counts(index) == {"normal": 3, "pneumonia": 3}
    left_out = {k: v for k, v in index.ignored.items() if "not in labels.csv" in v}
    assert len(left_out) == 6
    assert (
        left_out["export/PT000003/ST000000/SE000000/IM000002"]
        == "PatientID PAT004 not in labels.csv"
    )


def test_sheet_rows_matching_no_image_are_warned(tmp_path, caplog):
    sheet = patients_sheet(tmp_path / "case")
    with sheet.open("a") as handle:
        handle.write("PAT777,normal\nPAT778,pneumonia\n")
    with caplog.at_level(logging.WARNING):
        index = scan_source(data_cfg(root=str(sheet)))
    assert len(index.pool) == 12
    assert (
        "2 of 6 PatientID values match no DICOM image below its folder, e.g. PAT777, PAT778"
        in caplog.text
    )


def test_a_key_given_two_labels_is_one_line_naming_the_rows(tmp_path):
    sheet = patients_sheet(tmp_path / "case")
    with sheet.open("a") as handle:
        handle.write("PAT001,pneumonia\n")
    with pytest.raises(
        UserError,
        match=r"row 6: PatientID PAT001 is labelled 'pneumonia' here and 'normal' in row 2",
    ):
        scan_source(data_cfg(root=str(sheet)))


def test_inspector_prints_the_counts_a_person_would_write_down(tmp_path, capsys):
    sheet = patients_sheet(tmp_path / "case")
    assert inspect_main([str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "sheet labels.csv keyed by PatientID" in out
    assert "12 images (normal 6, pneumonia 6), 4 patients" in out


def test_path_label_sheet_is_still_a_manifest(tmp_path):
    """A sheet with a path column stays a path manifest even when it has a PatientID column;
    that column, unused, would let a patient's images straddle folds: one line says so, and
    renamed to `group` it groups the images."""
    case = tmp_path / "case"
    for n in range(4):
        write_dicom(case / f"{n}.dcm", f"P{n}", seed=n)
    rows = [(f"{n}.dcm", f"P{n}", "ab"[n % 2]) for n in range(4)]
    (case / "m.csv").write_text(
        "path,PatientID,label\n" + "".join(",".join(r) + "\n" for r in rows)
    )
    with pytest.raises(UserError, match=r"manifest .*m.csv: column 'PatientID' looks like the"):
        scan_source(data_cfg(root=str(case / "m.csv")))
    (case / "m.csv").write_text("path,group,label\n" + "".join(",".join(r) + "\n" for r in rows))
    index = scan_source(data_cfg(root=str(case / "m.csv")))
    assert index.layout.startswith("manifest m.csv") and counts(index) == {"a": 2, "b": 2}
    assert index.pool.groups is not None and len(set(index.pool.groups)) == 4


# --------------------------------------------------------------------------- one sheet reader


def keyed_case(case: Path, labels: list[str], images: int = 3) -> Path:
    """An export of len(labels) patients (PAT001, ...), `images` each; returns the case root."""
    write_export(case / "export", patients=len(labels), images=images)
    return case


def sheet_bytes(header: str, rows: list[tuple[str, str]], sep: str, encoding: str) -> bytes:
    lines = [header.replace(",", sep)] + [sep.join(row) for row in rows]
    return "\r\n".join(lines).encode(encoding) + b"\r\n"


def inspected(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = inspect_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def stop_line(sheet: Path, capsys, *overrides: str) -> str:
    """The one line the scan stops with, checked to be what the inspector prints (exit 2)."""
    cfg = data_cfg(root=str(sheet), **dict(o.split("=", 1) for o in overrides))
    with pytest.raises(UserError) as info:
        scan_source(cfg)
    message = str(info.value)
    assert "\n" not in message
    code, _, err = inspected([str(sheet), *(f"--set=data.{o}" for o in overrides)], capsys)
    assert (code, err) == (2, f"error: {message}")
    return message


@pytest.mark.parametrize(
    ("first_line", "encoding", "dialect"),
    [
        ("", "cp1252", "';'-separated, cp1252 (not UTF-8)"),
        ("sep=;\r\n", "utf-8", "';'-separated, 'sep=' line"),
    ],
)
def test_keyed_sheet_in_excel_dialects(tmp_path, capsys, first_line, encoding, dialect):
    """European Excel: `;`, CRLF, Windows-1252 without a BOM, or its `sep=;` first line."""
    case = keyed_case(tmp_path / "case", ["normal"] * 2 + ["Lungenentzündung"] * 2)
    rows = [(f"PAT{p:03d}", "normal" if p <= 2 else "Lungenentzündung") for p in range(1, 5)]
    sheet = case / "befunde.csv"
    sheet.write_bytes(first_line.encode() + sheet_bytes("Patient ID,Label", rows, ";", encoding))
    index = scan_source(data_cfg(root=str(sheet)))
    assert index.class_names == ["Lungenentzündung", "normal"]
    assert counts(index) == {"normal": 6, "Lungenentzündung": 6}
    assert Counter(index.pool.groups) == {f"PAT{p:03d}": 3 for p in range(1, 5)}
    assert index.layout.startswith(f"sheet befunde.csv keyed by PatientID ({dialect};")
    code, out, _ = inspected([str(sheet)], capsys)
    assert code == 0
    assert f"keyed by PatientID ({dialect};" in out
    assert "12 images (Lungenentzündung 6, normal 6), 4 patients" in out
    assert "befunde.csv" not in out.split("skipped")[-1]  # the source is not a skipped file


def test_keyed_label_spellings_stop_or_merge(tmp_path, capsys):
    case = keyed_case(tmp_path / "case", ["Normal", "normal ", "pneumonia", "pneumonia"])
    rows = [("PAT001", "Normal"), ("PAT002", "normal "), ("PAT003", "pneumonia")]
    sheet = write_sheet(case / "labels.csv", "PatientID,label", [*rows, ("PAT004", "pneumonia")])
    message = stop_line(sheet, capsys)
    assert message == (
        f"data.manifest {sheet}: labels `Normal` ×3, `normal ` ×3 differ only in case/spaces: "
        "fix the sheet or set data.normalize_labels: true"
    )
    index = scan_source(data_cfg(root=str(sheet), normalize_labels=True))
    assert index.class_names == ["Normal", "pneumonia"]
    assert counts(index) == {"Normal": 6, "pneumonia": 6}
    assert index.merged_labels == {"Normal": {"Normal": 3, "normal ": 3}}
    code, out, _ = inspected([str(sheet), "--set", "data.normalize_labels=true"], capsys)
    assert code == 0
    assert "labels merged (data.normalize_labels): Normal <- `Normal` 3, `normal ` 3" in out
    assert "12 images (Normal 6, pneumonia 6), 4 patients" in out


def test_keyed_one_key_in_two_spellings_stops_unless_normalized(tmp_path, capsys):
    case = keyed_case(tmp_path / "case", ["normal", "normal", "pneumonia", "pneumonia"])
    rows = [(f"PAT{p:03d}", "normal" if p <= 2 else "pneumonia") for p in range(1, 5)]
    sheet = write_sheet(case / "labels.csv", "PatientID,label", [*rows, ("PAT001", "NORMAL")])
    message = stop_line(sheet, capsys)
    assert message == (
        f"data.manifest {sheet} row 6: PatientID PAT001 is labelled 'NORMAL' here and 'normal' "
        "in row 2; give it one label (or set data.normalize_labels: true: the two differ only "
        "in spelling)"
    )
    index = scan_source(data_cfg(root=str(sheet), normalize_labels=True))
    assert counts(index) == {"normal": 6, "pneumonia": 6}


def test_keyed_label_sets_stop_with_the_multilabel_pointer(tmp_path, capsys):
    case = keyed_case(tmp_path / "case", ["A", "B", "A|B", "A"])
    rows = [("PAT001", "A"), ("PAT002", "B"), ("PAT003", "A|B"), ("PAT004", "A")]
    sheet = write_sheet(case / "findings.csv", "PatientID,label", rows)
    message = stop_line(sheet, capsys)
    assert message.startswith(
        f"data.manifest {sheet}: labels such as `A|B` (row 4) join labels seen alone with '|' "
        "(1 such values, 3 of 12 images): distmed trains one label per image"
    )
    assert "multi-label" in message
    assert "multi-label" in stop_line(sheet, capsys, "normalize_labels=true")


@pytest.mark.parametrize(
    ("header", "doubled"),
    [
        ("PatientID,Label,label", "columns 'Label' (column B) and 'label' (column C) both mean"),
        ("PatientID,Patient ID,label", "columns 'PatientID' and 'Patient ID' both mean PatientID"),
    ],
)
def test_keyed_doubled_columns_stop(tmp_path, capsys, header, doubled):
    case = keyed_case(tmp_path / "case", ["a", "b"])
    sheet = write_sheet(case / "l.csv", header, [("PAT001", "a", "a"), ("PAT002", "b", "b")])
    message = stop_line(sheet, capsys)
    assert message.startswith(f"data.manifest {sheet}: {doubled}")
    assert "keep one" in message


def test_export_advice_works_in_the_inspector(tmp_path, capsys):
    """Case 26 as a user meets it: the export stops advising `--data SHEET`; the inspector
    takes that option and prints what the sheet says: classes, images and patients per class."""
    case = keyed_case(tmp_path / "case", ["normal", "pneumonia"] * 3)
    rows = [(f"PAT{p:03d}", "pneumonia" if p % 2 == 0 else "normal") for p in range(1, 7)]
    sheet = write_sheet(case / "labels_by_patient.csv", "PatientID,label", rows)
    code, _, err = inspected([str(case / "export")], capsys)
    assert code == 2 and f"give it with `--data {sheet}`" in err
    code, out, _ = inspected(["--data", str(sheet)], capsys)
    assert code == 0
    assert "train: 18 images (normal 9, pneumonia 9), 6 patients (normal 3, pneumonia 3)" in out
    assert "labels_by_patient.csv" not in out.split("skipped")[-1]
    code, _, err = inspected([str(sheet), "--data", str(case)], capsys)
    assert code == 2 and err == f"error: two data sources, {sheet} and --data {case}; give one"
    assert inspected([], capsys)[0] == 2


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["0", "1", "-1"], "labels `-1` ×3 are not class numbers (first in row 4; 3 of 9 images)"),
        (["a", "b", "nan"], "row 4: label `nan` marks a missing value (pandas writes NaN so; 3 "),
    ],
)
def test_keyed_unknown_labels_stop_counted_in_images(tmp_path, capsys, labels, expected):
    """CheXpert's -1 (uncertain) and pandas' NaN: not classes, counted in images a row labels."""
    case = keyed_case(tmp_path / "case", labels)
    rows = [(f"PAT{p:03d}", label) for p, label in enumerate(labels, start=1)]
    sheet = write_sheet(case / "labels.csv", "PatientID,label", rows)
    assert expected in stop_line(sheet, capsys)


def test_keyed_rows_without_key_or_label(tmp_path, capsys):
    """A row with only a note is passed over; a key without label (or the reverse) stops."""
    case = keyed_case(tmp_path / "case", ["a", "b"])
    header = "PatientID,label,note"
    rows = [("PAT001", "a", ""), ("", "", "reviewed by JS"), ("PAT002", "b", "")]
    sheet = write_sheet(case / "l.csv", header, rows)
    assert counts(scan_source(data_cfg(root=str(sheet)))) == {"a": 3, "b": 3}
    write_sheet(sheet, header, [*rows, ("PAT003", " ", "")])
    assert stop_line(sheet, capsys) == (
        f"data.manifest {sheet} row 5: empty label; fill it in or drop the row"
    )
    write_sheet(sheet, header, [*rows, ("", "b", "")])
    assert stop_line(sheet, capsys) == (
        f"data.manifest {sheet} row 5: empty PatientID; fill it in or drop the row"
    )


def test_a_control_character_in_a_keyed_label_is_refused_escaped(tmp_path, capsys):
    sheet = patients_sheet(tmp_path / "case")
    sheet.write_text(sheet.read_text().replace("PAT004,pneumonia", "PAT004,pneu\x1b[31mmonia"))
    assert inspect_main([str(sheet)]) == 2
    err = capsys.readouterr().err.strip()
    assert "row 5: label 'pneu\\x1b[31mmonia' holds a control character (3 images)" in err
    assert "\x1b" not in err and "\n" not in err
