"""Sources -> a `DataIndex`: `data.root` or `data.manifest` dispatched to its reader (image
folders via `layout`, labels sheets via `manifest`, buckets via `remote`), and the folder and
MedMNIST `.npz` readers (ChestMNIST's (N, L) 0/1 labels too), `medmnist:NAME` and `demo`.
Patient groups come from `groups`. Every problem is a one-line `UserError` naming the path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path, PurePath, PurePosixPath

import numpy as np

from distmed.config import DataConfig
from distmed.data.cache import cache_root
from distmed.data.findings import (
    check_finding_keys,
    npz_codes,
    npz_is_multilabel,
    refuse_finding_keys,
)
from distmed.data.groups import group_lookup
from distmed.data.index import SPLITS, DataIndex, Split, files_fingerprint
from distmed.data.labels import (
    Classes,
    check_class_numbers,
    classes_of,
    require_test_classes_in_pool,
    require_two_classes,
)
from distmed.data.layout import ALL, FolderLayout, read_layout
from distmed.data.manifest import scan_manifest
from distmed.data.objects import is_uri
from distmed.data.sheets import (
    SHEET_SUFFIXES,
    SheetPath,
    cell_text,
    refuse_workbook,
)
from distmed.errors import UserError
from distmed.uris import shown

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
        test = None if index.test is None else index.test.labels
        where = f"data {shown(cfg.manifest or cfg.root or index.name)}"
        require_test_classes_in_pool(index.class_names, index.pool.labels, test, where)
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
    require_two_classes(layout.class_names, str(layout.data_root))
    classes = _folder_classes(layout, cfg)
    group_of = group_lookup(cfg, layout.data_root)
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
        fingerprint=files_fingerprint(pool, test),
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
        require_two_classes(class_names, str(path))
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
