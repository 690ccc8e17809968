"""Patient groups of image files, which keep a patient's images in one fold:
`data.group_regex` on the file name or path, `data.group_csv` (a path,group sheet), or
`data.group_from: PatientID` (DICOM headers). Used by folders, manifests and keyed sheets.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from pathlib import Path, PurePath

from distmed.config import DataConfig
from distmed.data.decode import patient_id
from distmed.data.sheets import read_sheet
from distmed.errors import UserError


def group_lookup(cfg: DataConfig, data_root: PurePath) -> Callable[[str, PurePath], str] | None:
    """Patient ids: a CSV mapping path -> group, a regex on the file name, or DICOM headers.
    An object in a bucket comes as `PurePosixPath("bucket/key")`."""
    if cfg.group_from == "PatientID":
        return lambda _sample_id, path: patient_id(Path(path))
    if cfg.group_regex:
        try:
            pattern = re.compile(cfg.group_regex)
        except re.error as exc:
            raise UserError(f"data.group_regex {cfg.group_regex!r}: invalid regex ({exc})") from exc
        return lambda sample_id, path: _group_from_regex(pattern, sample_id, path)
    if cfg.group_csv:
        table = _read_group_csv(Path(cfg.group_csv).expanduser())

        def group_of(sample_id: str, path: PurePath) -> str:
            # A row may name the file relative to the root, to the folder inside a wrapper
            # level, or by its bare name.
            try:
                inner = path.relative_to(data_root).as_posix()
            except ValueError:  # a manifest may name files outside its folder
                inner = path.as_posix()
            return _group_from_table(table, sample_id, (sample_id, inner, path.name))

        return group_of
    return None


def _group_from_regex(pattern: re.Pattern[str], sample_id: str, path: PurePath) -> str:
    """The file name's match, else the sample id's (the path as the sheet or folder writes
    it: CheXpert's `train/patient00001/study1/view1_frontal.jpg` names its patient only in
    a folder)."""
    match = pattern.search(path.name) or pattern.search(sample_id.replace("\\", "/"))
    if not match:
        raise UserError(
            f"data.group_regex {pattern.pattern!r} matches neither file name {path.name} nor "
            f"its path {sample_id}; it must match every file (its first group is the patient id)"
        )
    return match.group(1) if match.groups() else match.group(0)


def _read_group_csv(csv_path: Path) -> dict[str, str]:
    sheet = read_sheet(csv_path, f"data.group_csv {csv_path}", ("path", "group"))
    # Windows exports write `a\b.png`; ids are `/` paths. Keys are NFC: a sheet typed on a Mac
    # writes NFD names (o + combining diaeresis) that look identical to the NFC ones on disk.
    return {
        unicodedata.normalize("NFC", row["path"].strip().replace("\\", "/")): row["group"].strip()
        for _, row in sheet.rows
    }


def _group_from_table(table: dict[str, str], sample_id: str, keys: tuple[str, ...]) -> str:
    for key in keys:
        if (nfc := unicodedata.normalize("NFC", key)) in table:
            return table[nfc]
    raise UserError(f"data.group_csv has no row for {sample_id}; add one (columns path, group)")
