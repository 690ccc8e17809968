"""Several findings per image (multi-label): which sheet columns are findings, their cells as
raw codes, and the finding names the config refers to.

Two sheet forms, as the public chest X-ray sets write them:

- one column per finding (CheXpert, MIMIC-CXR's CheXpert labeler output, ChestMNIST exported
  to CSV): cells `1` positive, `0` negative, `-1` uncertain, blank not mentioned; `1.0`,
  `0.0`, `-1.0` as pandas writes a column with blanks (CheXpert's own CSVs);
- one column holding each image's set of findings joined by `data.label_delimiter` (NIH
  ChestX-ray14's `Finding Labels`: `Atelectasis|Effusion`, `No Finding`): a finding is 1
  where listed, else 0; findings are the union of the sets, sorted.

Codes stay raw here (1.0, 0.0, -1.0, NaN for blank): the uncertainty and missing-label
policies are the task's (`distmed.task`), so that the inspector counts what the sheet says.
"""

from __future__ import annotations

import math
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distmed.config import DataConfig
from distmed.data.labels import SHOWN, spelling_key
from distmed.data.sheets import SheetPath, cell_text, read_header, read_sheet
from distmed.errors import UserError, did_you_mean, shorten

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
# Columns of a manifest that are never findings: distmed's own, and CheXpert's metadata.
RESERVED_COLUMNS = ("path", "group", "split", "sex", "age", "frontal/lateral", "ap/pa")
SET_COLUMN = "label"  # the delimited-set column unless data.label_columns names another
CELL_RULE = (
    "a finding's cell is 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned)"
)


@dataclass(frozen=True)
class FindingColumns:
    """What a multi-label sheet is read for: the finding columns (as the header writes them,
    and lower-case as `sheets.read_sheet` keys them), or the one delimited-set column."""

    names: list[str]  # finding names, one per column; empty for a delimited set
    keys: list[str]  # read_sheet's lower-case column names to read (findings or the set)
    delimiter: str | None = None


def finding_columns(csv_path: SheetPath, cfg: DataConfig, what: str) -> FindingColumns:
    """The columns of `csv_path` that hold findings, by `data.label_columns`,
    `data.label_delimiter` or (`data.task: multilabel`) every non-reserved column.

    Raises:
        UserError: a named column is not in the header (listing the header), or no column
            is left for findings.
    """
    if cfg.label_delimiter is not None:
        column = cfg.label_columns[0] if cfg.label_columns else SET_COLUMN
        header = read_header(csv_path, what, ("path",))
        _require_columns(header, [column], what, "data.label_columns" if cfg.label_columns else "")
        return FindingColumns([], [column.strip().casefold()], cfg.label_delimiter)
    if cfg.no_finding is not None:
        raise UserError(
            "data.no_finding names the value of a delimited set column meaning no finding; "
            "set data.label_delimiter too, or unset it (one column per finding needs none)"
        )
    header = read_header(csv_path, what, ("path",))
    if cfg.label_columns is not None:
        names = _require_columns(header, cfg.label_columns, what, "data.label_columns")
    else:
        names = [name for name in header if name.casefold() not in RESERVED_COLUMNS and name]
        if not names:
            raise UserError(
                f"{what}: no finding columns beside {', '.join(header)}; add one column per "
                "finding (cells 1/0/-1/blank) or set data.label_delimiter for a set column"
            )
    return FindingColumns(names, [name.casefold() for name in names])


def several_findings_hint(csv_path: SheetPath, what: str) -> str | None:
    """For a sheet refused for lacking its `label` column: the one line saying it looks like
    several findings per image (CheXpert's form: `path` and two or more columns whose cells
    are all 1/0/-1/blank) and the `--set` that reads it so; None when it does not look so.
    Why: the refusal named the columns, not the setting (new-user try with CheXpert)."""
    try:
        header = read_header(csv_path, what, ("path",))
        if SET_COLUMN in (name.casefold() for name in header):
            return None
        names = [name for name in header if name and name.casefold() not in RESERVED_COLUMNS]
        keys = tuple(name.casefold() for name in names)
        rows = read_sheet(csv_path, what, ("path",), keys).rows
    except UserError:  # unreadable as a sheet: the caller's own refusal says why
        return None
    # Columns every cell of which is a code (an all-blank one too: task=multilabel reads it).
    coded = [
        name
        for name, key in zip(names, keys, strict=True)
        if all(_code(row.get(key, "")) is not None for _, row in rows)
    ]
    filled = [n for n in coded if any(row.get(n.casefold(), "").strip() for _, row in rows)]
    if len(filled) < 2:
        return None
    shown = ", ".join(cell_text(name) for name in coded[:4]) + (", ..." if len(coded) > 4 else "")
    if len(coded) == len(names):  # every non-reserved column: what task=multilabel reads
        setting = "--set data.task=multilabel"
    else:  # other columns too (text, ids): name the findings
        setting = "--set " + shlex.quote(f"data.label_columns=[{', '.join(coded)}]")
    return (
        f"{what}: no 'label' column, and its {len(coded)} columns {shown} hold 1/0/-1/blank "
        f"cells: several findings per image; add {setting} (or a 'label' column for one "
        "class per image)"
    )


def _require_columns(header: list[str], wanted: Sequence[str], what: str, key: str) -> list[str]:
    """The header's spelling of each wanted column (matched in any case, spaces around)."""
    spelled = {name.casefold(): name for name in header}
    missing = [name for name in wanted if name.strip().casefold() not in spelled]
    if missing:
        shown = ", ".join(cell_text(name) for name in header[:20])
        more = ", ..." if len(header) > 20 else ""
        by = f" ({key})" if key else " (the set column; name another in data.label_columns)"
        raise UserError(
            f"{what}: no column {', '.join(repr(m) for m in missing)}{by}; the header has "
            f"{shown}{more}"
        )
    return [spelled[name.strip().casefold()] for name in wanted]


def column_codes(
    rows: Sequence[tuple[int, dict[str, str]]], columns: FindingColumns, what: str
) -> np.ndarray:
    """(rows, L) float32 raw codes of one-column-per-finding cells.

    Raises:
        UserError: a cell that is not 1/0/-1 (also 1.0, 0.0, -1.0) or blank: one line
            naming the sheet, row, column and value.
    """
    codes = np.empty((len(rows), len(columns.names)), dtype=np.float32)
    for i, (number, row) in enumerate(rows):
        for j, (name, key) in enumerate(zip(columns.names, columns.keys, strict=True)):
            value = _code(row.get(key, ""))
            if value is None:
                hint = _set_hint([other.get(key, "") for _, other in rows])
                raise UserError(
                    f"{what} row {number}: column {cell_text(name)!r} holds "
                    f"{shorten(row.get(key, '').strip())}; {CELL_RULE}{hint}"
                )
            codes[i, j] = value
    return codes


def _code(cell: str) -> float | None:
    """The raw code of a one-column-per-finding cell (NaN when blank); None when it is none."""
    text = cell.strip()
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value in (POSITIVE, NEGATIVE, UNCERTAIN) else None


def _set_hint(cells: Sequence[str]) -> str:
    """Where a column's cells are sets of findings ('Effusion|Mass', NIH ChestX-ray14's
    'Finding Labels'), the key to set and the delimiter its cells use. The offending cell
    may hold one finding ('No Finding'): the delimiter is looked for in the whole column."""
    seen = Counter(sep for cell in cells for sep in _OTHER_DELIMITERS if sep in cell)
    if not seen:
        return ""
    delimiter = seen.most_common(1)[0][0]
    return (
        f"; its cells are sets of findings joined by {delimiter!r}: set "
        f"data.label_delimiter: {delimiter!r} to read them"
    )


def set_codes(
    rows: Sequence[tuple[int, dict[str, str]]],
    columns: FindingColumns,
    no_finding: str | None,
    what: str,
) -> tuple[list[str], np.ndarray]:
    """The findings (the union of the sets, sorted) and (rows, L) float32 codes of a
    delimited-set column: 1 where listed, 0 where not, NaN for a blank cell.

    Raises:
        UserError: `no_finding` listed with a finding, or no finding in any row.
    """
    assert columns.delimiter is not None
    key = columns.keys[0]
    sets: list[set[str] | None] = []
    for number, row in rows:
        parts = {part.strip() for part in row.get(key, "").split(columns.delimiter)} - {""}
        if not parts:
            sets.append(None)
            continue
        if no_finding is not None and no_finding in parts:
            if len(parts) > 1:
                raise UserError(
                    f"{what} row {number}: {shorten(row[key].strip())} lists "
                    f"{no_finding!r} (data.no_finding) with findings; fix the cell"
                )
            parts = set()
        sets.append(parts)
    names = sorted(set().union(*(s for s in sets if s)))
    _refuse_spellings(names, what, key)
    _refuse_unsplit(names, columns.delimiter, what, key)
    if no_finding is not None and not any(s == set() for s in sets):
        # A typo here would make every "no finding" image a positive of a finding named so.
        raise UserError(
            f"{what}: data.no_finding {no_finding!r} is in no cell of column {key!r}; "
            "write it as the sheet does (e.g. 'No Finding') or leave it out"
        )
    if not names:
        raise UserError(
            f"{what}: column {key!r} names no finding in any row (only blanks"
            f"{' and ' + repr(no_finding) if no_finding else ''}); nothing to learn"
        )
    position = {name: j for j, name in enumerate(names)}
    codes = np.zeros((len(rows), len(names)), dtype=np.float32)
    for i, found in enumerate(sets):
        if found is None:
            codes[i] = np.nan
        for name in found or ():
            codes[i, position[name]] = POSITIVE
    return names, codes


_OTHER_DELIMITERS = ("|", ";", ",")


def _refuse_unsplit(names: list[str], delimiter: str, what: str, column: str) -> None:
    """A finding holding another common delimiter ('Atelectasis|Effusion' split on ',') is
    a set read whole: data.label_delimiter is likely wrong. Say so rather than learn it."""
    for name in names:
        other = next((d for d in _OTHER_DELIMITERS if d != delimiter and d in name), None)
        if other is not None:
            raise UserError(
                f"{what}: column {column!r} split on {delimiter!r} leaves {shorten(name)}, "
                f"which holds {other!r}; set data.label_delimiter: {other!r} if that joins findings"
            )


def _refuse_spellings(names: list[str], what: str, column: str) -> None:
    """Findings that differ only in case, spaces or Unicode form (`Effusion`, `effusion`)
    are one finding written two ways: say so rather than learn two outputs."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(spelling_key(name), []).append(name)
    twins = [spellings for spellings in groups.values() if len(spellings) > 1]
    if twins:
        shown = " = ".join(repr(name) for name in twins[0][:SHOWN])
        raise UserError(
            f"{what}: column {column!r} spells one finding several ways ({shown}"
            f"{f'; {len(twins) - 1} more such' if len(twins) > 1 else ''}); fix the sheet"
        )


# --------------------------------------------------------------------------- .npz arrays


def npz_is_multilabel(labels: dict[str, np.ndarray], what: str, cfg: DataConfig) -> bool:
    """Whether an .npz's label arrays (`train_labels`, ...) hold several findings per image:
    `data.task: multilabel`, or (auto) (N, L > 1) arrays of 0/1 only (ChestMNIST).

    Raises:
        UserError: `data.label_columns`/`label_delimiter` set (they name CSV columns), the
            arrays differ in width, or (auto) L > 1 columns hold values other than 0/1.
    """
    if cfg.label_columns is not None or cfg.label_delimiter is not None:
        raise UserError(
            f"{what}: data.label_columns and data.label_delimiter name columns of a labels "
            "CSV; an .npz's labels are (N, L) arrays: unset them (an (N, L) array of 0/1 is "
            "read as L findings; data.task: multilabel also reads -1 and NaN)"
        )
    widths = {key: int(np.prod(values.shape[1:], dtype=np.int64)) for key, values in labels.items()}
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"{key} {width}" for key, width in widths.items())
        raise UserError(f"{what}: the label arrays differ in columns ({shown}); give equal widths")
    width = next(iter(widths.values()))
    if cfg.task == "multilabel":
        return True
    if width == 1:
        return False
    flat = [values.ravel() for values in labels.values()]
    if all(values.dtype.kind in "biuf" and np.isin(values, (0, 1)).all() for values in flat):
        return True
    raise UserError(
        f"{what}: labels have {width} columns holding values other than 0/1 "
        f"({_bad_values(labels, (0.0, 1.0))}); several findings per image are 0/1 columns "
        "(set data.task: multilabel to read -1 as uncertain and NaN as missing), or give one "
        "label column"
    )


def npz_codes(labels: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Each label array as (N, L) float32 raw codes (1, 0, -1, NaN).

    Raises:
        UserError: text labels, or values other than 1, 0, -1 and NaN (named with counts).
    """
    for key, values in labels.items():
        if values.dtype.kind not in "biuf":
            raise UserError(
                f"{what}: {key} holds {values.dtype} values; findings are coded 1, 0, -1 "
                "(uncertain) or NaN (missing)"
            )
    codes = {
        key: values.reshape(len(values), -1).astype(np.float32) for key, values in labels.items()
    }
    allowed = (POSITIVE, NEGATIVE, UNCERTAIN)
    if not all((np.isin(c, allowed) | np.isnan(c)).all() for c in codes.values()):
        raise UserError(
            f"{what}: finding labels other than 1, 0, -1 (uncertain) and NaN (missing): "
            f"{_bad_values(codes, allowed, nan_ok=True)}; recode those values"
        )
    return codes


def _bad_values(
    labels: dict[str, np.ndarray], allowed: tuple[float, ...], nan_ok: bool = False
) -> str:
    """`train_labels 2 x3, 255 x1; ...`: the values outside `allowed` (and NaN unless
    `nan_ok`), with counts, per array."""
    parts = []
    for key, values in labels.items():
        flat = np.asarray(values, dtype=np.float64).ravel()
        good = np.isin(flat, allowed) | (np.isnan(flat) & nan_ok)
        bad = flat[~good]
        if len(bad):
            found, counts = np.unique(bad, return_counts=True)
            shown = ", ".join(f"{v:g} x{n}" for v, n in list(zip(found, counts, strict=True))[:4])
            parts.append(f"{key} {shown}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- config names


def check_finding_keys(cfg: DataConfig, findings: Sequence[str]) -> None:
    """The finding names in `data.uncertain`, `data.missing` (mappings) and
    `data.score_findings` are findings of the source.

    Raises:
        UserError: one line naming the key, the unknown names and the findings.
    """
    for key, value in (
        ("data.uncertain", cfg.uncertain),
        ("data.missing", cfg.missing),
        ("data.score_findings", cfg.score_findings),
    ):
        if value is None or isinstance(value, str):
            continue
        unknown = [name for name in value if name not in findings]
        if unknown:
            raise UserError(
                f"{key}: {', '.join(repr(n) for n in unknown)} not a finding of this data; "
                f"findings: {', '.join(findings)}{did_you_mean(unknown, findings)}"
            )


def refuse_finding_keys(cfg: DataConfig, source: str) -> None:
    """A source read as one label per image with multi-label-only keys set: one line.

    Raises:
        UserError: `data.uncertain`, `data.missing` or `data.score_findings` set for a
            single-label source.
    """
    set_keys = [
        key
        for key, value, default in (
            ("data.uncertain", cfg.uncertain, "ignore"),
            ("data.missing", cfg.missing, "ignore"),
            ("data.score_findings", cfg.score_findings, None),
            ("data.no_finding", cfg.no_finding, None),
        )
        if value != default
    ]
    if set_keys:
        raise UserError(
            f"{', '.join(set_keys)}: {source} was read as one label per image; these keys "
            "are for several findings per image (data.label_columns, data.label_delimiter or "
            "data.task: multilabel)"
        )
