"""Why a run or a trial failed, found behind Ray's wrappers, said in one line.

An error reaches distmed wrapped: a worker's exception inside Ray Train's `WorkerGroupError`
(`worker_failures`), a dead worker inside `WorkerHealthCheckFailedError`
(`health_check_failure`), a trial's inside Tune's `RayTaskError` (`cause`, its text
`ray::ImplicitFunc.train() (pid=...)`), or only as Tune's text file when the error could
not be pickled. This module walks all of them and owns the one line a person reads: in
`trials.csv`'s error column, on the console for an errored trial, and as the CLIs' `error:`.

Out of memory is the user's to fix, so it is a `UserError` saying what to lower: Ray's
memory monitor kills the most recently started worker when the node's memory use passes
`RAY_memory_usage_threshold` (0.95 by default); Ray raises `ray.exceptions.OutOfMemoryError`
for it, or, where only text survived, its message ("... killed due to memory pressure").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Iterator

from distmed.errors import MAX_NAME_BYTES, MAX_TEXT_BYTES, UserError, first_line, shorten

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# How Ray's memory monitor words a kill (raylet: "Task was killed due to the node running
# out of memory", "N worker(s) were killed due to the node running low on memory", "Workers
# (tasks / actors) killed due to memory pressure (OOM)"). Not "OOM killer": Ray names the
# kernel's OOM killer as one *possible* cause of every unexplained worker death.
_MEMORY_MONITOR_TEXT = re.compile(
    r"memory pressure|running low on memory|running out of memory|memory usage threshold",
    re.IGNORECASE,
)
_CUDA_MEMORY_TEXT = re.compile(r"CUDA out of memory")
# torch.save's C++ writer reports a failed write (a full disk, mostly) as a RuntimeError
# without an errno: "PytorchStreamWriter failed writing file data/0: file write failed" or
# "[enforce fail at inline_container.cc:...] . unexpected pos 5568 vs 5462".
_TORCH_WRITE_TEXT = re.compile(r"file write failed|unexpected pos \d+ vs \d+|failed writing file")
# Writes the user can fix: a full disk or quota, a folder made read-only or not theirs.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# The attributes where Ray keeps the exception it wrapped (see the module docstring).
_WRAPPED = ("cause", "health_check_failure", "_base_exc", "controller_failure")
CELL_CHARS = 300

NODE_MEMORY = (
    "out of memory: Ray's memory monitor killed a training process (the node's memory use "
    "passed RAY_memory_usage_threshold); lower train.batch_size or data.image_size, or run "
    "fewer at once: --max-concurrent (trials at once) or --workers (workers per trial)"
)
GPU_MEMORY = (
    "out of GPU memory (CUDA out of memory); lower train.batch_size or data.image_size, or "
    "run fewer trials at once on a GPU (--max-concurrent)"
)
HOST_MEMORY = (
    "out of memory (MemoryError); lower train.batch_size or data.image_size, or "
    "run fewer at once: --max-concurrent (trials at once) or --workers (workers per trial)"
)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and every exception Ray keeps inside its wrappers."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        # Ray Train's WorkerGroupError keeps the workers' exceptions here (rank -> error).
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(e for e in failures.values() if isinstance(e, BaseException))
        for name in _WRAPPED:
            # A RayTaskError made an instance of its cause's class forwards unknown
            # attributes to the cause: only real exceptions other than itself count.
            inner = getattr(current, name, None)
            if isinstance(inner, BaseException) and inner is not current:
                stack.append(inner)


def raised_user_error(exc: BaseException) -> UserError | None:
    """The `UserError` distmed raised somewhere behind `exc` (bad input: the same on every
    attempt), or None."""
    for current in exception_chain(exc):
        # Not Tune's RayTaskError(UserError): an instance of UserError too, but its text is
        # Ray's wrapper; its `cause`, later in the chain, is the user's error itself.
        if isinstance(current, UserError) and not _is_ray_error(current):
            return current
    return None


def memory_error(exc: BaseException) -> UserError | None:
    """A `UserError` saying what ran out and what to lower, when `exc` is out of memory."""
    chain = list(exception_chain(exc))
    for current in chain:  # the exception types first: they cannot be mistaken
        if _is_ray_out_of_memory(current):
            return UserError(NODE_MEMORY)
        name = type(current).__name__
        if name == "OutOfMemoryError" and type(current).__module__.startswith("torch"):
            return UserError(GPU_MEMORY)
        if isinstance(current, MemoryError):
            return UserError(HOST_MEMORY)
    for current in chain:
        # Only text survives where Ray could not pickle an error (a dead actor's protobuf
        # context): "Exception ... isn't serializable ... Original exception details: ...".
        if _is_ray_error(current) and _MEMORY_MONITOR_TEXT.search(str(current)):
            return UserError(NODE_MEMORY)
    return None


def _is_ray_out_of_memory(error: BaseException) -> bool:
    ray_exceptions = sys.modules.get("ray.exceptions")  # no Ray imported: no Ray error
    return ray_exceptions is not None and isinstance(error, ray_exceptions.OutOfMemoryError)


def _is_ray_error(error: BaseException) -> bool:
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(error, ray_exceptions.RayError)


def user_error_cause(exc: BaseException, disk_hint: str | None = None) -> UserError | None:
    """The `UserError` behind `exc`, also when Ray wrapped it on its way from a worker.

    Out of memory (Ray's memory monitor, CUDA, `MemoryError`) is one too: what to lower. A
    full disk anywhere in the chain (ENOSPC: --output, --storage, the cache, /tmp) is the
    user's to fix too: one line naming the file that could not be written, or `disk_hint`
    (the run's results folder) where the error names none (pyarrow's, Ray's storage; torch's
    `file write failed`). So is a file or folder this user may not read or write (EACCES,
    EPERM, EROFS): one line naming it.
    """
    raised = raised_user_error(exc)
    if raised is not None:
        return raised
    chain = list(exception_chain(exc))
    memory = memory_error(exc)
    if memory is not None:
        return memory
    for current in chain:
        if isinstance(current, OSError) and current.errno == errno.ENAMETOOLONG:
            return UserError(
                f"{shorten(os.fsdecode(current.filename or '') or 'a path')}: name too long for "
                f"the file system ({MAX_NAME_BYTES} bytes per file or folder name, "
                f"{MAX_TEXT_BYTES} per path); use a shorter --data, --output, --storage or --name"
            )
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            where = current.filename or disk_hint or "a results or cache folder"
            return UserError(
                f"no space left on the device holding {where}; free space there, or point "
                "--output / --storage / data.cache_dir at a disk with room, then run again "
                "(a search: add --resume)"
            )
        if isinstance(current, OSError) and current.errno in NOT_WRITABLE and current.filename:
            return UserError(
                f"{shorten(os.fsdecode(current.filename))}: {os.strerror(current.errno).lower()}; "
                "make it readable and writable for this user, or point --output / --storage / "
                "data.cache_dir elsewhere, then run again (a search: add --resume)"
            )
    for current in chain:
        torch_write = _torch_write_failure(current)
        if torch_write is not None:
            return UserError(
                f"writing a file in {disk_hint or 'a results folder'} failed "
                f"(torch.save: {torch_write}): most often a full disk; free space there, "
                "or point --output / --storage at a disk with room, then run again "
                "(a search: add --resume)"
            )
    return None


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, in a few words, when `exc` (or anything it wraps) is a failed
    write the user can fix: "no space left on the device" (ENOSPC, EDQUOT, torch.save's
    `file write failed` / `unexpected pos`), "permission denied" or "read-only file system"
    (EACCES, EPERM, EROFS); None for any other error."""
    for current in exception_chain(exc):
        if isinstance(current, OSError) and current.errno in NO_SPACE | NOT_WRITABLE:
            return os.strerror(current.errno).lower()
        torch_write = _torch_write_failure(current)
        if torch_write is not None:
            return f"no space left on the device? (torch.save: {torch_write})"
    return None


def failed_path(exc: BaseException) -> str | None:
    """The file a failed write (`write_failure`) names, when its error names one."""
    for current in exception_chain(exc):
        if isinstance(current, OSError) and current.errno in NO_SPACE | NOT_WRITABLE:
            return os.fsdecode(current.filename) if current.filename else None
    return None


def _torch_write_failure(error: BaseException) -> str | None:
    """torch.save's words for a failed write ("unexpected pos 704 vs 598"), if `error` is one."""
    if not isinstance(error, RuntimeError):
        return None
    found = _TORCH_WRITE_TEXT.search(str(error))
    return found.group(0) if found else None


def out_of_space(reason: str) -> bool:
    """`write_failure`'s reason says the disk (or quota) is full, not a permission."""
    return "space" in reason or "quota" in reason


class OneLineWriteFailures(logging.Filter):
    """A log record about a failed write the user can fix (`write_failure`) becomes one
    line without its traceback, the first time per reason; repeats are dropped. Every
    other record passes unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        reason = write_failure(error) if error is not None else None
        if reason is None:
            return True
        if reason in self.said:
            return False
        self.said.add(reason)
        where = os.fsdecode(getattr(error, "filename", None) or "") or "the results folder"
        record.msg = f"{record.getMessage()} {where}: {reason} (repeats not shown)"
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        return True


@contextlib.contextmanager
def one_line_write_failures(names: tuple[str, ...] | None = None) -> Iterator[None]:
    """While open, the loggers `names` (default: Ray's that log a traceback per failed write
    of the experiment folder, `_ray_compat.RAY_WRITE_LOGGERS`) say a failed write once, in
    one line (`OneLineWriteFailures`)."""
    from distmed._ray_compat import RAY_WRITE_LOGGERS

    only_once = OneLineWriteFailures()
    names = RAY_WRITE_LOGGERS if names is None else names
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(only_once)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(only_once)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception along Ray's wrappers: the first worker's own, the trial's
    own inside Tune's `RayTaskError`, the dead actor inside a failed health check."""
    current, seen = exc, set()
    while id(current) not in seen:
        seen.add(id(current))
        failures = getattr(current, "worker_failures", None)
        inner = next(iter(failures.values()), None) if isinstance(failures, dict) else None
        for name in _WRAPPED:
            if isinstance(inner, BaseException):
                break
            inner = getattr(current, name, None)
        if not isinstance(inner, BaseException) or inner is current:
            return current
        current = inner
    return current


def describe(error: BaseException | str) -> str:
    """One line (at most `CELL_CHARS`) saying why a trial or run failed.

    Out of memory: what ran out and what to lower. A `UserError`: its own message. Any
    other error: `<type>: <first line>` of the innermost exception, not Ray's wrapper
    (`RayTaskError(WorkerGroupError): ray::ImplicitFunc.train() (pid=...)`). `error` may be
    the text Tune kept when the exception could not be pickled.
    """
    if isinstance(error, str):
        return _describe_text(error)[:CELL_CHARS]
    cause = user_error_cause(error)
    if cause is not None:
        return first_line(cause)[:CELL_CHARS]
    root = root_cause(error)
    return f"{type(root).__name__}: {first_line(root)}"[:CELL_CHARS]


# Tune's error.txt: "Failure # 1 (occurred at ...)" then the traceback text.
_TRACEBACK_LAST = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", re.MULTILINE)


def _describe_text(text: str) -> str:
    text = ANSI_ESCAPE.sub("", text)
    if _MEMORY_MONITOR_TEXT.search(text):
        return NODE_MEMORY
    if _CUDA_MEMORY_TEXT.search(text):
        return GPU_MEMORY
    found = _TRACEBACK_LAST.findall(text)
    for name, message in found:
        if name == "UserError":
            return message.strip()
    if found:
        name, message = found[-1]
        return f"{name}: {message.strip()}"
    lines = [line for line in text.strip().splitlines() if not line.startswith("Failure #")]
    return lines[0].strip() if lines else "unknown error"
