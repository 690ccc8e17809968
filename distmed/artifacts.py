"""Result files: written atomically (temp file + rename), mirrored to remote storage.

A kill at any moment leaves the previous complete version of a file, never a torn one.
Every JSON file distmed writes goes through `json_text`: strict JSON, `null` for NaN/inf;
every CSV file through `csv_text`: text cells that a spreadsheet would run as a formula are
neutralised. Results bound for a URI (s3://, gs://) are written to a local staging copy
first and uploaded; the copy is removed at exit once the bucket holds all of it, and kept
(and said where) when it does not, so nothing computed is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from distmed.errors import UserError
from distmed.uris import shown

# $TMPDIR/distmed-results/<name>-<digest>: the staging copy of a search whose --storage is a URI.
STAGING_FOLDER = "distmed-results"
# Staging copy -> what it held (file -> size, mtime) when its last upload succeeded.
_uploaded: dict[Path, dict[str, tuple[int, int]]] = {}
_upload_failed: set[Path] = set()
_staged: set[Path] = set()
# The result files a `--resume` reads back from the results folder (`nested.NESTED_FILE`:
# a nested search's finished outer folds; `best_model.pt`: a finished refit, reused). A
# staging copy removed after its upload gets them back from the bucket; nothing else is
# fetched (Tune's own files there are newer than any copy of them would be).
RESUME_FILES = ("nested.json", "best_model.pt")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` only on success.

    The rename is atomic on POSIX filesystems, and the data is fsynced first, so a kill (or
    a crash) at any moment leaves either the old complete file or the new complete one.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_text(payload: Any, *, indent: int | None = 1, sort_keys: bool = False) -> str:
    """`payload` as strict JSON (RFC 8259): the one encoder of every JSON file distmed writes.

    NaN and +-inf (an undefined ROC-AUC, a diverged fold's loss) become `null`: Python's
    `json` would write the bare tokens `NaN`/`Infinity`, which no other JSON reader accepts
    (JavaScript's `JSON.parse`, jq, pandas' strict mode). numpy scalars and arrays become
    plain numbers and lists; tuples become lists; other objects (a `Path`) their `str`.
    `allow_nan=False` makes any non-finite number this conversion missed raise
    `ValueError` here rather than reach a file.
    """
    try:  # most payloads are plain and finite: the C encoder alone, no copy
        return json.dumps(
            payload, indent=indent, sort_keys=sort_keys, allow_nan=False, default=_not_plain
        )
    except (ValueError, TypeError):  # a NaN/inf, a numpy value or a Path somewhere
        pass
    return json.dumps(
        json_safe(payload), indent=indent, sort_keys=sort_keys, allow_nan=False, default=str
    )


def _not_plain(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} needs json_safe")


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None and numpy values as Python ones (recursively)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, bool | str | int) or value is None:
        return value
    item = getattr(value, "item", None)  # a numpy scalar or 0-d array
    if callable(item) and getattr(value, "ndim", 1) == 0:
        value = item()
    elif hasattr(value, "tolist"):  # a numpy array
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def write_json_atomic(path: Path, payload: Any, *, indent: int | None = 1) -> None:
    """Write `payload` to `path` atomically as strict JSON (`json_text`)."""
    write_text_atomic(path, json_text(payload, indent=indent) + "\n")


def write_json_uri(uri: str, payload: Any, *, sort_keys: bool = False) -> None:
    """Write `payload` as strict JSON (`json_text`) to a local path or URI (`write_text_uri`)."""
    write_text_uri(uri, json_text(payload, sort_keys=sort_keys) + "\n")


# First characters that make a spreadsheet (Excel, LibreOffice, Google Sheets) read a cell
# as a formula or command: OWASP, "CSV Injection",
# https://owasp.org/www-community/attacks/CSV_Injection
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# A text cell that is only a number ("-0.5", "+3", "-1e-05") is read as that number, never
# run; it stays as written so numbers written as text remain numbers.
PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """`value` safe to open in a spreadsheet: text starting with `=`, `+`, `-`, `@`, a tab
    or a carriage return gets a leading `'` (OWASP's advice), so `=HYPERLINK(...)` in a
    class or file name shows as text instead of running. Numbers (int, float, a text that
    is only a number) are left as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    if PLAIN_NUMBER.fullmatch(value):
        return value
    return "'" + value


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A CSV file's text (Python's `csv` dialect `excel`), every cell through `csv_cell`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([csv_cell(cell) for cell in header])
    writer.writerows([csv_cell(cell) for cell in row] for row in rows)
    return buffer.getvalue()


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file atomically (`write_text_atomic`) with spreadsheet-safe cells."""
    write_text_atomic(path, csv_text(header, rows))


def write_text_uri(uri: str, text: str) -> None:
    """Write a small text file to a local path or a URI (s3://, gs://) via pyarrow."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def read_text_uri(uri: str) -> str | None:
    """The text of a file at a local path or URI; None when it does not exist."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local results folder to `uri` (s3://, gs://, ...) through pyarrow's filesystems."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
    pyarrow.fs.copy_files(str(local), root, destination_filesystem=filesystem)


def staging_folder(storage: str, name: str) -> Path:
    """The local staging copy of the results bound for URI <storage>/<name>:
    `$TMPDIR/distmed-results/<name>-<digest of the destination>`, so two searches of one name
    in two buckets (or paths) never share a copy, nor a lock (`distmed.runlock` locks it)."""
    digest = hashlib.sha256(_destination(storage, name).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / STAGING_FOLDER / f"{name}-{digest}"


def results_folder(storage: str, name: str) -> Path:
    """The folder our result files for <storage>/<name> are written to, created.

    A local `storage`: that folder itself. A URI: the staging copy (`staging_folder`),
    uploaded by `publish_results` and removed at exit
    when its last upload holds every file as it is then (`finish_staging`); when it is
    made anew, the `RESUME_FILES` the bucket holds are fetched into it.
    """
    if "://" not in storage:
        folder = Path(storage).expanduser().resolve() / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    folder = staging_folder(storage, name)
    if not folder.is_dir():  # a copy kept after a failed upload is newer than the bucket's
        folder.mkdir(parents=True)
        _restore(folder, _destination(storage, name))
    if folder not in _staged:
        _staged.add(folder)
        atexit.register(finish_staging, folder, _destination(storage, name))
    return folder


def publish_results(local: Path, storage: str, name: str) -> None:
    """Upload the staging copy `local` to <storage>/<name> when `storage` is a URI.

    Raises:
        UserError: the upload failed (network, credentials, bucket); names the staging
            copy, which is kept.
    """
    if "://" not in storage:
        return
    uri = _destination(storage, name)
    try:
        upload_dir(local, uri)
    except OSError as exc:  # pyarrow's S3/GCS errors are OSErrors
        _upload_failed.add(local)
        raise UserError(
            f"could not upload the results to {shown(uri)} ({str(exc).splitlines()[0]}); "
            f"they are kept in {local}: copy them there yourself, or fix the storage and "
            "run again with --resume"
        ) from exc
    _upload_failed.discard(local)
    _uploaded[local] = _snapshot(local)


def finish_staging(local: Path, uri: str) -> None:
    """At exit: remove the staging copy `local` if its last upload to `uri` holds every
    file as it is now; else keep it and say where (once: a failed upload said so already).
    """
    if not local.is_dir():
        return
    now = _snapshot(local)
    if not now or _uploaded.get(local) == now:
        shutil.rmtree(local, ignore_errors=True)
        if now:  # the paths printed during the run named this copy: say where the files are
            print(f"results uploaded to {shown(uri)} (local staging copy removed)", flush=True)
        return
    if local not in _upload_failed:
        print(
            f"warning: results not (all) uploaded to {shown(uri)}; they are kept in {local}",
            file=sys.stderr,
        )


def _restore(folder: Path, uri: str) -> None:
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
    for name in RESUME_FILES:
        if filesystem.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.File:
            continue
        with (
            atomic_path(folder / name) as tmp,
            filesystem.open_input_stream(f"{root}/{name}") as stream,
            tmp.open("wb") as out,
        ):
            shutil.copyfileobj(stream, out)
    _uploaded[folder] = _snapshot(folder)  # what it holds now is in the bucket already


def _destination(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: relative path -> (size in bytes, mtime in ns)."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            found[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return found


def delete_checkpoints(run_uri: str) -> None:
    """Remove the `checkpoint_*` folders of a finished Ray Train run (local path or URI).

    A k-fold checkpoint holds k models and optimisers (about 0.6 GB for five ResNet-18s);
    once a trial has its score nothing reads them again.
    """
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(run_uri)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return
    for entry in entries:
        if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(
            "checkpoint_"
        ):
            with contextlib.suppress(OSError):  # already gone, or still being torn down by Ray
                filesystem.delete_dir(entry.path)


def remove_run_without_checkpoints(run_uri: str) -> bool:
    """Remove a Ray Train run folder (local path or URI) that holds no `checkpoint_*` folder.

    Ray Train resumes a run whose name it finds in its storage, from the checkpoints that
    the run's snapshot (`CHECKPOINT_SNAPSHOT`) lists, and its controller fails at start
    (`CheckpointManagerInitializationError`, an `ActorDiedError` in the driver) when they are
    gone, as `delete_checkpoints` leaves a finished run. Such a run has nothing to resume
    from: without its folder the same name starts afresh. Returns whether it was removed.
    """
    import pyarrow.fs

    if latest_checkpoint(run_uri) is not None:
        return False
    filesystem, root = pyarrow.fs.FileSystem.from_uri(run_uri)
    try:
        if filesystem.get_file_info(root).type != pyarrow.fs.FileType.Directory:
            return False
        filesystem.delete_dir(root)
    except OSError:  # not there (any more), or unreadable: Ray Train reports what it finds
        return False
    return True


def latest_checkpoint(run_uri: str) -> str | None:
    """The newest `checkpoint_*` folder of a Ray Train run (local path or URI), if any.

    Ray Train names them `checkpoint_<date>_<time>`, so the newest sorts last.
    """
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(run_uri)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    names = sorted(
        e.base_name
        for e in entries
        if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("checkpoint_")
    )
    return f"{run_uri.rstrip('/')}/{names[-1]}" if names else None


# Ray Train's record of the checkpoints it registered, in every run folder (Ray 2.60).
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_checkpoints(run_dir: Path) -> tuple[set[str], dict[str, Any] | None]:
    """The `checkpoint_*` folder names Ray Train registered in a local run, and the metrics
    of its latest one (None when it registered none, or `run_dir` has no readable snapshot).

    Only a registered checkpoint is resumed from: Ray Train reads its snapshot, not the folders.
    """
    try:
        snapshot = json.loads((run_dir / CHECKPOINT_SNAPSHOT).read_text())
    except (OSError, ValueError):
        return set(), None
    if not isinstance(snapshot, dict):
        return set(), None
    latest = snapshot.get("latest_checkpoint_result")
    results = [*snapshot.get("checkpoint_results", []), latest]
    names = {r["checkpoint_dir_name"] for r in results if isinstance(r, dict)}
    metrics = latest.get("metrics") if isinstance(latest, dict) else None
    return names, metrics if isinstance(metrics, dict) else None


def delete_partial_checkpoints(run_dir: Path) -> list[str]:
    """Remove `checkpoint_*` folders of a local Ray Train run that Ray never registered.

    A write that failed (a full disk, a killed worker) leaves a half-written checkpoint
    folder that no resume reads (Ray resumes from the checkpoints its snapshot lists) and
    that keeps its disk full; a Ctrl-C can leave whole ones that Ray had not registered yet,
    which no resume reads either. Called before a run starts or resumes in `run_dir`, when
    nothing writes there. Returns the names removed.
    """
    if not run_dir.is_dir():
        return []
    registered, _ = registered_checkpoints(run_dir)
    removed = []
    for folder in sorted(run_dir.glob("checkpoint_*")):
        if folder.is_dir() and folder.name not in registered:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse at once when the disk holding `folder` cannot take `need` bytes.

    A run whose first checkpoint cannot be written fails only after its first epoch, and
    Ray Train restarts it first; this says so before anything is trained.

    Raises:
        UserError: less than `need` bytes free; names the folder and both sizes in MB.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(
            f"{what} {folder}: {free / 1e6:.0f} MB free on its disk, but one checkpoint of "
            f"this run needs about {need / 1e6:.0f} MB (every fold's model and optimiser "
            "state); free space there or choose a folder on a bigger disk"
        )


def read_torch_file(path: Path, what: str) -> Any:
    """`torch.load(path, weights_only=True)` on CPU, every failure as one `UserError` line.

    Args:
        path: an existing file.
        what: how messages name it, e.g. "--model" or "model.weights".

    Raises:
        UserError: empty, truncated, random bytes, or pickled objects beyond tensors. The
            message is ours, never torch's: torch's text for these cases advises retrying
            with `weights_only=False`, which would run whatever code the file carries.
    """
    import torch

    if path.stat().st_size == 0:
        raise UserError(f"{what} {path}: empty file (0 bytes); copy or save it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types, by where the bytes stop making sense
        raise UserError(f"{what} {path}: {_torch_load_problem(exc)}") from exc


def _torch_load_problem(exc: Exception) -> str:
    # Matched by name: this package never imports pickle (tests/test_security.py).
    if type(exc).__name__ == "UnpicklingError":
        if "Unsupported global" in str(exc):  # the file names Python classes to rebuild
            return "holds pickled Python objects besides tensors, refused as unsafe to load"
        return "corrupt: not a file written by torch.save"
    return f"truncated or corrupt ({type(exc).__name__} while reading it); copy or save it again"
