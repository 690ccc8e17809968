"""Spreadsheets saved as text (labels manifests, group sheets): the encoding, the separator and
the wanted columns, read the way Excel and pandas write them (`;` in European locales, tab,
Excel's `sep=;` first line, UTF-8 with or without a byte-order mark, UTF-16, cp1252), or
refused in one line naming the cause; a sheet is a local file or an object in a bucket (its
URI, read through `distmed.data.remote`). Which rows mean what is the caller's business.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from distmed.errors import UserError, shorten

# Separators a labels sheet is written with: comma, the European list separator, tab, pipe.
SEPARATORS = (",", ";", "\t", "|")
SEPARATOR_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
SHEET_SUFFIXES = (".csv", ".tsv", ".txt")
WORKBOOK_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")
MAX_SHEET_BYTES = 1 << 30  # NIH's 112,120-row sheet is 8 MB; a GiB is not a labels sheet
# Excel writes `sep=;` as the first line to name the separator (quoted by some tools).
_SEP_LINE = re.compile(r'^"?sep=(.)"?$')
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")  # C:\ or \\server\share
# A local sheet, or the URI (`s3://bucket/key`) of a sheet in a bucket: a URI stays a str,
# since Path would fold its `//`.
SheetPath = Path | str


@dataclass(frozen=True)
class Sheet:
    """The rows of a sheet, its wanted columns only.

    `rows` holds (row number as a spreadsheet shows it, the header being row 1; {column:
    cell}) for every non-blank row; a wanted optional column the sheet lacks is absent from
    every dict. `dialect` says how it was read, e.g. "';'-separated, cp1252".
    """

    path: SheetPath
    rows: list[tuple[int, dict[str, str]]]
    columns: list[str]
    dialect: str
    header: tuple[str, ...] = ()  # every column the sheet has, used or not


def read_sheet(
    path: SheetPath,
    what: str,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    hint: str = "",
) -> Sheet:
    """Read `path`'s columns `required` + `optional` (names in any case, spaces around).

    Args:
        path: the sheet (`.csv`, `.tsv`, `.txt`), or its object's URI.
        what: how messages name it, e.g. "data.manifest labels.csv".
        required, optional: lower-case column names.
        hint: added to a missing-columns message: another form the sheet may take.

    Raises:
        UserError: no such file; a workbook; neither UTF-8/UTF-16 nor cp1252 text; no
            separator that yields the required columns; two columns of one name (`Label`
            and `label`); a row with more cells than the header; no rows.
    """
    opened = _open(path, what, required, optional, hint)
    separator = opened.separator
    reader = csv.reader(itertools.chain([opened.header_line], opened.stream), delimiter=separator)
    header = next(reader)
    positions = _column_positions(header, what, required, optional, separator, hint)
    rows = _rows(reader, what, len(header), positions)
    if not rows:
        raise UserError(f"{what}: no rows below the header")
    notes = [f"{SEPARATOR_NAMES.get(separator, repr(separator))}-separated"]
    notes += [opened.encoding] if opened.encoding else []
    notes += ["'sep=' line"] if opened.sep_line else []
    return Sheet(
        path=path,
        rows=rows,
        columns=list(positions),
        dialect=", ".join(notes),
        header=tuple(header),
    )


def read_header(path: SheetPath, what: str, required: tuple[str, ...]) -> list[str]:
    """The header's column names as written (spaces around dropped), read as `read_sheet`
    reads them with `required` columns: for a caller that picks its columns from the header
    (a key column named in the config) before reading the rows.

    Raises:
        UserError: as `read_sheet` for the file and its header line.
    """
    opened = _open(path, what, required, ())
    return [cell.strip() for cell in _header_cells(opened.header_line, opened.separator)]


@dataclass(frozen=True)
class _Opened:
    """A decoded sheet at its header line: the rest of the text, and how it was read."""

    stream: io.StringIO  # positioned after the header line
    header_line: str
    separator: str
    sep_line: bool  # Excel's `sep=;` first line named the separator
    encoding: str  # "" for UTF-8


def _open(
    path: SheetPath,
    what: str,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    columns_hint: str = "",
) -> _Opened:
    text, encoding = _decode(path, what)
    # newline="": lines end at \n, \r\n or \r only, and csv sees quoted line breaks intact.
    stream = io.StringIO(text, newline="")
    header_line = stream.readline()
    sep_hint = _SEP_LINE.match(header_line.strip())
    if sep_hint:
        header_line = stream.readline()
    if not header_line.strip():
        raise UserError(
            f"{what}: the first line is empty; it must be the header (columns "
            f"{', '.join(required)})"
        )
    if "\x00" in header_line:
        raise UserError(
            f"{what}: the header holds NUL bytes (UTF-16 without a byte-order mark, or not a "
            "text file?); save the sheet as 'CSV UTF-8'"
        )
    separator = (
        sep_hint.group(1)
        if sep_hint
        else _separator(header_line, what, required, optional, columns_hint)
    )
    return _Opened(stream, header_line, separator, bool(sep_hint), encoding)


def refuse_workbook(path: SheetPath, what: str) -> None:
    """A workbook given as a sheet: one line saying to save it as CSV."""
    suffix = PurePosixPath(path).suffix if isinstance(path, str) else path.suffix
    if suffix.lower() in WORKBOOK_SUFFIXES:
        raise UserError(
            f"{what}: a spreadsheet workbook ({suffix}); save the sheet as 'CSV UTF-8' "
            "(File > Save As) and give the .csv"
        )


def _raw_bytes(path: SheetPath, what: str) -> bytes:
    """The sheet's bytes, at most `MAX_SHEET_BYTES` of them, from disk or from its bucket."""
    refuse_workbook(path, what)
    if isinstance(path, str):
        from distmed.data.remote import read_object  # pyarrow, only for a sheet in a bucket

        return read_object(path, what, MAX_SHEET_BYTES)
    if not path.is_file():
        raise UserError(f"{what}: file not found")
    if path.stat().st_size > MAX_SHEET_BYTES:
        raise UserError(f"{what}: {path.stat().st_size >> 20} MiB is not a labels sheet")
    return path.read_bytes()


def _decode(path: SheetPath, what: str) -> tuple[str, str]:
    """The text and how it was decoded ("" for plain UTF-8, the common case)."""
    raw = _raw_bytes(path, what)
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _decode_as(raw, "utf-16", what), "UTF-16"  # Excel's "Unicode Text"
    if raw.startswith(codecs.BOM_UTF8):
        return _decode_as(raw, "utf-8-sig", what), ""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        pass
    # Excel's plain "CSV" on Windows in Western Europe and the Americas is Windows-1252; five
    # byte values are undefined there, so other binary or legacy text still fails below.
    try:
        return raw.decode("cp1252"), "cp1252 (not UTF-8)"
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what}: neither UTF-8 nor Windows-1252 text (byte 0x{raw[exc.start]:02x} at "
            f"offset {exc.start}); save the sheet as 'CSV UTF-8'"
        ) from exc


def _decode_as(raw: bytes, encoding: str, what: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what}: starts with a {encoding.upper()} byte-order mark but is not {encoding} "
            f"text at offset {exc.start} ({exc.reason}); save the sheet as 'CSV UTF-8'"
        ) from exc


def _separator(
    header_line: str,
    what: str,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    hint: str = "",
) -> str:
    """The separator under which the header holds every required column."""
    for separator in SEPARATORS:
        if set(required) <= set(_names(_header_cells(header_line, separator))):
            return separator
    # No separator fits: say what the header is under the likeliest one, so that the cause
    # (another separator, or columns named otherwise) is plain.
    try:
        likely = csv.Sniffer().sniff(header_line, delimiters="".join(SEPARATORS)).delimiter
    except csv.Error:
        likely = ","
    found = [cell.strip() for cell in _header_cells(header_line, likely)]
    if len(found) == 1:
        raise UserError(
            f"{_needs(what, required, optional)}; its header is one column "
            f"'{cell_text(found[0])}': separate the columns with ',', ';' or tab"
        )
    raise UserError(
        _missing_columns(
            what, required, optional, found, f"{SEPARATOR_NAMES[likely]}-separated", hint
        )
    )


def _needs(what: str, required: tuple[str, ...], optional: tuple[str, ...]) -> str:
    text = f"{what}: needs columns " + " and ".join(f"'{c}'" for c in required)
    if optional:
        text += " (optional " + ", ".join(f"'{c}'" for c in optional) + ")"
    return text


def _missing_columns(
    what: str,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    found: list[str],
    how: str,
    hint: str = "",
) -> str:
    missing = [c for c in required if c not in _names(found)]
    shown = ", ".join(cell_text(name) for name in found[:8]) + (", ..." if len(found) > 8 else "")
    return (
        f"{_needs(what, required, optional)}; missing {', '.join(missing)}; found {shown} ({how})"
        + (f"; {hint}" if hint else "")
    )


def _header_cells(header_line: str, separator: str) -> list[str]:
    return next(csv.reader([header_line], delimiter=separator), [])


def _names(header: list[str]) -> list[str]:
    return [name.strip().casefold() for name in header]


def _column_positions(
    header: list[str],
    what: str,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    separator: str,
    hint: str = "",
) -> dict[str, int]:
    names = _names(header)
    positions: dict[str, int] = {}
    for column in required + optional:
        at = [i for i, name in enumerate(names) if name == column]
        if len(at) > 1:
            both = " and ".join(f"'{cell_text(header[i])}' (column {_letter(i)})" for i in at)
            raise UserError(
                f"{what}: columns {both} both mean '{column}'; keep one (rename or delete "
                "the other)"
            )
        if at:
            positions[column] = at[0]
    if not set(required) <= set(positions):  # after a `sep=` line; else `_separator` saw them
        how = SEPARATOR_NAMES.get(separator, repr(separator))
        raise UserError(
            _missing_columns(
                what,
                required,
                optional,
                [h.strip() for h in header],
                f"{how}-separated, as its 'sep=' line says",
                hint,
            )
        )
    return positions


def _letter(position: int) -> str:
    """Spreadsheet column letters: 0 -> A, 25 -> Z, 26 -> AA."""
    letters = ""
    position += 1
    while position:
        position, rest = divmod(position - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _rows(
    reader, what: str, width: int, positions: dict[str, int]
) -> list[tuple[int, dict[str, str]]]:
    rows: list[tuple[int, dict[str, str]]] = []
    number = 1
    try:
        for values in reader:
            number += 1
            if not any(v.strip() for v in values):
                continue
            if len(values) > width and any(v.strip() for v in values[width:]):
                raise UserError(
                    f"{what} row {number}: {len(values)} cells but the header has {width}; a "
                    f'separator inside a value? Quote that value ("a{reader.dialect.delimiter}b")'
                )
            rows.append(
                (number, {c: values[i] if i < len(values) else "" for c, i in positions.items()})
            )
    except csv.Error as exc:  # e.g. a cell over csv's field size limit (128 KiB)
        raise UserError(f"{what} row {number + 1}: not readable as CSV ({exc})") from exc
    return rows


def file_of_cell(base: Path, text: str, where: str) -> tuple[Path, str]:
    """The file a sheet's path cell names, and the cell as the sample id.

    Relative paths are relative to `base` (absolute ones are kept). A Windows export's
    backslashes (`images\\a.png`) are read as `/` when that file exists and the literal name
    does not (a backslash is a legal file-name character on Linux).

    Raises:
        UserError: a NUL or other control character, a value no file system takes (over-long),
            or no such file; naming `where` (the sheet and row) and the value, shortened.
    """
    if any(ord(c) < 32 for c in text):
        raise UserError(
            f"{where}: the path {shorten(text)} holds a control character (a NUL byte?); "
            "fix the cell"
        )
    written = [text]
    if "\\" in text and os.sep == "/":
        written.append(text.replace("\\", "/"))
    # A sheet typed on a Mac may hold NFD names (o + combining diaeresis) for NFC files, or
    # the reverse; the two look identical, so try both forms after the name as written.
    forms = [(c, unicodedata.normalize("NFC", c), unicodedata.normalize("NFD", c)) for c in written]
    candidates = list(dict.fromkeys(c for three in forms for c in three))
    for candidate in candidates:
        try:
            path = (base / candidate).resolve()
            if path.is_file():
                return path, candidate
        except (OSError, ValueError) as exc:  # ENAMETOOLONG, ELOOP, ...
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UserError(
                f"{where}: the path {shorten(text)} cannot name a file ({reason}); fix the cell"
            ) from exc
    drive = (
        " (a Windows path: give paths relative to the sheet)" if WINDOWS_DRIVE.match(text) else ""
    )
    twin = _unicode_twin(base, candidates[-1])
    raise UserError(
        f"{where}: no such file {cell_text(text)}{drive} (paths are relative to the sheet's "
        f"folder {base}){twin}"
    )


def _unicode_twin(base: Path, text: str) -> str:
    """`; ...` naming the first name on the way to `text` that exists on disk only in
    another Unicode form (a folder NFC, the file NFD), or "" when there is none."""
    folder = base
    for part in Path(text).parts:
        if (folder / part).exists():
            folder = folder / part
            continue
        key = unicodedata.normalize("NFC", part)
        try:
            twins = [e for e in folder.iterdir() if unicodedata.normalize("NFC", e.name) == key]
        except OSError:
            return ""
        if not twins:
            return ""
        return (
            f"; on disk as {shorten(twins[0].name)}, which differs from {shorten(part)} only "
            "in Unicode form (NFC/NFD, mixed); write the name as on disk"
        )
    return ""


def cell_text(text: str) -> str:
    """A cell as messages show it: as written when short and printable, else shortened."""
    return text if text.isprintable() and len(text) <= 120 else shorten(text)
