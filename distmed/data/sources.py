"""Sources -> a `DataIndex`: image folders (via `layout`), MedMNIST `.npz`, `medmnist:NAME`
and `demo`; patient groups from `data.group_regex` / `data.group_csv`; the fingerprint that
keys the decoded cache. Every problem is a one-line `UserError` naming the path.
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
from distmed.data.index import SPLITS, DataIndex, Split
from distmed.data.layout import ALL, FolderLayout, read_layout
from distmed.errors import UserError

NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


def scan_source(cfg: DataConfig) -> DataIndex:
    """Resolve `data.root` into an index; every problem is a `UserError` naming the path."""
    if not cfg.root:
        raise UserError("data.root is not set: pass --data PATH (folder, .npz) or --data demo")
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
    group_of = _group_lookup(cfg, layout)
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


def _group_lookup(cfg: DataConfig, layout: FolderLayout) -> Callable[[str, Path], str] | None:
    """Patient ids: a CSV mapping path -> group, or a regex on the file name."""
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
            inner = path.relative_to(layout.data_root).as_posix()
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
    if cfg.group_csv or cfg.group_regex:
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
