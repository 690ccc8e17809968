"""Tune state this machine's search wrote: sha256 digests kept locally, checked before restore.

`--resume` hands the storage folder to `Tuner.restore`, and Ray 2.60 unpickles from it:
`tuner.pkl` (pickle), the newest `experiment_state-*.json` (cloudpickle inside JSON), and,
copied to the driver first, `search_gen_state-*.json`, `searcher-state-*.pkl`,
`basic-variant-state-*.json` and `callback-states-*.pkl` (`STATE_PATTERNS`; Ray reads them
by these patterns in `tune/execution/tune_controller.py`, `tune/search/*.py`,
`tune/callback.py`). Unpickling runs whatever code the bytes name, so a storage folder that
someone else can write (a shared bucket or folder) would run their code on whoever resumes.

So every version of those files that Tune writes for a search is hashed as it is written:
`tuner.pkl` right after the Tuner makes it, the others by `RecordTuneState` (a Tune callback
in the driver) from Tune's local staging copy each time Tune saves them, before the upload.
The digests go to a record on this machine (`$DISTMED_STATE_DIR`, default
`~/.local/state/distmed`), never to the storage folder, where whoever could edit the state
could edit its digests too. Before a restore, every state file in the storage folder must
have a digest that this machine recorded for that file name; otherwise the resume is
refused in one line. Recent versions are all kept, so a driver killed while an upload was
under way (the storage holding the previous version) still resumes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import ray.tune

from distmed.artifacts import json_text, write_text_atomic
from distmed.errors import UserError

TUNER_FILE = "tuner.pkl"
STATE_PATTERNS = (
    TUNER_FILE,
    "experiment_state-*.json",
    "search_gen_state-*.json",
    "searcher-state-*.pkl",
    "basic-variant-state-*.json",
    "callback-states-*.pkl",
)
# Versions kept per file name: Tune rewrites each file every few seconds, and an upload
# under way when the driver dies leaves one of the last few in storage.
KEEP_VERSIONS = 32


def state_dir() -> Path:
    """Where this machine keeps its records ($DISTMED_STATE_DIR, else XDG's state home)."""
    if "DISTMED_STATE_DIR" in os.environ:
        return Path(os.environ["DISTMED_STATE_DIR"])
    home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(home) / "distmed"


def record_path(experiment_uri: str) -> Path:
    """The record of one Tune experiment (a local path or URI, as `search.experiment_path`)."""
    key = hashlib.sha256(experiment_uri.rstrip("/").encode()).hexdigest()[:32]
    return state_dir() / "tune-state" / f"{key}.json"


def is_state_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in STATE_PATTERNS)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_state(experiment_uri: str) -> dict[str, str]:
    """{file name: sha256} of the Tune state files in the experiment folder (top level)."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(experiment_uri)
    selector = pyarrow.fs.FileSelector(root, allow_not_found=True)
    found = {}
    for entry in filesystem.get_file_info(selector):
        if entry.type == pyarrow.fs.FileType.File and is_state_file(entry.base_name):
            with filesystem.open_input_stream(entry.path) as stream:
                found[entry.base_name] = sha256_bytes(stream.read())
    return found


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(
            f"--resume: the record of this search's Tune state, {path}, cannot be read "
            f"({type(exc).__name__}), so the state cannot be verified; start fresh with a new "
            "--name (or without --resume)"
        ) from exc
    return record if isinstance(record, dict) else {}


def remember(experiment_uri: str, digests: dict[str, str]) -> None:
    """Add `digests` ({file name: sha256}) to the experiment's record, newest last."""
    if not digests:
        return
    path = record_path(experiment_uri)
    try:
        record = _read_record(path) or {}
    except UserError:
        record = {}  # unreadable: start it again from what Tune writes now
    files: dict[str, list[str]] = record.get("files", {})
    for name, digest in digests.items():
        versions = [d for d in files.get(name, []) if d != digest] + [digest]
        files[name] = versions[-KEEP_VERSIONS:]
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"experiment": experiment_uri, "files": files}
    write_text_atomic(path, json_text(payload, sort_keys=True) + "\n")


def remember_tuner_file(experiment_uri: str) -> None:
    """Record `tuner.pkl`, which a new `Tuner` writes straight to storage when it is made."""
    stored = stored_state(experiment_uri)
    if TUNER_FILE in stored:
        remember(experiment_uri, {TUNER_FILE: stored[TUNER_FILE]})


def check_state(experiment_uri: str) -> None:
    """Refuse to restore Tune state that this machine did not record being written.

    Nothing to check when the folder holds no Tune state (Tune then says there is nothing
    to restore).

    Raises:
        UserError: no record on this machine, an unreadable record, or a state file whose
            digest is not among those recorded for its name (edited, replaced or added).
    """
    stored = stored_state(experiment_uri)
    if not stored:
        return
    path = record_path(experiment_uri)
    record = _read_record(path)
    fresh = "start fresh with a new --name (or without --resume)"
    if record is None:
        raise UserError(
            f"--resume: {experiment_uri}: this machine has no record of the Tune state that "
            f"search wrote (expected {path}), and restoring would unpickle {TUNER_FILE}, "
            f"running any code in it; resume where the search ran, or {fresh}"
        )
    known = record.get("files", {})
    for name in sorted(stored):
        if stored[name] not in known.get(name, []):
            raise UserError(
                f"--resume: {experiment_uri}/{name} is not Tune state this search wrote (its "
                f"sha256 is not in {path}); restoring would unpickle it, running any code in "
                f"it, so it is refused; {fresh}"
            )


class RecordTuneState(ray.tune.Callback):
    """Records the digests of the Tune state files each time Tune saves them (driver side).

    Tune writes them to a local staging folder and uploads that; hashed there, the digests
    are of the bytes Tune wrote, not of what storage holds by then. Pickled into `tuner.pkl`
    with the other callbacks, so a resumed search records its new versions too.
    """

    # (mtime_ns, size) of each staging file last hashed, per process (not pickled state).
    _seen: ClassVar[dict[str, tuple[int, int]]] = {}

    def __init__(self, experiment_uri: str) -> None:
        self.experiment_uri = experiment_uri

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._record(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._record(trials)  # after Tune's final save (ray.tune.tune: checkpoint, cleanup)

    def _record(self, trials: list) -> None:
        if not trials:
            return
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        changed = {}
        for file in staging.glob("*") if staging.is_dir() else []:
            if not (file.is_file() and is_state_file(file.name)):
                continue
            stat = file.stat()
            key, seen = str(file), (stat.st_mtime_ns, stat.st_size)
            if self._seen.get(key) != seen:
                changed[file.name] = sha256_bytes(file.read_bytes())
                self._seen[key] = seen
        remember(self.experiment_uri, changed)
