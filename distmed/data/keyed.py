"""Labels sheets keyed by a DICOM attribute -> a `DataIndex`: the clinical sheet
`PatientID,label` (or `StudyInstanceUID,label`, or any attribute named in `data.label_key`)
labels every DICOM image below the sheet's folder whose header holds that value.

Headers are read without pixels (pydicom's `stop_before_pixels`); images whose value is not in
the sheet stop the scan with a count and examples (or are left out with `data.skip_invalid`);
rows that match no image are warned about. Patients are the groups of the folds.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distmed.config import DataConfig
from distmed.data.decode import UnreadableImage, is_dicom, read_dicom
from distmed.data.index import DataIndex, Split
from distmed.data.layout import image_files
from distmed.data.sources import _fingerprint_files, _group_lookup, _require_two_classes
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
class _Image:
    path: Path
    key: str
    patient: str


def keyed_column(csv_path: Path, cfg: DataConfig) -> KeyColumn | None:
    """The key column of a sheet keyed by a DICOM attribute, or None for a `path,label` sheet.

    Without `data.label_key` a sheet is keyed when it has no `path` column and has one of
    `KNOWN_KEYS` (any case; spaces and underscores ignored, `Patient ID` is PatientID).

    Raises:
        UserError: `data.label_key` is not a DICOM keyword or not a column of the sheet.
    """
    header = _header(csv_path)
    if header is None:
        return None  # unreadable or missing: the manifest reader names the cause
    by_name = {_squash(name): name for name in header}
    if cfg.label_key:
        keyword = _dicom_keyword(cfg.label_key)
        column = by_name.get(_squash(keyword))
        if column is None:
            raise UserError(
                f"data.label_key {cfg.label_key}: {csv_path} has no column {keyword} (found "
                f"{header[:6]}); name the sheet's key column {keyword} or change data.label_key"
            )
        return KeyColumn(column, keyword)
    if "path" in by_name or "label" not in by_name:
        return None
    for keyword in KNOWN_KEYS:
        if _squash(keyword) in by_name:
            return KeyColumn(by_name[_squash(keyword)], keyword)
    return None


def scan_keyed_sheet(csv_path: Path, key: KeyColumn, cfg: DataConfig) -> DataIndex:
    """Index every DICOM image below the sheet's folder, labelled by its row's `label`.

    Ids are paths relative to the sheet's folder; classes are the sorted labels; groups are the
    PatientIDs of the headers (or `data.group_regex` / `data.group_csv`). No test split.

    Raises:
        UserError: a row without key or label, a key given two labels, no DICOM image below the
            folder, images whose key is not in the sheet (unless `data.skip_invalid`), an image
            without PatientID to group by, or fewer than two classes; one line each.
    """
    base = csv_path.resolve().parent
    labels = _read_labels(csv_path, key)
    files, ignored = image_files(base)
    images = _read_headers(base, files, key, cfg, ignored)
    if not images:
        raise UserError(
            f"data.manifest {csv_path}: no DICOM image below {base}; a sheet keyed by "
            f"{key.keyword} labels the DICOM files in its folder and below"
        )
    unlabelled = [image for image in images if image.key not in labels]
    if unlabelled:
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
        images = [image for image in images if image.key in labels]
    _warn_unused(csv_path, key, labels, images)
    class_names = sorted({labels[image.key] for image in images})
    _require_two_classes(class_names, f"{csv_path} (labels of the images found)")
    pool = _split(base, images, labels, class_names, _groups(cfg, base))
    return DataIndex(
        name=csv_path.stem,
        class_names=class_names,
        pool=pool,
        test=None,
        fingerprint=_fingerprint_files(pool, None),
        layout=f"sheet {csv_path.name} keyed by {key.keyword} (DICOM images below its folder)",
        ignored=ignored,
    )


def _header(csv_path: Path) -> list[str] | None:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return None
    return [name.strip() for name in next(csv.reader([first], _dialect(first)), [])]


def _dialect(line: str) -> type[csv.Dialect]:
    """Comma, semicolon (European Excel) or tab: whichever the header line uses."""
    try:
        return csv.Sniffer().sniff(line, delimiters=",;\t")
    except csv.Error:
        return csv.excel


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


def _read_labels(csv_path: Path, key: KeyColumn) -> dict[str, str]:
    """Key value -> label; a key listed twice with two labels stops."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
            handle.seek(0)
            reader = csv.DictReader(handle, dialect=_dialect(first))
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            label_column = next((n for n in reader.fieldnames if n.lower() == "label"), None)
            if label_column is None:
                raise UserError(
                    f"data.manifest {csv_path}: keyed by {key.keyword} but has no 'label' "
                    f"column (found {reader.fieldnames[:6]}); add one"
                )
            labels: dict[str, str] = {}
            rows: dict[str, int] = {}
            for number, row in enumerate(reader, start=2):
                value = (row.get(key.column) or "").strip()
                label = (row.get(label_column) or "").strip()
                if not value and not label:
                    continue
                where = f"data.manifest {csv_path} row {number}"
                if not value or not label:
                    missing = key.column if not value else label_column
                    raise UserError(f"{where}: empty {missing}; fill it in or drop the row")
                if value in labels and labels[value] != label:
                    raise UserError(
                        f"{where}: {key.keyword} {value} is labelled {label!r} here and "
                        f"{labels[value]!r} in row {rows[value]}; give it one label"
                    )
                labels[value], rows[value] = label, number
    except UnicodeDecodeError as exc:
        raise UserError(
            f"data.manifest {csv_path}: not UTF-8 text ({exc.reason}); save it as UTF-8 CSV"
        ) from exc
    if not labels:
        raise UserError(f"data.manifest {csv_path}: no rows below the header")
    return labels


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
    csv_path: Path, key: KeyColumn, labels: dict[str, str], images: list[_Image]
) -> None:
    found = {image.key for image in images}
    unused = [value for value in labels if value not in found]
    if unused:
        log.warning(
            "%s: %d of %d %s values match no DICOM image below its folder, e.g. %s",
            csv_path,
            len(unused),
            len(labels),
            key.keyword,
            ", ".join(unused[:EXAMPLES]),
        )


def _groups(cfg: DataConfig, base: Path) -> Callable[[_Image], str]:
    """Patients group the folds: the header's PatientID unless data.group_* says otherwise."""
    lookup = _group_lookup(cfg, base) if (cfg.group_regex or cfg.group_csv) else None
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
    labels: dict[str, str],
    class_names: list[str],
    group_of: Callable[[_Image], str],
) -> Split:
    return Split(
        ids=[image.path.relative_to(base).as_posix() for image in images],
        labels=np.array([class_names.index(labels[image.key]) for image in images], np.int64),
        groups=np.array([group_of(image) for image in images], dtype=object),
        paths=[image.path for image in images],
        origins=np.full(len(images), "train", dtype=object),
    )
