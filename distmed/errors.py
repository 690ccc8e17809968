"""User-facing errors: problems with input that the user can fix.

A `UserError` carries one line that names the file, key or value and what to do. Entry
points print it without a traceback (unless `--debug`) and exit non-zero.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Iterable
from typing import Any

# Long enough to recognise a value, short enough that a hostile or huge one (a 1 MB string,
# a list of a million items) never floods the terminal or the log.
SHORT_VALUE_CHARS = 48

# No path, name or URI distmed takes is longer than PATH_MAX (Linux: 4096 bytes), and no
# folder or file name longer than NAME_MAX (255 bytes on ext4, XFS, APFS, NTFS).
MAX_TEXT_BYTES = 4096
MAX_NAME_BYTES = 255
# Terminal colours Ray puts into the messages it forwards.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

# Exit statuses every entry point shares (documented in each one's --help epilog).
EXIT_USER_ERROR = 2  # bad input: one `error:` line, no traceback
EXIT_SOME_UNREADABLE = 3  # predict / evaluate: some files unreadable, the rest scored
EXIT_INTERRUPTED = 130  # a search stopped by Ctrl-C (128 + SIGINT, as a shell reports it)

# reprlib bounds the *work* too, not only the text: it never walks past a few items or
# levels, so quoting a huge nested value costs nothing.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = SHORT_VALUE_CHARS
_REPR.maxother = SHORT_VALUE_CHARS
for _attr in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_REPR, _attr, 6)


class UserError(Exception):
    """Bad input, reported as one line; never a bug in distmed itself."""


class UnreadableImage(ValueError):
    """One file that cannot be used as a 2-D image; the message is the reason, one line.

    Not a `UserError`: the caller names the file and follows `data.skip_invalid` (training) or
    reports it and goes on (predict).
    """


def shorten(value: Any) -> str:
    """`repr(value)` on one line, cut to about `SHORT_VALUE_CHARS` characters (`…` marks a cut)."""
    text = _REPR.repr(value).replace("\n", "\\n")
    if len(text) > SHORT_VALUE_CHARS + 8:
        text = text[:SHORT_VALUE_CHARS] + "…"
    return text


def did_you_mean(unknown: Iterable[str], known: Iterable[str]) -> str:
    """`; did you mean 'X'?` naming the closest known name of each unknown one
    (`difflib.get_close_matches`, ratio >= 0.6, case aside), to end a one-line error; ''
    when no unknown name is close to any known one."""
    by_fold: dict[str, str] = {}
    for name in known:
        by_fold.setdefault(str(name).casefold(), str(name))
    pairs = []
    for name in unknown:
        close = difflib.get_close_matches(str(name).casefold(), list(by_fold), n=1)
        if close:
            pairs.append((str(name), by_fold[close[0]]))
    if not pairs:
        return ""
    if len(pairs) == 1:
        return f"; did you mean {shorten(pairs[0][1])}?"
    shown = ", ".join(f"{shorten(good)} for {shorten(bad)}" for bad, good in pairs[:6])
    return f"; did you mean {shown}?"


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message (its type name when it has none)."""
    text = _ANSI_ESCAPE.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
