"""Sources -> a `DataIndex`: image folders (via `layout`), label manifests (CSV; one label
per image, or several findings per image coded by `findings`), MedMNIST `.npz` (ChestMNIST's
(N, L) 0/1 labels too), `medmnist:NAME` and `demo`; patient groups from `data.group_regex`,
`data.group_csv`, `data.group_from: PatientID`, a manifest's group column or CheXpert's
`patientNNNNN` folders; the fingerprint that keys the decoded cache. A manifest may name
objects in a bucket (`s3://`, `gs://` URIs) and may itself be one (`distmed.data.remote`).
Every problem is a one-line `UserError` naming the path (and the CSV row).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path, PurePath, PurePosixPath

import numpy as np

from distmed.config import DataConfig
from distmed.data.cache import cache_root
from distmed.data.decode import patient_id
from distmed.data.findings import (
    check_finding_keys,
    column_codes,
    finding_columns,
    npz_codes,
    npz_is_multilabel,
    refuse_finding_keys,
    set_codes,
    several_findings_hint,
)
from distmed.data.index import SPLITS, DataIndex, Split
from distmed.data.labels import Classes, check_class_numbers, classes_of
from distmed.data.layout import ALL, FolderLayout, read_layout, split_of
from distmed.data.objects import is_uri
from distmed.data.sheets import (
    SHEET_SUFFIXES,
    WINDOWS_DRIVE,
    SheetPath,
    cell_text,
    file_of_cell,
    read_sheet,
    refuse_workbook,
)
from distmed.errors import UserError, shorten
from distmed.uris import check_no_credentials, shown

NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


def scan_source(cfg: DataConfig) -> DataIndex:
    """Resolve `data.root` into an index; every problem is a `UserError` naming the path.

    The finding names that `data.uncertain`, `data.missing` and `data.score_findings` give
    are checked against the index's findings (or refused for a single-label source).
    """
    index = _scan(cfg)
    if index.multilabel:
        check_finding_keys(cfg, index.class_names)
    else:
        refuse_finding_keys(cfg, index.name)
    return index


def _scan(cfg: DataConfig) -> DataIndex:
    if cfg.manifest:
        if cfg.root and _sheet_path(cfg.root) != _sheet_path(cfg.manifest):
            raise UserError(
                f"data.manifest {shown(cfg.manifest)} and data.root {shown(cfg.root)}: set one "
                "of them (the manifest's paths are relative to the CSV itself)"
            )
        manifest = cfg.manifest if is_uri(cfg.manifest) else Path(cfg.manifest).expanduser()
        return scan_manifest(manifest, cfg)
    if not cfg.root:
        raise UserError(
            "data.root is not set: pass --data PATH (folder, .npz, labels .csv) or --data demo"
        )
    root = cfg.root
    if root == "demo":
        from distmed.demo import ensure_demo_folder, without_old_marker

        index = scan_folder(ensure_demo_folder(cache_root(cfg)), cfg, name="demo")
        index = replace(index, ignored=without_old_marker(index.ignored))
    elif is_uri(root) and PurePosixPath(root).suffix.lower() in SHEET_SUFFIXES:
        index = scan_manifest(root, cfg)  # a labels sheet in a bucket
    elif is_uri(root):  # a bucket: listed here, read by the streamed loader's tasks
        from distmed.data.remote import scan_bucket

        refuse_workbook(root, f"data.root {shown(root)}")
        index = scan_bucket(root, cfg)
    elif root.startswith("medmnist:"):
        index = scan_npz(fetch_medmnist(root.split(":", 1)[1], cache_root(cfg)), cfg)
    else:
        path = Path(root).expanduser()
        if not path.exists():
            raise UserError(f"data.root {root}: no such file or folder; check --data")
        if path.is_file():
            refuse_workbook(path, f"data.root {root}")
        if path.is_file() and path.suffix.lower() in SHEET_SUFFIXES:
            index = scan_manifest(path, cfg)
        else:
            index = scan_npz(path, cfg) if path.is_file() else scan_folder(path, cfg)
    return index


def _sheet_path(text: str) -> SheetPath:
    """A sheet as configured, to compare: a URI as written, a local path resolved (two
    spellings of one file are one sheet)."""
    return text if is_uri(text) else Path(text).expanduser().resolve()


def scan_folder(root: Path, cfg: DataConfig, name: str | None = None) -> DataIndex:
    """Index `ROOT/<class>/*` or `ROOT/train|val|test/<class>/*`, sorted and deterministic."""
    if cfg.class_names is not None:
        raise UserError(
            f"data.class_names is for .npz sources; {root}'s classes are named by its folders "
            "(rename the folders instead)"
        )
    if cfg.multilabel_requested:
        raise UserError(
            f"data.root {root}: a folder per class gives one label per image; for several "
            "findings per image give a labels CSV (data.manifest: a path column and one "
            "column per finding, or data.label_delimiter for a set column)"
        )
    root = root.resolve()
    layout = read_layout(root)
    _require_two_classes(layout.class_names, str(layout.data_root))
    classes = _folder_classes(layout, cfg)
    group_of = _group_lookup(cfg, layout.data_root)
    pool_splits = [s for s in (ALL, "train", "val") if s in layout.files]
    pool = _files_split(layout, pool_splits, group_of, classes.number_of)
    test = (
        _files_split(layout, ["test"], group_of, classes.number_of)
        if "test" in layout.files
        else None
    )
    return DataIndex(
        name=name or root.name,
        class_names=classes.names,
        pool=pool,
        test=test,
        fingerprint=_fingerprint_files(pool, test),
        layout=layout.describe(),
        ignored=layout.ignored,
        merged_labels=classes.merged,
    )


def _folder_classes(layout: FolderLayout, cfg: DataConfig) -> Classes:
    """Class folders checked as labels: `Normal/` beside `normal/`, a `A|B/` folder."""
    labels = [
        name for files in layout.files.values() for name in layout.class_names for _ in files[name]
    ]
    return classes_of(
        labels,
        [f"folder {cell_text(name)}" for name in labels],  # escaped: a name may hold ESC
        f"class folders in {layout.data_root}",
        cfg.normalize_labels,
        fix="merge the folders",
        from_sheet=False,
        unit="images",
    )


def _require_two_classes(class_names: list[str], where: str) -> None:
    if len(class_names) < 2:
        raise UserError(
            f"data.root {where}: only one class ({', '.join(class_names)}); "
            "a classifier needs at least two class folders"
        )


def _files_split(
    layout: FolderLayout,
    splits: list[str],
    group_of: Callable[[str, PurePath], str] | None,
    number_of: dict[str, int],
) -> Split:
    """The files of `splits` in order, class by class; ids are paths relative to the root."""
    paths: list[Path] = []
    labels: list[int] = []
    origins: list[str] = []
    for split in splits:
        for name in layout.class_names:
            for path in layout.files[split][name]:
                paths.append(path)
                labels.append(number_of[name])
                origins.append(split)
    ids = [p.relative_to(layout.root).as_posix() for p in paths]
    group_array = None
    if group_of is not None:
        group_array = np.array(
            [group_of(i, p) for i, p in zip(ids, paths, strict=True)], dtype=object
        )
    return Split(
        ids=ids,
        labels=np.asarray(labels, dtype=np.int64),
        groups=group_array,
        paths=paths,
        origins=np.array(origins, dtype=object),
    )


def _group_lookup(cfg: DataConfig, data_root: PurePath) -> Callable[[str, PurePath], str] | None:
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


def _fingerprint_files(pool: Split, test: Split | None) -> str:
    """sha256 over every sample's id, file size and modification time (an object's URI and
    version) and label."""
    digest = hashlib.sha256()
    for split in (pool, test):
        if split is None:
            continue
        if split.uris is not None:
            stamps = [f"{u}|{v}" for u, v in zip(split.uris, split.versions or [], strict=True)]
        else:
            stamps = [f"{s.st_size}|{s.st_mtime_ns}" for s in (p.stat() for p in split.paths or [])]
        for sample_id, stamp, label in zip(split.ids, stamps, split.labels, strict=True):
            digest.update(f"{sample_id}|{stamp}|{_label_text(label)}\n".encode())
    return digest.hexdigest()


def _label_text(label: np.ndarray | np.integer) -> str:
    """A class number as written; a row of finding codes as `1,0,-1,nan`."""
    if np.ndim(label) == 0:
        return f"{label}"
    return ",".join(f"{code:g}" for code in np.asarray(label).tolist())


def scan_npz(path: Path, cfg: DataConfig) -> DataIndex:
    """Index a MedMNIST-style `.npz` with its official train/val/test split."""
    if cfg.group_csv or cfg.group_regex or cfg.group_from:
        raise UserError(f"{path}: grouped folds need an image folder; unset data.group_*")
    if path.suffix.lower() != ".npz":
        raise UserError(
            f"data.root {path}: a file must be a MedMNIST .npz; for images give a folder"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise UserError(
                    f"{path}: missing arrays {missing}; a MedMNIST .npz has {list(NPZ_KEYS)}"
                )
            arrays = {k: archive[k] for k in NPZ_KEYS}
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npz ({exc})") from exc
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise UserError(
                f"{path}: {split}_images has {len(images)} rows but {split}_labels {len(labels)}"
            )
        _require_2d(path, f"{split}_images", images)
    table = {f"{split}_labels": arrays[f"{split}_labels"] for split in SPLITS}
    multilabel = npz_is_multilabel(table, str(path), cfg)
    if multilabel:
        numbers = npz_codes(table, str(path))
        num_classes = next(iter(numbers.values())).shape[1]
    else:
        numbers, num_classes = check_class_numbers(
            table, str(path), len(cfg.class_names) if cfg.class_names is not None else None
        )
    splits: dict[str, Split] = {}
    for split in SPLITS:
        images = arrays[f"{split}_images"]
        splits[split] = Split(
            ids=[f"{split}/{i}" for i in range(len(images))],
            labels=numbers[f"{split}_labels"],
            images=images,
            origins=np.full(len(images), split, dtype=object),
        )
    train, val = splits["train"], splits["val"]
    pool = Split(
        ids=train.ids + val.ids,
        labels=np.concatenate([train.labels, val.labels]),
        images=np.concatenate([train.images, val.images]),
        origins=np.concatenate([train.origins, val.origins]),
    )
    class_names = _npz_class_names(cfg, num_classes, path, multilabel)
    if not multilabel:
        _require_two_classes(class_names, str(path))
    stat = path.stat()
    return DataIndex(
        name=path.stem,
        class_names=class_names,
        pool=pool,
        test=splits["test"],
        fingerprint=hashlib.sha256(
            f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
        ).hexdigest(),
        layout="MedMNIST .npz (train, val, test arrays"
        + (f"; {num_classes} findings per image)" if multilabel else ")"),
        multilabel=multilabel,
    )


def _require_2d(path: Path, key: str, images: np.ndarray) -> None:
    """(N, H, W) grey or (N, H, W, 1|3) colour; a 3-D volume per sample is refused."""
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3)):
        return
    raise UserError(
        f"{path}: {key} has shape {tuple(images.shape)}, a 3-D volume (or more) per sample "
        "(MedMNIST 3-D?); distmed classifies 2-D images: use a 2-D data set"
    )


# --------------------------------------------------------------------------- manifests

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
    from distmed.data.keyed import keyed_column, scan_keyed_sheet  # keyed imports this module

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
    group_of = _group_lookup(cfg, _pure_path(base))
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
        fingerprint=_fingerprint_files(pool, test),
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


def fetch_medmnist(name: str, root: Path) -> Path:
    """Download a MedMNIST data set through the `medmnist` package (needs the network)."""
    try:
        import medmnist
    except ImportError as exc:
        raise UserError(
            f"medmnist:{name} needs the optional package: pip install 'distmed[medmnist]', "
            "or download the .npz yourself and pass its path"
        ) from exc
    info = medmnist.INFO.get(name.lower())
    if info is None:
        raise UserError(
            f"medmnist:{name}: unknown data set; known: {', '.join(sorted(medmnist.INFO))}"
        )
    target = root / "medmnist"
    target.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(medmnist, info["python_class"])
    try:
        dataset_class(split="train", root=str(target), download=True)
    except Exception as exc:  # the package raises bare RuntimeError/URLError on network failure
        raise UserError(
            f"medmnist:{name}: download failed ({type(exc).__name__}); without network access, "
            f"fetch {name.lower()}.npz elsewhere and pass its path with --data"
        ) from exc
    return target / f"{name.lower()}.npz"


def _npz_class_names(
    cfg: DataConfig, num_classes: int, path: Path, multilabel: bool = False
) -> list[str]:
    """`data.class_names` for labels 0..n-1 (findings: columns 0..L-1); the label numbers as
    text (findings: `finding_0`, ...) when unset."""
    if cfg.class_names is None:
        return [f"finding_{c}" if multilabel else str(c) for c in range(num_classes)]
    names = [str(n) for n in cfg.class_names]
    if multilabel and (len(names) != num_classes or len(set(names)) != len(names)):
        raise UserError(
            f"data.class_names: {path.name}'s labels have {num_classes} columns, one per "
            f"finding; give {num_classes} distinct names, got {len(names)}"
            f"{'' if len(set(names)) == len(names) else ' with repeats'}"
        )
    if len(names) != num_classes or len(set(names)) != len(names):
        raise UserError(
            f"data.class_names: {path.name} has {num_classes} classes (labels 0-"
            f"{num_classes - 1}); give {num_classes} distinct names, got {len(names)}"
            f"{'' if len(set(names)) == len(names) else ' with repeats'}"
        )
    return names
