"""Image folders -> which split and which class every image file belongs to.

Knows the split names people use, one wrapper level that unzipping adds, the clutter that
operating systems and tools leave (skipped and counted), symbolic links (followed, loops
refused), and stops with one line naming the folder whenever a layout could mean two things.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from distmed.data.decode import FILE_EXTENSIONS, is_image_file
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
    for split, classes in files_by_split.items():
        if sorted(classes) != train_names:
            raise UserError(
                f"data.root {data_root}: class folders of {ordered[split].name}/ "
                f"{sorted(classes)} differ from {ordered['train'].name}/ {train_names}; every "
                "split needs the same classes"
            )
    return FolderLayout(
        root,
        data_root,
        train_names,
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
            if _images([path]):
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
