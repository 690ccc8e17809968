"""One process at a time per results folder: a lock that names its holder and survives a crash.

Two searches with the same `--storage` and `--name` (or two `distmed.train` runs with the
same `--output`) would write the same result files, and the one that finishes last keeps
its own: the other's results are gone. So a run holds a lock on its local results folder
for as long as it writes there, and a second run is refused in one line naming the holder.

The lock is `filelock`'s (an fcntl `flock` on `.<folder>.distmed-lock` beside the folder):
the operating system releases it when its process dies, however it dies, so a crash never
leaves a folder locked on the machine that ran it. Who holds it (host, pid, start time,
command) is in `.<folder>.distmed-lock.json` beside it, removed on a clean exit. When that
file is still there but the lock is free, its holder died: on this host the lock is taken
over with a note; a holder on another host (a folder shared over NFS, where this host cannot
see the other's processes) is reported, and `--force-unlock` takes it over once the user
knows that process has ended.

Remote storage (s3://, gs://) has no such lock: the local staging folder is locked, which
keeps two runs on one machine apart but not two machines writing one bucket
(docs/reliability.md says so).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from distmed.artifacts import write_json_atomic
from distmed.errors import UserError

LOCK_SUFFIX = ".distmed-lock"
HOLDER_SUFFIX = ".distmed-lock.json"
# The holder's command as shown in messages (a command line may be very long).
COMMAND_CHARS = 200


@dataclass(frozen=True)
class Holder:
    """The process holding a results folder."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str

    @staticmethod
    def this_process() -> Holder:
        command = shlex.join(sys.argv).replace("\n", "\\n")  # messages stay one line
        if len(command) > COMMAND_CHARS:
            command = command[:COMMAND_CHARS] + "…"
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return Holder(socket.gethostname(), os.getpid(), started, command)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}: {self.command}"


def lock_paths(folder: Path) -> tuple[Path, Path]:
    """The lock file and the holder file of `folder` (beside it, so neither is a result)."""
    folder = folder.resolve()
    return (
        folder.parent / f".{folder.name}{LOCK_SUFFIX}",
        folder.parent / f".{folder.name}{HOLDER_SUFFIX}",
    )


def read_holder(path: Path) -> Holder | None:
    """The recorded holder; None when there is none (or the file is unreadable)."""
    try:
        raw = json.loads(path.read_text())
        return Holder(str(raw["host"]), int(raw["pid"]), str(raw["started"]), str(raw["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def hold_results_folder(folder: Path, what: str, force: bool = False) -> Iterator[None]:
    """Hold `folder` (a run's local results folder) while the block runs.

    Args:
        folder: the folder; its parent is created if needed, the folder itself is not.
        what: how messages name it, e.g. `--name demo-1` or `--output runs/a`.
        force: take over a lock recorded by a process on another host (`--force-unlock`).

    Raises:
        UserError: a live process holds the folder (named: host, pid, start time, command);
            the lock cannot be made there; or the lock was left by a process on another
            host, whose state this host cannot see, and `force` is not set.
    """
    lock_file, holder_file = lock_paths(folder)
    lock = FileLock(str(lock_file))
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(blocking=False)
    except Timeout:
        holder = read_holder(holder_file)
        who = holder.describe() if holder else f"its holder is not recorded in {holder_file}"
        raise UserError(
            f"{what} is in use by a running process ({who}); wait for it to finish, or "
            "choose another name"
        ) from None
    except OSError as exc:  # after Timeout, which is one too: a place that cannot be written
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"{what}: cannot create the lock {lock_file} ({reason}); choose a results folder "
            "this user can write"
        ) from exc
    try:
        _take_over(read_holder(holder_file), what, holder_file, force)
        write_json_atomic(holder_file, asdict(Holder.this_process()), indent=None)
        try:
            yield
        finally:
            holder_file.unlink(missing_ok=True)
    finally:
        lock.release()


def _take_over(previous: Holder | None, what: str, holder_file: Path, force: bool) -> None:
    """Decide about a holder recorded but no longer holding the lock (its process died)."""
    if previous is None:
        return
    if previous.host != socket.gethostname() and not force:
        raise UserError(
            f"{what} was locked by a process on another host ({previous.describe()}), which "
            f"this host cannot check; if that process has ended, rerun with --force-unlock "
            f"(or delete {holder_file})"
        )
    print(
        f"note: {what}: taking over the lock of a process that no longer holds it "
        f"({previous.describe()})",
        file=sys.stderr,
        flush=True,
    )
