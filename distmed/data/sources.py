"""Sources -> a `DataIndex`: image folders (via `layout`), label manifests (CSV), MedMNIST
`.npz`, `medmnist:NAME` and `demo`; patient groups from `data.group_regex`, `data.group_csv`,
`data.group_from: PatientID` or a manifest's group column; the fingerprint that keys the
decoded cache. Every problem is a one-line `UserError` naming the path (and the CSV row).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distmed.config import DataConfig
from distmed.data.cache import cache_root
from distmed.data.decode import patient_id
from distmed.data.index import SPLITS, DataIndex, Split
from distmed.data.layout import ALL, FolderLayout, read_layout, split_of
from distmed.errors import UserError

NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


def scan_source(cfg: DataConfig) -> DataIndex:
    """Resolve `data.root` into an index; every problem is a `UserError` naming the path."""
    if cfg.manifest:
        manifest = Path(cfg.manifest).expanduser()
        if cfg.root and Path(cfg.root).expanduser().resolve() != manifest.resolve():
            raise UserError(
                f"data.manifest {cfg.manifest} and data.root {cfg.root}: set one of them (the "
                "manifest's paths are relative to the CSV itself)"
            )
        return scan_manifest(manifest, cfg)
    if not cfg.root:
        raise UserError(
            "data.root is not set: pass --data PATH (folder, .npz, labels .csv) or --data demo"
        )
    root = cfg.root
    if root == "demo":
        from distmed.demo import ensure_demo_folder

        index = scan_folder(ensure_demo_folder(cache_root(cfg)), cfg, name="demo")
    elif root.startswith("medmnist:"):
        index = scan_npz(fetch_medmnist(root.split(":", 1)[1], cache_root(cfg)), cfg)
    else:
        path = Path(root).expanduser()
        if not path.exists():
            raise UserError(f"data.root {root}: no such file or folder; check --data")
        if path.is_file() and path.suffix.lower() == ".csv":
            index = scan_manifest(path, cfg)
        else:
            index = scan_npz(path, cfg) if path.is_file() else scan_folder(path, cfg)
    return index


def scan_folder(root: Path, cfg: DataConfig, name: str | None = None) -> DataIndex:
    """Index `ROOT/<class>/*` or `ROOT/train|val|test/<class>/*`, sorted and deterministic."""
    if cfg.class_names is not None:
        raise UserError(
            f"data.class_names is for .npz sources; {root}'s classes are named by its folders "
            "(rename the folders instead)"
        )
    root = root.resolve()
    layout = read_layout(root)
    _require_two_classes(layout.class_names, str(layout.data_root))
    group_of = _group_lookup(cfg, layout.data_root)
    pool_splits = [s for s in (ALL, "train", "val") if s in layout.files]
    pool = _files_split(layout, pool_splits, group_of)
    test = _files_split(layout, ["test"], group_of) if "test" in layout.files else None
    return DataIndex(
        name=name or root.name,
        class_names=layout.class_names,
        pool=pool,
        test=test,
        fingerprint=_fingerprint_files(pool, test),
        layout=layout.describe(),
        ignored=layout.ignored,
    )


def _require_two_classes(class_names: list[str], where: str) -> None:
    if len(class_names) < 2:
        raise UserError(
            f"data.root {where}: only one class ({', '.join(class_names)}); "
            "a classifier needs at least two class folders"
        )


def _files_split(
    layout: FolderLayout, splits: list[str], group_of: Callable[[str, Path], str] | None
) -> Split:
    """The files of `splits` in order, class by class; ids are paths relative to the root."""
    paths: list[Path] = []
    labels: list[int] = []
    origins: list[str] = []
    for split in splits:
        for label, name in enumerate(layout.class_names):
            for path in layout.files[split][name]:
                paths.append(path)
                labels.append(label)
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


def _group_lookup(cfg: DataConfig, data_root: Path) -> Callable[[str, Path], str] | None:
    """Patient ids: a CSV mapping path -> group, a regex on the file name, or DICOM headers."""
    if cfg.group_from == "PatientID":
        return lambda _sample_id, path: patient_id(path)
    if cfg.group_regex:
        try:
            pattern = re.compile(cfg.group_regex)
        except re.error as exc:
            raise UserError(f"data.group_regex {cfg.group_regex!r}: invalid regex ({exc})") from exc
        return lambda _sample_id, path: _group_from_regex(pattern, path)
    if cfg.group_csv:
        table = _read_group_csv(Path(cfg.group_csv).expanduser())

        def group_of(sample_id: str, path: Path) -> str:
            # A row may name the file relative to the root, to the folder inside a wrapper
            # level, or by its bare name.
            try:
                inner = path.relative_to(data_root).as_posix()
            except ValueError:  # a manifest may name files outside its folder
                inner = path.as_posix()
            return _group_from_table(table, sample_id, (sample_id, inner, path.name))

        return group_of
    return None


def _group_from_regex(pattern: re.Pattern[str], path: Path) -> str:
    match = pattern.search(path.name)
    if not match:
        raise UserError(
            f"data.group_regex {pattern.pattern!r} does not match file name {path.name}; "
            "it must match every file (its first group is the patient id)"
        )
    return match.group(1) if match.groups() else match.group(0)


def _read_group_csv(csv_path: Path) -> dict[str, str]:
    if not csv_path.is_file():
        raise UserError(f"data.group_csv {csv_path}: file not found")
    # utf-8-sig: spreadsheets save "UTF-8 CSV" with a byte-order mark before the first column.
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
            if not {"path", "group"} <= set(reader.fieldnames):
                raise UserError(
                    f"data.group_csv {csv_path}: needs columns 'path' and 'group' "
                    f"(found {reader.fieldnames[:5]})"
                )
            return {row["path"].strip(): row["group"].strip() for row in reader}
    except UnicodeDecodeError as exc:
        raise UserError(
            f"data.group_csv {csv_path}: not UTF-8 text ({exc.reason}); save it as UTF-8 CSV"
        ) from exc


def _group_from_table(table: dict[str, str], sample_id: str, keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in table:
            return table[key]
    raise UserError(f"data.group_csv has no row for {sample_id}; add one (columns path, group)")


def _fingerprint_files(pool: Split, test: Split | None) -> str:
    digest = hashlib.sha256()
    for split in (pool, test):
        if split is None:
            continue
        for sample_id, path, label in zip(split.ids, split.paths or [], split.labels, strict=True):
            stat = path.stat()
            digest.update(f"{sample_id}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode())
    return digest.hexdigest()


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
    splits: dict[str, Split] = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        labels = labels.reshape(len(labels), -1)
        if labels.shape[1] != 1:
            raise UserError(
                f"{path}: {split}_labels has {labels.shape[1]} columns; only single-label tasks"
            )
        if len(images) != len(labels):
            raise UserError(
                f"{path}: {split}_images has {len(images)} rows but {split}_labels {len(labels)}"
            )
        _require_2d(path, f"{split}_images", images)
        splits[split] = Split(
            ids=[f"{split}/{i}" for i in range(len(images))],
            labels=labels[:, 0].astype(np.int64),
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
    num_classes = int(max(pool.labels.max(), splits["test"].labels.max())) + 1
    class_names = _npz_class_names(cfg, num_classes, path)
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
        layout="MedMNIST .npz (train, val, test arrays)",
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


def scan_manifest(csv_path: Path, cfg: DataConfig) -> DataIndex:
    """Index a labels CSV: columns `path,label` and optional `group`, `split`.

    Paths are relative to the CSV's folder (absolute ones are kept). `split` takes
    train/val/test and the folder names `layout` knows (valid, holdout, ...); rows of
    train and val form the CV pool, test is held back. Classes are the sorted labels.

    Raises:
        UserError: no such file, missing columns, a missing file, an unknown split, a
            duplicate path, an empty label or a label column with one value; one line
            naming the CSV and the row (as a spreadsheet numbers it: the header is row 1).
    """
    from distmed.data.keyed import keyed_column, scan_keyed_sheet  # keyed imports this module

    if key := keyed_column(csv_path, cfg):  # PatientID,label: labels from DICOM headers
        return scan_keyed_sheet(csv_path, key, cfg)
    rows = _read_manifest(csv_path)
    has_group = any(row.get("group") is not None for _, row in rows)
    if has_group and (cfg.group_csv or cfg.group_regex or cfg.group_from):
        raise UserError(
            f"data.manifest {csv_path}: has a group column and data.group_* is set too; "
            "keep one source of patient ids"
        )
    base = csv_path.resolve().parent
    entries: list[tuple[int, str, Path, str, str | None, str]] = []
    seen: dict[Path, int] = {}
    for number, row in rows:
        where = f"data.manifest {csv_path} row {number}"
        text = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        if not text:
            raise UserError(f"{where}: empty path; every row names an image file")
        if not label:
            raise UserError(f"{where}: {text} has an empty label; fill it in or drop the row")
        path = (base / text).resolve()
        if not path.is_file():
            raise UserError(
                f"{where}: no such file {text} (paths are relative to the CSV's folder {base})"
            )
        if path in seen:
            raise UserError(
                f"{where}: {text} is listed again (first in row {seen[path]}); list each file once"
            )
        seen[path] = number
        split = _manifest_split(row.get("split"), where)
        group = (row.get("group") or "").strip() if has_group else None
        if has_group and not group:
            raise UserError(f"{where}: {text} has an empty group; every row needs its patient")
        entries.append((number, text, path, label, group, split))
    class_names = sorted({label for *_, label, _, _ in entries})
    if len(class_names) < 2:
        raise UserError(
            f"data.manifest {csv_path}: column 'label' has one value ({class_names[0]!r}) in "
            f"all {len(entries)} rows; a classifier needs at least two classes"
        )
    group_of = _group_lookup(cfg, base)
    pool = _manifest_split_of(entries, class_names, ("train", "val"), group_of)
    test_entries = [e for e in entries if e[5] == "test"]
    test = _manifest_split_of(entries, class_names, ("test",), group_of) if test_entries else None
    if len(pool) == 0:
        raise UserError(
            f"data.manifest {csv_path}: every row is in the test split; mark the rows to "
            "cross-validate as train (or val)"
        )
    splits = sorted({e[5] for e in entries})
    return DataIndex(
        name=csv_path.stem,
        class_names=class_names,
        pool=pool,
        test=test,
        fingerprint=_fingerprint_files(pool, test),
        layout=f"manifest {csv_path.name} (splits: {', '.join(splits)})",
    )


def _read_manifest(csv_path: Path) -> list[tuple[int, dict[str, str | None]]]:
    """(row number, {column: value}) per non-blank row; column names lower-cased."""
    if not csv_path.is_file():
        raise UserError(f"data.manifest {csv_path}: file not found")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip().lower() for name in next(reader, [])]
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise UserError(
                    f"data.manifest {csv_path}: needs columns 'path' and 'label' (optional "
                    f"'group', 'split'); missing {missing}, found {header[:6]}"
                )
            index = {name: header.index(name) for name in MANIFEST_COLUMNS if name in header}
            rows: list[tuple[int, dict[str, str | None]]] = []
            for number, values in enumerate(reader, start=2):
                if not any(v.strip() for v in values):
                    continue
                rows.append(
                    (number, {n: values[i] if i < len(values) else "" for n, i in index.items()})
                )
    except UnicodeDecodeError as exc:
        raise UserError(
            f"data.manifest {csv_path}: not UTF-8 text ({exc.reason}); save it as UTF-8 CSV"
        ) from exc
    except csv.Error as exc:
        raise UserError(f"data.manifest {csv_path}: not a readable CSV ({exc})") from exc
    if not rows:
        raise UserError(f"data.manifest {csv_path}: no rows below the header")
    return rows


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
    entries: list[tuple[int, str, Path, str, str | None, str]],
    class_names: list[str],
    splits: tuple[str, ...],
    group_of: Callable[[str, Path], str] | None,
) -> Split:
    chosen = [e for e in entries if e[5] in splits]
    ids = [text for _, text, *_ in chosen]
    paths = [path for _, _, path, *_ in chosen]
    if chosen and chosen[0][4] is not None:
        groups = np.array([e[4] for e in chosen], dtype=object)
    elif group_of is not None:
        groups = np.array([group_of(i, p) for i, p in zip(ids, paths, strict=True)], dtype=object)
    else:
        groups = None
    return Split(
        ids=ids,
        labels=np.array([class_names.index(e[3]) for e in chosen], dtype=np.int64),
        groups=groups,
        paths=paths,
        origins=np.array([e[5] for e in chosen], dtype=object),
    )


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


def _npz_class_names(cfg: DataConfig, num_classes: int, path: Path) -> list[str]:
    """`data.class_names` for labels 0..n-1; the label numbers as text when unset."""
    if cfg.class_names is None:
        return [str(c) for c in range(num_classes)]
    names = [str(n) for n in cfg.class_names]
    if len(names) != num_classes or len(set(names)) != len(names):
        raise UserError(
            f"data.class_names: {path.name} has {num_classes} classes (labels 0-"
            f"{num_classes - 1}); give {num_classes} distinct names, got {len(names)}"
            f"{'' if len(set(names)) == len(names) else ' with repeats'}"
        )
    return names
