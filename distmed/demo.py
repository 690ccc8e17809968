"""The embedded demo data set: SYNTHETIC grey-scale "scans", generated deterministically.

Not medical data. A split folder: `train/` (the cross-validation pool, 100 patients) and
`test/` (25 other patients, held back). Two classes, `lesion` and `normal`: every image has
a smooth textured background and a few large soft blobs; a `lesion` image adds one small
bright spot whose contrast is drawn from a range that starts near zero, so some lesions are
invisible and the task is learnable but not trivially separable. Images come in patients (file names
`pNNN_kK.png`) that share brightness and texture, so `data.group_regex: '^(p\\d+)_'` keeps a
patient's images in one fold, as real data needs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_VERSION = 2
DEMO_PATIENTS = 100
DEMO_TEST_PATIENTS = 25
DEMO_IMAGES_PER_PATIENT = 4
DEMO_SIZE = 64
DEMO_SEED = 20261122
GROUP_REGEX = r"^(p\d+)_"
# A folder being written: .demo-v<version>.tmp<pid of the writer>.
DRAFT_PREFIX = f".demo-v{DEMO_VERSION}.tmp"
OLD_MARKER = "DONE"  # written inside the demo folder by earlier versions


def ensure_demo_folder(root: Path) -> Path:
    """Write the demo image folder under `root` once; later calls reuse it.

    The folder is written under a draft name and renamed into place in one step, so one
    that exists is complete: no marker file is written inside it, where every scan of the
    images listed it as a skipped input. A folder an earlier distmed wrote holds a `DONE`
    marker (`OLD_MARKER`); it is left there, for that version may share the cache, and
    `without_old_marker` keeps it out of the scan's report."""
    folder = root / f"demo-v{DEMO_VERSION}"
    if folder.is_dir():
        return folder
    remove_abandoned_drafts(root)
    tmp = root / f"{DRAFT_PREFIX}{os.getpid()}"
    try:
        write_demo_images(tmp)
        os.replace(tmp, folder)
    except OSError:  # another process finished first; its copy is identical
        if not folder.is_dir():
            raise
    finally:  # whatever happened, our draft is not left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def without_old_marker(ignored: dict[str, str]) -> dict[str, str]:
    """A demo scan's ignored files (relative path -> why) without the old `DONE` marker:
    distmed's own bookkeeping, not an input the user gave and should hear about."""
    return {path: why for path, why in ignored.items() if path != OLD_MARKER}


def remove_abandoned_drafts(root: Path) -> list[Path]:
    """Remove the drafts under `root` whose writer process has ended (a kill mid-write);
    returns them. A running writer's draft is left alone."""
    removed = []
    for draft in root.glob(f"{DRAFT_PREFIX}*"):
        pid = draft.name[len(DRAFT_PREFIX) :]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(draft, ignore_errors=True)
            removed.append(draft)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def write_demo_images(folder: Path) -> None:
    rng = np.random.default_rng(DEMO_SEED)
    for patient in range(DEMO_PATIENTS + DEMO_TEST_PATIENTS):
        label = "lesion" if patient % 2 else "normal"
        split = "train" if patient < DEMO_PATIENTS else "test"
        class_dir = folder / split / label
        class_dir.mkdir(parents=True, exist_ok=True)
        brightness = rng.uniform(0.3, 0.6)
        texture = rng.uniform(0.04, 0.10)
        for k in range(DEMO_IMAGES_PER_PATIENT):
            image = _scan(rng, brightness, texture, lesion=label == "lesion")
            Image.fromarray(image, mode="L").save(class_dir / f"p{patient:03d}_k{k}.png")


def _scan(rng: np.random.Generator, brightness: float, texture: float, lesion: bool) -> np.ndarray:
    size = DEMO_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coarse = rng.normal(0.0, 1.0, (8, 8)).astype(np.float32)
    background = np.asarray(
        Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    )
    image = brightness + texture * background + rng.normal(0, 0.05, (size, size))
    for _ in range(rng.integers(1, 4)):  # large soft structures in both classes
        image += _blob(yy, xx, rng, radius=rng.uniform(7, 14), amplitude=rng.uniform(-0.15, 0.15))
    if lesion:
        image += _blob(yy, xx, rng, radius=rng.uniform(2.5, 4.5), amplitude=rng.uniform(0.1, 0.6))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _blob(
    yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, radius: float, amplitude: float
):
    cy, cx = rng.uniform(12, DEMO_SIZE - 12, size=2)
    return amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
