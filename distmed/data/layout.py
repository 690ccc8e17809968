"""Image folders -> which split and which class every image file belongs to.

Knows the split names people use, one wrapper level that unzipping adds, the clutter that
operating systems and tools leave (skipped and counted), symbolic links (followed, loops
refused), and stops with one line naming the folder whenever a layout could mean two things,
or when its folders are not classes at all: a DICOM export (DICOMDIR, PT*/ST*/SE* levels, one
patient per folder, one patient's series), a patient/study tree (CheXpert, `Patient 1/`,
`1000/2019-03-01/`), the parts of one download (HAM10000, `Images (1)/`) or many tiny folders
beside a labels sheet. The rule and the public layouts it was decided from
are in docs/data.md ("What counts as class folders").
"""

from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from distmed.data.decode import (
    FILE_EXTENSIONS,
    UnreadableImage,
    is_dicom,
    is_image_file,
    read_dicom,
)
from distmed.data.labels import spelling_key
from distmed.errors import UserError

# Folder name (lower case) -> the split it is. Anything else at the top level is a class.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "holdout": "test",
}
# The split key of a folder without split folders: every image is in the CV pool.
ALL = "all"
# Names (lower case) that operating systems and tools leave in data folders.
CLUTTER_NAMES = {
    "__macosx": "macOS archive folder (__MACOSX)",
    "thumbs.db": "Windows thumbnail cache (Thumbs.db)",
    "desktop.ini": "Windows folder settings (desktop.ini)",
    "@eadir": "Synology index folder (@eaDir)",
    ".ipynb_checkpoints": "Jupyter checkpoints (.ipynb_checkpoints)",
}
# The index file of a DICOM export (PS3.10 media); DICOM by content, but never an image.
DICOMDIR = "DICOMDIR"
# Folder levels that are not classes: a level word and a number, joined by any separator (space,
# `_`, `-`, none). Decided from the layouts people download and receive: pydicom's FileSet and
# CD writers (PT000000/ST000000/SE000000, PAT00001/STD00001/SER00001), CheXpert
# (patient00001/study1/), BIDS (sub-01/ses-01/), KiTS (case_00000/), viewers and hand-made
# trees (`Patient 1/`, `Pt 1/`, `pid0001/`, `ID_0001/`). A single letter with digits (P1, S2)
# and other words (grade_1, stage_2) are left alone: such names are real classes.
_NUMBERED = r"[-_ ]*\d+$"
PATIENT_FOLDER = re.compile(
    r"(?i)^(pt|pat|patient|subject|subj|sub|participant|case|pid|id)" + _NUMBERED
)
STUDY_FOLDER = re.compile(r"(?i)^(st|std|stu|study|ses|session|visit|exam)" + _NUMBERED)
SERIES_FOLDER = re.compile(r"(?i)^(se|ser|series)" + _NUMBERED)
# A study folder named by its date (`2019-03-01`, `20190301_0930`, `01.03.2019`), as PACS
# tools and hand-made patient/date trees name them; a date is never a class.
DATE_FOLDER = re.compile(
    r"^((19|20)\d\d([-_.]?)(0[1-9]|1[0-2])\3(0[1-9]|[12]\d|3[01])"
    r"|(0[1-9]|[12]\d|3[01])([-_.])(0[1-9]|1[0-2])\7(19|20)\d\d)(\D.*)?$"
)
# A patient id folder that holds dated studies (besides PATIENT_FOLDER names): a number
# (`1000`), or up to 4 letters and 4 digits or more (`MRN12345`); stages and grades (`T1`,
# `grade_2`) are not, so class folders holding dated sub-folders stay classes.
PATIENT_ID_FOLDER = re.compile(r"(?i)^([a-z]{0,4}[-_ ]*\d{4,}|\d+)$")
# Parts of one download: HAM10000_images_part_1/_part_2, NIH's images_001 ... images_012
# (and split-named parts, `_split_in_name`: RSNA's stage_2_train_images/, stage_2_test_images/).
PART_FOLDER = re.compile(r"(?i)^(.*?)[-_ ]?(part|batch|chunk)[-_ ]?\d+$|^(images?|imgs?)[-_ ]?\d+$")
# A browser's repeated download of one folder: `Images/`, `Images (1)/`, `Images (2)/`.
DOWNLOAD_COPY = re.compile(r"^(.+?) *\(\d+\)$")
# Labels sheets that a folder of non-classes usually ships with (HAM10000 metadata.csv,
# CheXpert train.csv, NIH Data_Entry_2017.csv, RSNA stage_2_train_labels.csv, ISIC's .xlsx).
SHEET_SUFFIXES = (".csv", ".tsv", ".xlsx", ".xls")
# "Many classes with a handful of images each": at least this many folders with at most this
# median. Public class-folder sets have 2-15 classes of a hundred images or more (Kaggle chest
# X-ray, HAM10000 by diagnosis, ISIC 2019, Kvasir, brain-tumour MRI, MedMNIST exports); patient
# or image-id folders hold 1-10 images each (CheXpert: 1-3 per study).
MANY_FOLDERS = 10
HANDFUL = 5
# DICOM files whose PatientID is read per folder (spread over the sorted files): enough to see
# two patients in a real class folder, few enough to keep the scan header-only and quick.
PATIENT_SAMPLE = 6


def split_of(name: str) -> str | None:
    """The split a folder name stands for (`Valid` -> `val`), or None for a class name."""
    return SPLIT_NAMES.get(name.lower())


def clutter_reason(name: str) -> str | None:
    """Why a file or folder name is operating-system or tool clutter, or None if it is data."""
    lower = name.lower()
    if lower in CLUTTER_NAMES:
        return CLUTTER_NAMES[lower]
    if name.startswith("._"):
        return "macOS resource fork (._*)"
    if name.startswith("."):
        return "hidden (.*)"
    return None


@dataclass(frozen=True)
class FolderLayout:
    """What an image folder holds: split -> class -> image files, and what was left out.

    Splits are `train`, `val`, `test` (the canonical names) for a split folder, or `all`
    for `ROOT/<class>/`. `ignored` maps a path relative to the root to why it was skipped.
    """

    root: Path
    data_root: Path  # `root`, or the single wrapper folder inside it
    class_names: list[str]
    files: dict[str, dict[str, list[Path]]]
    split_folders: dict[str, str] = field(default_factory=dict)  # split -> folder name
    ignored: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One phrase: `split folders train/, valid/ (val), test/ inside wrapper x/`."""
        if self.split_folders:
            parts = [
                f"{folder}/" + ("" if folder == split else f" ({split})")
                for split, folder in self.split_folders.items()
            ]
            text = "split folders " + ", ".join(parts)
        else:
            text = "class folders ROOT/<class>/"
        if self.data_root != self.root:
            text += f" inside wrapper {self.data_root.name}/"
        return text


def read_layout(root: Path) -> FolderLayout:
    """Scan `ROOT/<class>/…` or `ROOT/<split>/<class>/…` (optionally one wrapper folder down).

    Raises:
        UserError: no class folders, an empty class folder, a link loop, or an ambiguous
            layout; the message names the folder and what to do.
    """
    walker = _Walker(root)
    data_root = root
    dirs, files = walker.entries(root)
    if len(dirs) == 1 and split_of(dirs[0].name) is None and not _images(files):
        inner_dirs, inner_files = walker.entries(dirs[0])
        if inner_dirs:  # a folder of folders: the wrapper an unzip adds, not a lone class
            data_root, dirs, files = dirs[0], inner_dirs, inner_files
    _check_not_dicom_export(root, data_root, files)
    _check_not_parts(root, data_root, dirs)  # before splits: `train/` beside `train (1)/`
    walker.ignore_loose(files)
    if not dirs:
        raise UserError(
            f"data.root {root}: no class folders; expected ROOT/<class>/*.png "
            "or ROOT/train|val|test/<class>/*.png"
        )
    split_dirs = [d for d in dirs if split_of(d.name)]
    if not split_dirs:
        classes = walker.classes(data_root, dirs)
        return FolderLayout(root, data_root, sorted(classes), {ALL: classes}, {}, walker.ignored)
    others = [d for d in dirs if not split_of(d.name)]
    if others:
        raise UserError(
            f"data.root {data_root}: split folder(s) {_names(split_dirs)} beside folder(s) "
            f"{_names(others)} that are not splits; move every class folder into the split "
            "folders (ROOT/train/<class>/), or rename a class folder that has a split's name"
        )
    by_split: dict[str, Path] = {}
    for folder in split_dirs:
        split = split_of(folder.name)
        assert split is not None  # split_dirs holds only folders named for a split
        if split in by_split:
            raise UserError(
                f"data.root {data_root}: {by_split[split].name}/ and {folder.name}/ are both "
                f"the {split} split; merge them into one folder or rename one"
            )
        by_split[split] = folder
    if "train" not in by_split:
        raise UserError(
            f"data.root {data_root}: split folder(s) {_names(split_dirs)} but no training "
            "split; add train/ (or training/) with the class folders to cross-validate"
        )
    ordered: dict[str, Path] = {s: by_split[s] for s in ("train", "val", "test") if s in by_split}
    files_by_split: dict[str, dict[str, list[Path]]] = {
        split: walker.classes(folder, walker.entries(folder)[0], loose=True)
        for split, folder in ordered.items()
    }
    train_names = sorted(files_by_split["train"])
    train_keys = {spelling_key(name) for name in train_names}
    for split, classes in files_by_split.items():
        if {spelling_key(name) for name in classes} != train_keys:
            raise UserError(
                f"data.root {data_root}: class folders of {ordered[split].name}/ "
                f"{sorted(classes)} differ from {ordered['train'].name}/ {train_names}; every "
                "split needs the same classes"
            )
    # Folders that differ between splits only in case or spaces (`train/normal`,
    # `test/Normal`) are spellings of one label: every spelling is listed in every split
    # (empty where absent), so that `labels.classes_of` stops on them, naming the spellings,
    # or merges them with data.normalize_labels, as it does within one folder.
    names = sorted(set().union(*files_by_split.values()))
    for classes in files_by_split.values():
        for name in names:
            classes.setdefault(name, [])
    return FolderLayout(
        root,
        data_root,
        names,
        files_by_split,
        {split: folder.name for split, folder in ordered.items()},
        walker.ignored,
    )


class _Walker:
    """Lists folders below `root`, following links, recording what it skips and why."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.ignored: dict[str, str] = {}

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def entries(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """The sub-folders and files of `folder` (links followed), sorted; clutter skipped."""
        try:
            found = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            raise UserError(
                f"cannot read folder {folder} ({exc.strerror or exc}); fix its permissions "
                "or leave it out of data.root"
            ) from exc
        dirs, files = [], []
        for entry in found:
            path = folder / entry.name
            is_dir = entry.is_dir()  # follows symbolic links
            reason = clutter_reason(entry.name)
            if reason:
                self.ignored[self.relative(path) + ("/" if is_dir else "")] = reason
            elif is_dir:
                dirs.append(path)
            elif entry.is_file():
                files.append(path)
            elif entry.is_symlink():
                self.ignored[self.relative(path)] = "broken symbolic link"
            else:
                self.ignored[self.relative(path)] = "not a regular file"
        return dirs, files

    def ignore_loose(self, files: list[Path]) -> None:
        for path in files:
            self.ignored[self.relative(path)] = (
                "image outside any class folder" if _images([path]) else _not_image(path)
            )

    def classes(
        self, folder: Path, class_dirs: list[Path], loose: bool = False
    ) -> dict[str, list[Path]]:
        """Class name -> its image files (any depth below the class folder, sorted)."""
        if loose:
            self.ignore_loose(self.entries(folder)[1])
        if not class_dirs:
            raise UserError(f"{folder}: no class folders inside; expected {folder}/<class>/*.png")
        for class_dir in class_dirs:
            if split_of(class_dir.name):
                raise UserError(
                    f"class folder {class_dir} has a split's name ({class_dir.name}); the "
                    "layout looks one level off: use ROOT/<split>/<class>/ with class folders "
                    "that are not split names, or rename it"
                )
        _check_folder_names(self.root, folder, class_dirs)
        self._check_not_one_level_off(class_dirs)
        ancestors = (self.real_root, os.path.realpath(folder.parent), os.path.realpath(folder))
        classes = {}
        for class_dir in class_dirs:
            images = sorted(self.images(class_dir, ancestors))
            if not images:
                raise UserError(
                    f"class folder {class_dir} has no images ({', '.join(FILE_EXTENSIONS)}, "
                    "DICOM); "
                    "add images or remove the folder"
                )
            classes[class_dir.name] = images
        _check_not_patients(self.root, folder, classes)
        _check_not_tiny_folders(self.root, folder, classes)
        return classes

    def images(self, folder: Path, ancestors: tuple[str, ...]) -> list[Path]:
        real = os.path.realpath(folder)
        if real in ancestors or self.real_root.startswith(real.rstrip(os.sep) + os.sep):
            raise UserError(
                f"{folder}: symbolic link loop (it leads back to {real}, a folder above it); "
                "remove that link or point it at the images themselves"
            )
        dirs, files = self.entries(folder)
        found = []
        for path in files:
            if path.name.upper() == DICOMDIR:
                self.ignored[self.relative(path)] = "DICOMDIR (a DICOM export's index)"
            elif _images([path]):
                found.append(path)
            else:
                self.ignored[self.relative(path)] = _not_image(path)
        for sub in dirs:
            found.extend(self.images(sub, (*ancestors, real)))
        return found

    def _check_not_one_level_off(self, class_dirs: list[Path]) -> None:
        if len(class_dirs) < 2:
            return
        shared = None
        for class_dir in class_dirs:
            names = frozenset(d.name for d in self.entries(class_dir)[0])
            if shared is not None and names != shared:
                return
            shared = names
        if shared and len(shared) >= 2:
            raise UserError(
                f"class folders {_names(class_dirs)} each hold the same sub-folders "
                f"({', '.join(sorted(shared)[:5])}); the layout looks one level off: arrange "
                "the data as ROOT/<split>/<class>/ or ROOT/<class>/ so that labels are the "
                "top folders"
            )


def _images(files: list[Path]) -> bool:
    """Any image file: by suffix, or DICOM by content (`DICM` after the preamble)."""
    return any(is_image_file(p) for p in files)


def _not_image(path: Path) -> str:
    return f"not an image file ({path.suffix.lower() or 'no extension'})"


def _names(folders: list[Path], shown: int = 5) -> str:
    names = ", ".join(f"{f.name}/" for f in folders[:shown])
    return names + (f" and {len(folders) - shown} more" if len(folders) > shown else "")


# --------------------------------------------------------------------------- not class folders


def image_files(root: Path) -> tuple[list[Path], dict[str, str]]:
    """Every image file below `root` at any depth (sorted), and what was skipped and why.

    Clutter is skipped, links followed (loops refused) and DICOMDIR files left out, as in a
    class folder; used by sheets that label files by their DICOM header.
    """
    walker = _Walker(root)
    found = sorted(walker.images(root, ()))
    return found, walker.ignored


def _check_not_dicom_export(root: Path, data_root: Path, files: list[Path]) -> None:
    """A DICOMDIR at the top: the folders below are patients of a DICOM export."""
    for path in files:
        if path.name.upper() == DICOMDIR:
            where = data_root if path.parent == data_root else root
            raise UserError(
                f"data.root {where} is a DICOM export ({path.name} indexes patients, studies and "
                f"series), not class folders; {_labels_hint(root, data_root, dicom=True)}"
            )


def _check_folder_names(root: Path, folder: Path, class_dirs: list[Path]) -> None:
    """Patient/study levels or download parts where class folders should be."""
    _check_not_parts(root, folder, class_dirs)
    splits = [d for d in class_dirs if _split_in_name(d.name)]
    if len(splits) >= 2:
        raise UserError(
            f"{folder}: folders {_names(splits, 3)} are the splits of one download (their "
            "names hold train/test/val), not classes; " + _labels_hint(root, folder)
        )
    _check_not_patient_tree(root, folder, class_dirs)
    _check_not_one_patient(root, folder, class_dirs)


def _check_not_parts(root: Path, folder: Path, dirs: list[Path]) -> None:
    """Two or more folders that are parts of one download (`*_part_1`, `Images (1)`)."""
    copied = {m.group(1).lower() for d in dirs if (m := DOWNLOAD_COPY.match(d.name))}
    parts = [
        d
        for d in dirs
        if PART_FOLDER.match(d.name) or DOWNLOAD_COPY.match(d.name) or d.name.lower() in copied
    ]
    if len(parts) >= 2:
        raise UserError(
            f"{folder}: folders {_names(parts, 3)} are parts of one download, not classes; "
            + _labels_hint(root, folder)
        )


def _check_not_patient_tree(root: Path, folder: Path, class_dirs: list[Path]) -> None:
    """Folders that are patients: named so, or holding studies (named or dated)."""
    sample = class_dirs[:20]
    patients = [d for d in class_dirs if PATIENT_FOLDER.match(d.name)]
    with_studies = [d for d in sample if _holds_studies(d)]
    if len(class_dirs) < 2 or (
        len(patients) * 2 < len(class_dirs) and len(with_studies) * 2 < len(sample)
    ):
        return
    shown = _names(class_dirs, 3)
    looked = (with_studies or patients)[:3]
    if any(_has_sub_folder(s, SERIES_FOLDER) for d in looked for s in _dirs(d)):
        raise UserError(
            f"{folder}: folders {shown} are the PT*/ST*/SE* (patient/study/series) levels "
            f"of a DICOM export, not classes; {_labels_hint(root, folder, dicom=True)}"
        )
    raise UserError(
        f"{folder}: folders {shown} are a patient/study tree (one folder per patient, as "
        f"CheXpert's patientNNNNN/studyN/ or PATIENT/DATE/), not classes; "
        + _labels_hint(root, folder)
    )


def _check_not_one_patient(root: Path, folder: Path, class_dirs: list[Path]) -> None:
    """The studies or series of one patient as class folders: a single patient folder (given
    as the root, or unwrapped as a wrapper) holding ST*/SE* levels or dated studies."""
    studies = [d for d in class_dirs if STUDY_FOLDER.match(d.name) or DATE_FOLDER.match(d.name)]
    series = [d for d in class_dirs if SERIES_FOLDER.match(d.name)]
    if not class_dirs or (len(studies) + len(series)) * 2 < len(class_dirs):
        return
    with_series = [d for d in studies[:20] if _has_sub_folder(d, SERIES_FOLDER)]
    dated = any(DATE_FOLDER.match(d.name) for d in studies)
    in_patient = bool(PATIENT_FOLDER.match(folder.name) or PATIENT_ID_FOLDER.match(folder.name))
    in_study = bool(STUDY_FOLDER.match(folder.name))
    shown = _names(class_dirs, 3)
    if with_series or (series and (in_patient or in_study)):
        raise UserError(
            f"{folder}: folders {shown} are the study/series levels of one patient's DICOM "
            f"export (PT*/ST*/SE*), not classes; {_labels_hint(root, folder, dicom=True)}"
        )
    if dated or (studies and in_patient):
        raise UserError(
            f"{folder}: folders {shown} are the studies of one patient (a patient/study tree, "
            f"PATIENT/STUDY/ or PATIENT/DATE/), not classes; {_labels_hint(root, folder)}"
        )


def _holds_studies(folder: Path) -> bool:
    """Study folders inside (`study1`, `ses-01`), or dated ones inside a patient id folder."""
    subs = _dirs(folder)
    if any(STUDY_FOLDER.match(d.name) for d in subs):
        return True
    named = PATIENT_FOLDER.match(folder.name) or PATIENT_ID_FOLDER.match(folder.name)
    return bool(named) and any(DATE_FOLDER.match(d.name) for d in subs)


def _split_in_name(name: str) -> bool:
    """A split's name as a word of a longer name: RSNA's `stage_2_train_images`, ISIC's
    `ISIC_2019_Training_Input`, SIIM's `dicom-images-test` (exact split names are splits)."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return len(words) > 1 and any(split_of(w) for w in words)


def _check_not_patients(root: Path, folder: Path, classes: dict[str, list[Path]]) -> None:
    """DICOM class folders that are patients: named by their PatientID, or one patient each."""
    if len(classes) < 2:
        return
    headers = {name: _sampled_headers(files) for name, files in classes.items()}
    patients = {name: _distinct(found, 0) for name, found in headers.items()}
    named = [name for name, ids in patients.items() if name in ids]
    # One patient per folder counts only where every folder showed two DICOM files or more.
    one_each = (
        all(len(ids) == 1 for ids in patients.values())
        and len({ids[0] for ids in patients.values()}) == len(classes)
        and all(len(_dicom_files(files)) >= 2 for files in classes.values())
    )
    # Every folder's DICOM files of one and the same patient, each folder one study or one
    # series: a viewer's export of one patient's series (`CHEST PA - 1/`, `CHEST LAT - 2/`).
    # Files anonymised to one PatientID for all (no UIDs, or a new study per image) pass.
    seen = {patient for ids in patients.values() for patient in ids}
    shown = _names(sorted(folder / n for n in classes), 3)
    one_unit = all(
        len(_distinct(found, 1)) == 1 or len(_distinct(found, 2)) == 1 for found in headers.values()
    )
    if len(seen) == 1 and all(patients.values()) and one_unit:
        raise UserError(
            f"{folder}: folders {shown} all hold DICOM files of one patient (PatientID "
            f"{seen.pop()}): the series or studies of one patient, not classes; "
            + _labels_hint(root, folder, dicom=True, one_patient=True)
        )
    if len(named) >= 2 and len(named) * 2 >= len(classes):
        what = f"named by the PatientID of their DICOM files ({', '.join(named[:3])})"
    elif one_each:
        what = "one patient each (every DICOM file in a folder has the same PatientID)"
    else:
        return
    raise UserError(
        f"{folder}: folders {shown} are {what}: "
        f"patients, not classes; {_labels_hint(root, folder, dicom=True)}"
    )


def _check_not_tiny_folders(root: Path, folder: Path, classes: dict[str, list[Path]]) -> None:
    """Many folders of a handful of images beside a labels sheet: ids, with labels elsewhere."""
    if len(classes) < MANY_FOLDERS or not _sheets(root, folder):
        return
    median = statistics.median(len(files) for files in classes.values())
    if median <= HANDFUL:
        raise UserError(
            f"{folder}: {len(classes)} folders of {median:g} image(s) each (median) are not "
            f"classes; {_labels_hint(root, folder)}"
        )


def _labels_hint(root: Path, folder: Path, dicom: bool = False, one_patient: bool = False) -> str:
    """The fix: the labels sheet beside the folders, or how to write one (for DICOM, keyed by
    PatientID or StudyInstanceUID; for one patient's images, by StudyInstanceUID or
    SeriesInstanceUID, which `keyed` reads as well)."""
    if one_patient:
        keys, more = "StudyInstanceUID,label", "SeriesInstanceUID,label, or PatientID,label"
    else:
        keys, more = "PatientID,label", "StudyInstanceUID,label"
    sheets = _sheets(root, folder)
    if not sheets and dicom:  # a sheet beside the export labels the images below it too
        sheets = _sheets(root.parent, root.parent)
    if sheets:
        place = sheets[0].parent
        names = ", ".join([f"`{p.name}`" for p in sheets if p.parent == place][:3])
        hint = f"{place} holds {names}; to use its labels, give it with `--data {sheets[0]}`"
        if dicom:
            return hint + f" (path,label columns, or {keys} / {more})"
        columns = _sheet_columns(sheets[0])
        if columns is not None and not {"path", "label"} <= {c.lower() for c in columns}:
            hint += (
                f" once it has a `path` (file, relative to the sheet) and a `label` column "
                f"(it has {', '.join(columns[:5])})"
            )
        return hint
    if dicom:
        return (
            f"write a sheet {keys} (or {more}) into {root} and give it "
            "with `--data SHEET.csv`: it labels every DICOM image below the sheet's folder"
        )
    return f"write a path,label sheet into {root} and give it with `--data SHEET.csv`"


def _sheet_columns(sheet: Path) -> list[str] | None:
    """The header of a CSV/TSV sheet (comma, semicolon or tab), or None if it cannot be read."""
    if sheet.suffix.lower() not in (".csv", ".tsv"):
        return None
    try:
        with sheet.open(encoding="utf-8-sig", errors="replace") as handle:
            first = handle.readline().strip()
    except OSError:
        return None
    separator = max(",;\t", key=first.count)
    return [name.strip() for name in first.split(separator) if name.strip()] or None


def _sheets(root: Path, folder: Path) -> list[Path]:
    """Labels sheets in the root, in `folder`'s parent and in `folder` (nearest first)."""
    found: list[Path] = []
    for place in dict.fromkeys((folder, folder.parent, root)):
        if place != root and root not in place.parents:
            continue
        try:
            names = sorted(os.listdir(place))
        except OSError:
            continue
        for name in names:
            path = place / name
            is_sheet = path.suffix.lower() in SHEET_SUFFIXES and not clutter_reason(name)
            if is_sheet and path.is_file() and path not in found:
                found.append(path)
    return found


def _dirs(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir()]
    except OSError:
        return []


def _has_sub_folder(folder: Path, pattern: re.Pattern[str]) -> bool:
    return any(pattern.match(d.name) for d in _dirs(folder))


def _dicom_files(files: list[Path]) -> list[Path]:
    return [p for p in files if is_dicom(p)]


def _sampled_headers(files: list[Path]) -> list[tuple[str, str, str]]:
    """(PatientID, StudyInstanceUID, SeriesInstanceUID) of up to PATIENT_SAMPLE DICOM files
    spread over `files` ('' where absent); unreadable files are left out."""
    dicom = _dicom_files(files)
    if not dicom:
        return []
    step = max(1, len(dicom) // PATIENT_SAMPLE)
    found: list[tuple[str, str, str]] = []
    for path in dicom[::step][:PATIENT_SAMPLE]:
        try:
            header = read_dicom(path, header_only=True)
        except (UnreadableImage, UserError):
            continue  # unreadable files are named later, when decoded
        keywords = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
        values = [str(header.get(k, "") or "").strip() for k in keywords]
        found.append((values[0], values[1], values[2]))
    return found


def _distinct(headers: list[tuple[str, str, str]], field: int) -> list[str]:
    """The distinct non-empty values of one field of `_sampled_headers`, in order."""
    return list(dict.fromkeys(h[field] for h in headers if h[field]))
