"""User-facing errors: problems with input that the user can fix.

A `UserError` carries one line that names the file, key or value and what to do. Entry
points print it without a traceback (unless `--debug`) and exit non-zero.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, reported as one line; never a bug in distmed itself."""
