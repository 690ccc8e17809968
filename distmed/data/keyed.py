"""Labels sheets keyed by a DICOM attribute -> a `DataIndex`: the clinical sheet
`PatientID,label` (or `StudyInstanceUID,label`, or any attribute named in `data.label_key`)
labels every DICOM image below the sheet's folder whose header holds that value.

Headers are read without pixels (pydicom's `stop_before_pixels`); images whose value is not in
the sheet stop the scan with a count and examples (or are left out with `data.skip_invalid`);
rows that match no image are warned about. Patients are the groups of the folds. The sheet is
read by `sheets.read_sheet` and its labels checked by `labels.classes_of`, as every other
source's: this module owns only the key column, the key -> row table and the headers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distmed.config import DataConfig
from distmed.data.decode import UnreadableImage, is_dicom, read_dicom
from distmed.data.groups import group_lookup
from distmed.data.index import DataIndex, Split, files_fingerprint
from distmed.data.labels import NORMALIZE_HINT, classes_of, require_two_classes, spelling_key
from distmed.data.layout import image_files
from distmed.data.sheets import Sheet, cell_text, read_header, read_sheet
from distmed.errors import UserError

log = logging.getLogger(__name__)

# Columns recognised as keys without `data.label_key`, most specific first: a sheet holding
# StudyInstanceUID and PatientID labels studies (the PatientID column is then only a note).
KNOWN_KEYS = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "AccessionNumber",
    "PatientID",
)
EXAMPLES = 3


@dataclass(frozen=True)
class KeyColumn:
    """The sheet's column (as written) and the DICOM keyword it holds."""

    column: str
    keyword: str


@dataclass(frozen=True)
class _Row:
    """A key's row: its number as a spreadsheet shows it and the label as written."""

    number: int
    label: str


@dataclass(frozen=True)
class _Image:
    path: Path
    key: str
    patient: str


def keyed_column(csv_path: Path, cfg: DataConfig) -> KeyColumn | None:
    """The key column of a sheet keyed by a DICOM attribute, or None for a `path,label` sheet.

    Without `data.label_key` a sheet is keyed when it has a `label` column, no `path` column,
    and one of `KNOWN_KEYS` (any case; spaces and underscores ignored, `Patient ID` is
    PatientID). The header is read as `sheets.read_sheet` reads the rows (separator, encoding,
    `sep=` line).

    Raises:
        UserError: `data.label_key` is not a DICOM keyword or not a column of the sheet, the
            sheet with `data.label_key` is unreadable, or two columns mean the key.
    """
    what = f"data.manifest {csv_path}"
    if cfg.label_key:
        keyword = _dicom_keyword(cfg.label_key)
        header = read_header(csv_path, what, ("label",))
        column = _key_column(header, keyword, what)
        if column is None:
            raise UserError(
                f"data.label_key {cfg.label_key}: {csv_path} has no column {keyword} (found "
                f"{header[:6]}); name the sheet's key column {keyword} or change data.label_key"
            )
        return KeyColumn(column, keyword)
    try:
        header = read_header(csv_path, what, ("label",))
    except UserError:
        return None  # no label column or unreadable: the manifest reader names the cause
    names = {_squash(name) for name in header}
    if "path" in names or "label" not in names:  # a `sep=` line skips read_header's check
        return None
    for keyword in KNOWN_KEYS:
        column = _key_column(header, keyword, what)
        if column is not None:
            return KeyColumn(column, keyword)
    return None


def scan_keyed_sheet(csv_path: Path, key: KeyColumn, cfg: DataConfig) -> DataIndex:
    """Index every DICOM image below the sheet's folder, labelled by its row's `label`.

    Ids are paths relative to the sheet's folder; classes are the labels of the images found,
    checked by `labels.classes_of` (spellings, label sets; `data.normalize_labels` merges,
    counted in images); groups are the PatientIDs of the headers (or `data.group_regex` /
    `data.group_csv`). No test split. The sheet's dialect is `sheets.read_sheet`'s.

    Raises:
        UserError: a row without key or label, a key given two labels, no DICOM image below the
            folder, images whose key is not in the sheet (unless `data.skip_invalid`), an image
            without PatientID to group by, label sets or spellings, or fewer than two classes;
            one line each.
    """
    base = csv_path.resolve().parent
    sheet = read_sheet(csv_path, f"data.manifest {csv_path}", (_column_name(key.column), "label"))
    rows = _read_rows(sheet, key, cfg)
    files, ignored = image_files(base)
    ignored.pop(csv_path.resolve().relative_to(base).as_posix(), None)  # the source itself
    images = _read_headers(base, files, key, cfg, ignored)
    if not images:
        raise UserError(
            f"data.manifest {csv_path}: no DICOM image below {base}; a sheet keyed by "
            f"{key.keyword} labels the DICOM files in its folder and below"
        )
    images = _labelled(csv_path, key, cfg, rows, images, base, ignored)
    _warn_unused(csv_path, key, rows, images)
    classes = classes_of(
        [rows[image.key].label for image in images],
        [f"row {rows[image.key].number}" for image in images],
        f"data.manifest {csv_path}",
        cfg.normalize_labels,
        fix="fix the sheet",
        unit="images",  # a row labels every image of its patient or study
    )
    require_two_classes(classes.names, f"{csv_path} (labels of the images found)")
    pool = _split(base, images, rows, classes.number_of, _groups(cfg, base))
    return DataIndex(
        name=csv_path.stem,
        class_names=classes.names,
        pool=pool,
        test=None,
        fingerprint=files_fingerprint(pool, None),
        layout=f"sheet {csv_path.name} keyed by {key.keyword} ({sheet.dialect}; DICOM images "
        "below its folder)",
        ignored=ignored,
        merged_labels=classes.merged,
    )


def _key_column(header: list[str], keyword: str, what: str) -> str | None:
    """The column that holds `keyword` (spaces, underscores and case ignored); two stop."""
    found = [name for name in header if _squash(name) == _squash(keyword)]
    if len(found) > 1:
        both = " and ".join(f"'{cell_text(name)}'" for name in found)
        raise UserError(
            f"{what}: columns {both} both mean {keyword}; keep one (rename or delete the other)"
        )
    return found[0] if found else None


def _column_name(column: str) -> str:
    """A header name as `read_sheet` matches it."""
    return column.strip().casefold()


def _squash(name: str) -> str:
    return "".join(c for c in name.lower() if c not in " _-")


def _dicom_keyword(name: str) -> str:
    """`data.label_key` as pydicom's keyword (its data dictionary, PS3.6), in any case."""
    from pydicom.datadict import keyword_dict

    lookup = {_squash(keyword): keyword for keyword in keyword_dict}
    keyword = lookup.get(_squash(name))
    if keyword is None:
        raise UserError(
            f"data.label_key {name}: not a DICOM attribute keyword; use one such as PatientID, "
            "StudyInstanceUID or AccessionNumber"
        )
    return keyword


def _read_rows(sheet: Sheet, key: KeyColumn, cfg: DataConfig) -> dict[str, _Row]:
    """Key value -> its row (label as written); a key listed twice with two labels stops.

    Two spellings of one label (`normal`, `Normal`) for one key are one label with
    `data.normalize_labels` (the first row's spelling is kept), else they stop too.
    """
    column = _column_name(key.column)
    rows: dict[str, _Row] = {}
    for number, cells in sheet.rows:
        value, label = cells[column].strip(), cells["label"]
        if not value and not label.strip():
            continue  # a note row (other columns only)
        where = f"data.manifest {sheet.path} row {number}"
        if not value or not label.strip():
            missing = key.column if not value else "label"
            raise UserError(f"{where}: empty {missing}; fill it in or drop the row")
        first = rows.get(value)
        if first is not None and first.label != label:
            same = spelling_key(first.label) == spelling_key(label)
            if not (same and cfg.normalize_labels):
                hint = f" (or {NORMALIZE_HINT}: the two differ only in spelling)" if same else ""
                raise UserError(
                    f"{where}: {key.keyword} {value} is labelled {label!r} here and "
                    f"{first.label!r} in row {first.number}; give it one label{hint}"
                )
        if first is None:
            rows[value] = _Row(number, label)
    return rows


def _labelled(
    csv_path: Path,
    key: KeyColumn,
    cfg: DataConfig,
    rows: dict[str, _Row],
    images: list[_Image],
    base: Path,
    ignored: dict[str, str],
) -> list[_Image]:
    """The images whose key has a row; the others stop, or are ignored with skip_invalid."""
    unlabelled = [image for image in images if image.key not in rows]
    if not unlabelled:
        return images
    examples = ", ".join(
        f"{image.path.relative_to(base).as_posix()} ({key.keyword} {image.key or 'empty'})"
        for image in unlabelled[:EXAMPLES]
    )
    if not cfg.skip_invalid:
        raise UserError(
            f"data.manifest {csv_path}: {len(unlabelled)} of {len(images)} DICOM images "
            f"have a {key.keyword} not in the sheet, e.g. {examples}; add rows for them, "
            "or set data.skip_invalid=true to leave them out"
        )
    for image in unlabelled:
        ignored[image.path.relative_to(base).as_posix()] = (
            f"{key.keyword} {image.key or '(empty)'} not in {csv_path.name}"
        )
    return [image for image in images if image.key in rows]


def _read_headers(
    base: Path, files: list[Path], key: KeyColumn, cfg: DataConfig, ignored: dict[str, str]
) -> list[_Image]:
    """The key and PatientID of each DICOM image; other files and non-images are ignored."""
    images = []
    for path in files:
        rel = path.relative_to(base).as_posix()
        if not is_dicom(path):
            ignored[rel] = f"not DICOM (a sheet keyed by {key.keyword} labels DICOM headers)"
            continue
        try:
            header = read_dicom(path, header_only=True)
        except UnreadableImage as exc:
            if cfg.skip_invalid:
                ignored[rel] = str(exc)
                continue
            raise UserError(
                f"{path}: {exc}; remove it or set data.skip_invalid=true to leave it out"
            ) from exc
        if "Rows" not in header:  # SR, RTSTRUCT, presentation states: no image to classify
            ignored[rel] = f"DICOM without an image ({_sop_class(header)})"
            continue
        images.append(_Image(path, _text(header, key.keyword), _text(header, "PatientID")))
    return images


def _text(header: Any, keyword: str) -> str:
    return str(header.get(keyword, "") or "").strip()


def _sop_class(header: Any) -> str:
    uid = header.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "no SOP class")


def _warn_unused(
    csv_path: Path, key: KeyColumn, rows: dict[str, _Row], images: list[_Image]
) -> None:
    found = {image.key for image in images}
    unused = [value for value in rows if value not in found]
    if unused:
        log.warning(
            "%s: %d of %d %s values match no DICOM image below its folder, e.g. %s",
            csv_path,
            len(unused),
            len(rows),
            key.keyword,
            ", ".join(unused[:EXAMPLES]),
        )


def _groups(cfg: DataConfig, base: Path) -> Callable[[_Image], str]:
    """Patients group the folds: the header's PatientID unless data.group_* says otherwise."""
    lookup = group_lookup(cfg, base) if (cfg.group_regex or cfg.group_csv) else None
    if lookup is not None:
        found = lookup
        return lambda image: found(image.path.relative_to(base).as_posix(), image.path)

    def patient(image: _Image) -> str:
        if not image.patient:
            raise UserError(
                f"{image.path}: no PatientID in its header to group the folds by; give the "
                "patients in data.group_csv (columns path, group)"
            )
        return image.patient

    return patient


def _split(
    base: Path,
    images: list[_Image],
    rows: dict[str, _Row],
    number_of: dict[str, int],
    group_of: Callable[[_Image], str],
) -> Split:
    return Split(
        ids=[image.path.relative_to(base).as_posix() for image in images],
        labels=np.array([number_of[rows[image.key].label] for image in images], np.int64),
        groups=np.array([group_of(image) for image in images], dtype=object),
        paths=[image.path for image in images],
        origins=np.full(len(images), "train", dtype=object),
    )
