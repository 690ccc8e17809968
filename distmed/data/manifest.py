"""Labels sheets -> a `DataIndex`: `path,label[,group,split]`, or `path` and the finding
columns (several findings per image, coded by `findings`); paths relative to the sheet, local
files or objects in a bucket (`s3://`, `gs://` URIs; the sheet itself may be one); patients
from a group column, CheXpert's `patientNNNNN` folders or `groups`. Sheets keyed by a DICOM
attribute (`PatientID,label`) go to `keyed`. Every problem is one line naming the sheet's row.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path, PurePath, PurePosixPath

import numpy as np

from distmed.config import DataConfig
from distmed.data.findings import (
    column_codes,
    finding_columns,
    set_codes,
    several_findings_hint,
)
from distmed.data.groups import group_lookup
from distmed.data.index import DataIndex, Split, files_fingerprint
from distmed.data.keyed import keyed_column, scan_keyed_sheet
from distmed.data.labels import classes_of
from distmed.data.layout import split_of
from distmed.data.objects import is_uri
from distmed.data.sheets import (
    WINDOWS_DRIVE,
    SheetPath,
    cell_text,
    file_of_cell,
    read_sheet,
)
from distmed.errors import UserError, shorten
from distmed.uris import check_no_credentials, shown

MANIFEST_COLUMNS = ("path", "label", "group", "split")
CHEXPERT_PATIENT = re.compile(r"^patient\d+$")  # CheXpert's patient folders: patient00001
# A clinical sheet (`Patient ID,Diagnosis`) is the other form a labels sheet takes.
KEYED_HINT = (
    "or, for DICOM images, 'PatientID,label' (a sheet keyed by a header attribute) labels "
    "them without paths; name the label column 'label'; several findings per image (a "
    "column each, or NIH's 'Finding Labels'): data.label_columns, data.label_delimiter"
)


def scan_manifest(csv_path: SheetPath, cfg: DataConfig) -> DataIndex:
    """Index a labels CSV: columns `path,label` and optional `group`, `split`; or, for
    several findings per image, `path` and the finding columns (`findings.finding_columns`).

    Paths are relative to the CSV's folder (absolute ones are kept; `\\` read as `/`); a
    path that starts with that folder's own name (CheXpert's `CheXpert-v1.0-small/train/...`
    in `CheXpert-v1.0-small/train.csv`) is also looked up from the folder above. A path may
    be an object's URI (`s3://bucket/key`, `gs://...`): the splits then hold `uris` and
    `versions` (`remote.object_versions`), ids as written; a sheet names local files or
    objects, not both. A sheet in a bucket (`csv_path` its URI) is read through pyarrow, and
    its relative paths name objects under its own prefix.
    `split` takes train/val/test and the folder names `layout` knows (valid, holdout, ...);
    rows of train and val form the CV pool, test is held back. Classes are the sorted labels,
    checked by `labels.classes_of`; findings are coded by `findings`. The sheet's dialect is
    `sheets.read_sheet`'s.

    Raises:
        UserError: no such file, an unreadable sheet, missing or doubled columns, a missing,
            ambiguous or impossible file path, an unknown split, a duplicate path, an empty
            label, label sets or spellings, a label column with one value, or a finding
            cell other than 1/0/-1/blank; one line naming the CSV and the row (as a
            spreadsheet numbers it: the header is row 1); also a missing object, a sheet
            mixing files and objects, and, for objects, what needs local DICOM files
            (data.label_key, data.group_from).
    """
    what = f"data.manifest {shown(csv_path) if isinstance(csv_path, str) else csv_path}"
    if isinstance(csv_path, str):
        _refuse_dicom_keys(cfg, what)
    elif key := keyed_column(csv_path, cfg):  # PatientID,label: labels from DICOM headers
        if cfg.multilabel_requested:
            raise UserError(
                f"{what}: a sheet keyed by {key.keyword} gives one label per image; for "
                "several findings per image give a path column and one column per finding"
            )
        return scan_keyed_sheet(csv_path, key, cfg)
    findings = finding_columns(csv_path, cfg, what) if cfg.multilabel_requested else None
    label_keys = tuple(findings.keys) if findings is not None else ("label",)
    try:
        sheet = read_sheet(
            csv_path,
            what,
            ("path", *label_keys),
            MANIFEST_COLUMNS[2:],
            hint=KEYED_HINT if findings is None else "",
        )
    except UserError as exc:  # a CheXpert-style sheet without data.task: say that setting
        if findings is None and (hint := several_findings_hint(csv_path, what)):
            raise UserError(hint) from exc
        raise
    has_group = "group" in sheet.columns
    if has_group and (cfg.group_csv or cfg.group_regex or cfg.group_from):
        raise UserError(
            f"{what}: has a group column and data.group_* is set too; keep one source of "
            "patient ids"
        )
    base = _sheet_folder(csv_path)
    entries = _manifest_entries(sheet.rows, base, what, has_group, findings is None)
    entries, versions = _object_versions(entries, base, what, cfg)
    if findings is None:
        class_names, labels, merged = _manifest_classes(entries, what, cfg)
    else:
        rows = sheet.rows
        if findings.delimiter is None:
            class_names, labels = findings.names, column_codes(rows, findings, what)
        else:
            class_names, labels = set_codes(rows, findings, cfg.no_finding, what)
        merged = {}
    group_of = group_lookup(cfg, _pure_path(base))
    patients_note = ""
    if group_of is None and not has_group and (in_paths := _patients_in_paths(entries)):
        group_of = lambda sample_id, _path: in_paths[sample_id]  # noqa: E731
        patients_note = "; patients from the paths' patientNNNNN folders"
    if group_of is None and not has_group:
        _refuse_unused_patient_column(sheet.header, what)
    pool = _manifest_split_of(entries, labels, ("train", "val"), group_of, versions)
    test_entries = [e for e in entries if e[5] == "test"]
    test = (
        _manifest_split_of(entries, labels, ("test",), group_of, versions) if test_entries else None
    )
    if len(pool) == 0:
        raise UserError(
            f"{what}: every row is in the test split; mark the rows to cross-validate as "
            "train (or val)"
        )
    splits = sorted({e[5] for e in entries})
    kind = "" if findings is None else f"{len(class_names)} findings per image; "
    name = PurePosixPath(csv_path) if isinstance(csv_path, str) else csv_path
    return DataIndex(
        name=name.stem,
        class_names=class_names,
        pool=pool,
        test=test,
        fingerprint=files_fingerprint(pool, test),
        layout=f"manifest {name.name} ({sheet.dialect}; {kind}splits: {', '.join(splits)}"
        f"{patients_note})",
        merged_labels=merged,
        multilabel=findings is not None,
    )


def _refuse_dicom_keys(cfg: DataConfig, what: str) -> None:
    """Objects in a bucket, named by a sheet: these keys need DICOM files on this machine."""
    if cfg.label_key or cfg.group_from:
        key = "data.label_key" if cfg.label_key else "data.group_from"
        raise UserError(
            f"{what}: {key} reads DICOM headers on this machine, and this sheet names objects "
            "in a bucket; give the sheet path and label columns (patients: a group column or "
            "data.group_regex), or keep the sheet and the images on local disk"
        )


def _sheet_folder(csv_path: SheetPath) -> Path | str:
    """What the sheet's relative paths are relative to: its folder, or its prefix's URI."""
    if isinstance(csv_path, str):
        return csv_path.rsplit("/", 1)[0] if csv_path.count("/") > 2 else csv_path
    return csv_path.resolve().parent


def _pure_path(file: Path | str) -> PurePath:
    """A file, or an object as `PurePosixPath("bucket/key")` (group lookups read its name)."""
    from distmed.data.remote import object_path

    return file if isinstance(file, Path) else PurePosixPath(object_path(file))


# (row number, path as written = sample id, file or the object's canonical URI, label as
# written, group, split)
_Entry = tuple[int, str, Path | str, str, str | None, str]


def _manifest_entries(
    rows: list[tuple[int, dict[str, str]]],
    base: Path | str,
    what: str,
    has_group: bool,
    labelled: bool,
) -> list[_Entry]:
    """Each row's file (or object), split and group, checked; `labelled`: a `label` cell is
    required. `base`: the sheet's folder, or its prefix's URI for a sheet in a bucket."""
    entries: list[_Entry] = []
    seen: dict[Path | str, int] = {}
    for number, row in rows:
        where = f"{what} row {number}"
        text = row["path"].strip()
        label = row.get("label", "")  # as written: spellings that differ in spaces are checked
        if not text:
            raise UserError(f"{where}: empty path; every row names an image file")
        if labelled and not label.strip():
            raise UserError(
                f"{where}: {cell_text(text)} has an empty label; fill it in or drop the row"
            )
        path, text = _locate(base, text, where)
        if path in seen:
            raise UserError(
                f"{where}: {cell_text(text)} is listed again (first in row {seen[path]}); "
                "list each file once"
            )
        seen[path] = number
        split = _manifest_split(row.get("split"), where)
        group = row.get("group", "").strip() if has_group else None
        if has_group and not group:
            raise UserError(
                f"{where}: {cell_text(text)} has an empty group; every row needs its patient"
            )
        entries.append((number, text, path, label, group, split))
    return entries


def _locate(base: Path | str, text: str, where: str) -> tuple[Path | str, str]:
    """The file a path cell names (`_manifest_file`), or the canonical URI of the object it
    names (`remote.canonical_uri`: a URI, or for a sheet in a bucket a path relative to its
    prefix); objects are looked up later, all at once (`_object_versions`)."""
    from distmed.data.remote import canonical_uri

    if isinstance(base, Path) and not is_uri(text):
        return _manifest_file(base, text, where)
    if any(ord(c) < 32 for c in text):
        raise UserError(
            f"{where}: the path {shorten(text)} holds a control character (a NUL byte?); "
            "fix the cell"
        )
    if is_uri(text) or isinstance(base, Path):
        check_no_credentials(text, where)
        return canonical_uri(text), text
    key = text.replace("\\", "/")
    if key.startswith("/") or WINDOWS_DRIVE.match(text):
        raise UserError(
            f"{where}: {cell_text(text)} is a local path, and a sheet in a bucket names objects; "
            f"give a path relative to the sheet's prefix {shown(base)}/ or an object's URI"
        )
    bucket, _, prefix = base.split("://", 1)[1].partition("/")
    inner = posixpath.normpath(posixpath.join(prefix, key))
    if inner == ".." or inner.startswith("../"):
        raise UserError(f"{where}: {cell_text(text)} leads out of the bucket; fix the path")
    return canonical_uri(f"{base.split('://', 1)[0]}://{bucket}/{inner}"), text


def _object_versions(
    entries: list[_Entry], base: Path | str, what: str, cfg: DataConfig
) -> tuple[list[_Entry], dict[str, str] | None]:
    """The entries, and each named object's version (`remote.object_versions`, looked up in
    bulk); None for a sheet of local files. A sheet in a bucket's path that starts with its
    folder's name is looked up from the folder above too, as `_manifest_file` does locally
    (CheXpert): an entry found only there names that object.

    Raises:
        UserError: a sheet naming files and objects (naming the rows of each); data.group_from
            with objects; a missing object, naming its row and URI; an object under the
            prefix and another above it for one path (ambiguous).
    """
    objects = [e for e in entries if isinstance(e[2], str)]
    if not objects:
        return entries, None
    if files := [e for e in entries if isinstance(e[2], Path)]:
        raise UserError(
            f"{what}: {_row_numbers(files)} name local files and {_row_numbers(objects)} "
            "objects in a bucket; a sheet names one or the other: upload the files and give "
            "their URIs, or copy the objects to this machine"
        )
    _refuse_dicom_keys(cfg, what)
    from distmed.data.remote import object_versions

    above = {str(e[2]): a for e in objects if (a := _object_above(base, e[1])) is not None}
    versions = object_versions([str(e[2]) for e in objects] + list(above.values()))
    found: list[_Entry] = []
    for entry in objects:
        number, text, uri = entry[0], entry[1], str(entry[2])
        other = above.get(uri)
        if other is not None and other in versions:
            if uri in versions:
                raise UserError(
                    f"{what} row {number}: {cell_text(text)} names {shown(uri)} and "
                    f"{shown(other)}; ambiguous: move or rename one of them"
                )
            entry = (number, text, other, *entry[3:])
        elif uri not in versions:
            relative = (
                ""
                if is_uri(text)
                else f" (paths are relative to the sheet's prefix {shown(str(base))}/)"
            )
            also = f" nor {shown(other)}" if other is not None else ""
            raise UserError(
                f"{what} row {number}: no such object {shown(uri)}{also}{relative}; fix the "
                "path or upload the object"
            )
        found.append(entry)
    return found, versions


def _object_above(base: Path | str, text: str) -> str | None:
    """For a sheet in a bucket, the URI a relative path names from the prefix above the
    sheet's when it starts with the sheet's folder name (CheXpert's `CheXpert-v1.0-small/
    train/...` in `CheXpert-v1.0-small/train.csv`); else None."""
    from distmed.data.remote import canonical_uri

    if not isinstance(base, str) or is_uri(text) or base.count("/") < 3:
        return None
    parent, folder = base.rsplit("/", 1)
    parts = text.replace("\\", "/").split("/")
    if len(parts) < 2 or parts[0] != folder:
        return None
    return canonical_uri(f"{parent}/{'/'.join(parts)}")


def _row_numbers(entries: list[_Entry]) -> str:
    """`row 4` or `rows 2, 3, 5, ...` (the first five of them)."""
    numbers = [str(e[0]) for e in entries]
    shown_numbers = ", ".join(numbers[:5]) + (
        f", ... ({len(numbers)} rows)" if len(numbers) > 5 else ""
    )
    return f"row {numbers[0]}" if len(numbers) == 1 else f"rows {shown_numbers}"


def _patients_in_paths(entries: list[_Entry]) -> dict[str, str] | None:
    """Sample id -> patient when every path names its patient in one `patientNNNNN` folder,
    as CheXpert's do (`train/patient00001/study1/view1_frontal.jpg`; torchxrayvision reads
    its patient ids so too); else None."""
    found: dict[str, str] = {}
    for entry in entries:
        parts = [part for part in PurePosixPath(entry[1].replace("\\", "/")).parts[:-1]
                 if CHEXPERT_PATIENT.match(part)]  # fmt: skip
        if len(parts) != 1:
            return None
        found[entry[1]] = parts[0]
    return found


def _manifest_file(base: Path, text: str, where: str) -> tuple[Path, str]:
    """`sheets.file_of_cell` from the sheet's folder, and, for a path that starts with that
    folder's name, from the folder above: CheXpert's `Path` column is relative to the folder
    that holds the data set's folder, while its CSV sits inside it.

    Raises:
        UserError: no such file from either folder (naming both), or a file from each (the
            path is ambiguous).
    """
    parts = Path(text.replace("\\", "/")).parts
    above = base.parent if len(parts) > 1 and parts[0] == base.name else None
    if above is None:
        return file_of_cell(base, text, where)
    try:
        found = file_of_cell(base, text, where)
    except UserError as not_here:
        try:
            return file_of_cell(above, text, where)
        except UserError:
            if "no such file" not in str(not_here):
                raise not_here from None  # a control character or an impossible name
            raise UserError(
                f"{where}: no such file {cell_text(text)} in {base} nor in {above} (the "
                "folder above, where a path starting with the data set's folder name is "
                "usually relative to); fix the path"
            ) from None
    if (above / text).is_file() and (above / text).resolve() != found[0]:
        raise UserError(
            f"{where}: {cell_text(text)} names a file in {base} and another in {above}; "
            "ambiguous: move or rename one of them"
        )
    return found


def _manifest_classes(
    entries: list[_Entry], what: str, cfg: DataConfig
) -> tuple[list[str], np.ndarray, dict[str, dict[str, int]]]:
    """Class names, each entry's class number (N,) and the merged spellings; `what` names
    the sheet (`data.manifest PATH`)."""
    classes = classes_of(
        [e[3] for e in entries],
        [f"row {e[0]}" for e in entries],
        what,
        cfg.normalize_labels,
        fix="fix the sheet",
    )
    if len(classes.names) < 2:
        raise UserError(
            f"{what}: column 'label' has one value "
            f"({shorten(classes.names[0])}) in all {len(entries)} rows; a classifier needs at "
            "least two classes"
        )
    labels = np.array([classes.number_of[e[3]] for e in entries], dtype=np.int64)
    return classes.names, labels, classes.merged


# Headers that name the patient in exports people bring (NIH's 'Patient ID', DICOM's
# 'PatientID'); compared without case, spaces or underscores.
_PATIENT_HEADERS = frozenset({"patientid", "patient", "subjectid", "subject"})


def _refuse_unused_patient_column(columns: Sequence[str], what: str) -> None:
    """A sheet without patient groups whose header names the patient: its images would be
    split image by image, a patient's images on both sides of a fold (leakage). Stop."""
    for column in columns:
        if column.lower().replace(" ", "").replace("_", "") in _PATIENT_HEADERS:
            raise UserError(
                f"{what}: column {column!r} looks like the patient id but is not used, so a "
                "patient's images could land on both sides of a fold; rename it to group "
                "(or set data.group_csv / data.group_regex)"
            )


def _manifest_split(value: str | None, where: str) -> str:
    """`train`/`val`/`test` (or a known alias); no split column: train (the CV pool)."""
    if value is None:
        return "train"
    split = split_of(value.strip())
    if split is None:
        raise UserError(
            f"{where}: split {value.strip()!r} is not train, val or test (or valid, "
            "validation, holdout, ...); fix the value"
        )
    return split


def _manifest_split_of(
    entries: list[_Entry],
    labels: np.ndarray,
    splits: tuple[str, ...],
    group_of: Callable[[str, PurePath], str] | None,
    versions: dict[str, str] | None = None,
) -> Split:
    """The entries of `splits`, in sheet order; `labels` holds every entry's label;
    `versions`: the objects' (`_object_versions`), None for local files."""
    keep = np.array([e[5] in splits for e in entries], dtype=bool)
    chosen = [e for e, kept in zip(entries, keep, strict=True) if kept]
    ids = [text for _, text, *_ in chosen]
    files = [file for _, _, file, *_ in chosen]
    if chosen and chosen[0][4] is not None:
        groups = np.array([e[4] for e in chosen], dtype=object)
    elif group_of is not None:
        groups = np.array(
            [group_of(i, _pure_path(f)) for i, f in zip(ids, files, strict=True)], dtype=object
        )
    else:
        groups = None
    split = Split(
        ids=ids,
        labels=labels[keep],
        groups=groups,
        origins=np.array([e[5] for e in chosen], dtype=object),
    )
    if versions is None:
        return replace(split, paths=[Path(f) for f in files])
    uris = [str(f) for f in files]
    return replace(split, uris=uris, versions=[versions[u] for u in uris])
