"""Label values -> class numbers, checked the same way for every source.

Text labels (manifest cells, class folder names): label sets (`Atelectasis|Effusion`) stop
with a pointer to the multi-label keys (`data.label_delimiter`); spellings of one label
that differ only in case, spaces or number format (`Normal`, `normal `, ` NORMAL`; `1`,
`1.0`) stop, or are merged into one class with `data.normalize_labels`; `nan` and, in a
numeric column, negative or fractional values are missing or unknown labels, not classes.
Numeric labels (`.npz` arrays) must be whole class numbers 0..K-1: negative, NaN,
fractional and out-of-range values are named and counted.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from distmed.errors import UserError, shorten

SHOWN = 4  # bad values or spellings named per message; the counts are always complete
SET_SEPARATORS = ("|", ";", ",")
NORMALIZE_HINT = "set data.normalize_labels: true"
_NUMBER = "\x00number "  # marks a number's spelling key; no label typed in a sheet starts so
MULTILABEL = (
    "distmed trains one label per image; these are label sets (multi-label): set "
    "data.label_delimiter: {separator!r} to learn one output per finding (data.no_finding "
    "names the value that means none, e.g. 'No Finding'; give the sheet with a path column), "
    "or give one label per image"
)


@dataclass(frozen=True)
class Classes:
    """Class names (sorted), the class number of each label as written, and the merges.

    `merged` maps a class name to {spelling: rows} for every class that
    `data.normalize_labels` made of more than one spelling (empty otherwise).
    """

    names: list[str]
    number_of: dict[str, int]
    merged: dict[str, dict[str, int]] = field(default_factory=dict)


def classes_of(
    labels: Sequence[str],
    places: Sequence[str],
    what: str,
    normalize: bool,
    fix: str,
    from_sheet: bool = True,
    unit: str = "rows",
) -> Classes:
    """The classes of text labels, one label per image.

    Args:
        labels: each image's label as written.
        places: where each label is written, for messages ("row 5", a folder).
        what: the source as messages name it ("data.manifest labels.csv").
        normalize: `data.normalize_labels`: merge spellings into the most common one.
        fix: what the user edits, e.g. "fix the sheet", "rename the folders".
        from_sheet: labels are cells (a sheet): `nan` and a numeric column's negative or
            fractional values are refused, and a class of one spelling drops the spaces
            around it. Folder names are kept exactly as written.
        unit: what one label counts in messages: "rows" of a sheet, or "images" where a
            row labels several (a sheet keyed by PatientID).

    Raises:
        UserError: a control character (NUL, ESC, a line break, a tab), a missing-value
            marker (`nan`), label sets, a numeric label column with
            negative or fractional values, or spellings of one label without `normalize`.
    """
    counts = Counter(labels)
    first: dict[str, str] = {}
    for label, place in zip(labels, places, strict=True):
        first.setdefault(label, place)
    _refuse_control_characters(counts, first, what, from_sheet, unit)
    _refuse_label_sets(counts, first, what, unit)
    if from_sheet:
        _refuse_missing_markers(counts, first, what, unit)
        _refuse_unknown_numbers(counts, first, what, unit)
    groups: dict[str, list[str]] = {}
    for label in counts:
        groups.setdefault(spelling_key(label), []).append(label)
    variants = [spellings for spellings in groups.values() if len(spellings) > 1]
    if variants and not normalize:
        raise UserError(_variants_message(variants, counts, what, fix))
    number_of: dict[str, int] = {}
    merged: dict[str, dict[str, int]] = {}
    name_of_group = {
        key: _class_name(spellings, counts, from_sheet) for key, spellings in groups.items()
    }
    names = sorted(name_of_group.values())
    position = {name: number for number, name in enumerate(names)}
    for key, spellings in groups.items():
        name = name_of_group[key]
        for spelling in spellings:
            number_of[spelling] = position[name]
        if len(spellings) > 1:
            merged[name] = {spelling: counts[spelling] for spelling in spellings}
    return Classes(names=names, number_of=number_of, merged=merged)


def spelling_key(label: str) -> str:
    """What spellings of one label share: Unicode NFC, spaces collapsed, case folded; numbers
    by value (`1`, `1.0`, `01` -> 1)."""
    text = " ".join(unicodedata.normalize("NFC", label).split()).casefold()
    number = _number(text)
    if number is not None and number.is_integer():
        return f"{_NUMBER}{int(number)}"
    return text


def format_merges(merged: dict[str, dict[str, int]]) -> str:
    """`Normal <- `Normal` 6, `normal ` 3; ...`: what `data.normalize_labels` merged."""
    return "; ".join(
        f"{name} <- " + ", ".join(f"{_quote(s)} {n}" for s, n in spellings.items())
        for name, spellings in merged.items()
    )


def _class_name(spellings: list[str], counts: Counter[str], strip: bool) -> str:
    """The stated rule: the most common spelling (surrounding spaces dropped); on a tie, the
    one first in the source."""
    if len(spellings) == 1:
        return spellings[0].strip() if strip else spellings[0]
    stripped: Counter[str] = Counter()
    for spelling in spellings:  # insertion order = source order: most_common keeps it on ties
        stripped[" ".join(spelling.split())] += counts[spelling]
    return stripped.most_common(1)[0][0]


def _variants_message(variants: list[list[str]], counts: Counter[str], what: str, fix: str) -> str:
    first = variants[0]
    spellings = ", ".join(f"{_quote(s)} ×{counts[s]}" for s in first[:SHOWN])
    more = f" (+{len(first) - SHOWN} more)" if len(first) > SHOWN else ""
    if len({unicodedata.normalize("NFC", s) for s in first}) < len(first):
        how = "Unicode form (NFC/NFD: one typed on a Mac?)"
    elif spelling_key(first[0]).startswith(_NUMBER):
        how = "number format"
    else:
        how = "case/spaces"
    others = ""
    if len(variants) > 1:
        shown = ", ".join(" = ".join(_quote(s) for s in v[:3]) for v in variants[1:SHOWN])
        others = f"; also {len(variants) - 1} more such label(s): {shown}"
    return (
        f"{what}: labels {spellings}{more} differ only in {how}{others}: {fix} or {NORMALIZE_HINT}"
    )


def _refuse_control_characters(
    counts: Counter[str], first: dict[str, str], what: str, from_sheet: bool, unit: str
) -> None:
    """Labels holding a control character (Unicode category Cc: NUL, ESC, \\n, \\r, \\t):
    no class name has one, and printed raw they cut or recolour the line (an ANSI sequence)."""
    bad = [label for label in counts if any(unicodedata.category(c) == "Cc" for c in label)]
    if not bad:
        return
    label = bad[0]
    more = f"; {len(bad) - 1} more such label(s)" if len(bad) > 1 else ""
    count = f"({sum(counts[b] for b in bad)} {unit}{more})"
    if from_sheet:
        raise UserError(
            f"{what} {first[label]}: label {shorten(label)} holds a control character "
            f"{count}; fix the cell"
        )
    raise UserError(f"{what}: {first[label]} holds a control character {count}; rename the folder")


def _refuse_label_sets(counts: Counter[str], first: dict[str, str], what: str, unit: str) -> None:
    """Labels that join other labels seen alone: `A|B` where `A` (or `B`) is a label too."""
    alone = {spelling_key(label) for label in counts}
    for separator in SET_SEPARATORS:
        # A pipe is the multi-label convention (NIH ChestX-ray14, pandas' get_dummies), so
        # one known part is evidence; ',' and ';' also occur inside class names ("Benign,
        # NOS"), so two parts must be labels seen alone.
        needed = 1 if separator == "|" else 2
        joined = [label for label in counts if len(_parts(label, separator)) > 1]
        evidence = [
            label
            for label in joined
            if sum(spelling_key(part) in alone for part in _parts(label, separator)) >= needed
        ]
        if evidence:
            rows = sum(counts[label] for label in joined)
            example = evidence[0]
            raise UserError(
                f"{what}: labels such as {_quote(example)} ({first[example]}) join labels "
                f"seen alone with {separator!r} ({len(joined)} such values, {rows} of "
                f"{sum(counts.values())} {unit}): {MULTILABEL.format(separator=separator)}"
            )


def _refuse_missing_markers(
    counts: Counter[str], first: dict[str, str], what: str, unit: str
) -> None:
    for label in counts:
        if label.strip().casefold() == "nan":
            raise UserError(
                f"{what} {first[label]}: label {_quote(label)} marks a missing value (pandas "
                f"writes NaN so; {counts[label]} {unit}); fill those labels in or drop the "
                "rows"
            )


def _parts(label: str, separator: str) -> list[str]:
    parts = [part.strip() for part in label.split(separator)]
    return parts if len(parts) > 1 and all(parts) else []


def _refuse_unknown_numbers(
    counts: Counter[str], first: dict[str, str], what: str, unit: str
) -> None:
    """A numeric label column (every label a number) holds class numbers: negative (-1:
    CheXpert's 'uncertain'), infinite or fractional values are not classes."""
    numbers = {label: _number(label.strip()) for label in counts}
    if any(value is None for value in numbers.values()):
        return  # text labels: any value may be a class name
    bad = Counter(
        {
            label: counts[label]
            for label, value in numbers.items()
            if value is not None and not _is_class_number(value)
        }
    )
    if bad:
        example = next(iter(bad))
        shown = Counter({_quote(label): n for label, n in bad.items()})
        raise UserError(
            f"{what}: labels {_counted(shown)} are not class numbers (first in "
            f"{first[example]}; {sum(bad.values())} of {sum(counts.values())} {unit}); "
            f"{_advice(bad)}; drop or relabel those rows"
        )


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _is_class_number(value: float) -> bool:
    return math.isfinite(value) and value >= 0 and value.is_integer()


# --------------------------------------------------------------------------- class numbers


def check_class_numbers(
    labels: dict[str, np.ndarray], what: str, num_named: int | None
) -> tuple[dict[str, np.ndarray], int]:
    """Integer labels, one array per key (`train_labels`, ...), as int64; and the largest
    label + 1.

    Labels must be whole numbers 0..K-1, K = `num_named` (`data.class_names`) or, unset,
    the classes 0..K-1 without a gap (a value above a number no image carries is not a
    class: 255 beside 0 and 1 marks something else).

    Raises:
        UserError: text labels; or negative, NaN/inf, fractional or out-of-range values,
            named with counts per key, the share of labels and what to do.
    """
    bad: dict[str, Counter[str]] = {}
    for key, values in labels.items():
        if values.dtype.kind not in "biuf":
            raise UserError(
                f"{what}: {key} holds {values.dtype} values, not class numbers; number the "
                "classes 0, 1, ... (and name them with data.class_names)"
            )
        flat = values.astype(np.float64, copy=False).ravel()
        wrong = ~np.isfinite(flat) | (flat < 0) | (flat != np.floor(flat))
        if wrong.any():
            bad[key] = _value_counts(flat[wrong])
    if bad:
        raise UserError(_class_numbers_message(bad, labels, what, None))
    numbers = {key: values.astype(np.int64).ravel() for key, values in labels.items()}
    present = np.unique(np.concatenate(list(numbers.values())))
    if num_named is not None:
        limit, reason = num_named, f"data.class_names names {num_named} classes (0-{num_named - 1})"
    else:
        limit = _first_absent(present)
        reason = (
            "no image is labelled 0: classes are numbered from 0 (1-based labels? subtract 1)"
            if limit == 0
            else f"label {limit} has no image (classes run 0..K-1 without gaps): renumber, "
            "or name all K classes in data.class_names"
        )
    for key, values in numbers.items():
        if (values >= limit).any():
            bad[key] = _value_counts(values[values >= limit].astype(np.float64))
    if bad:
        raise UserError(_class_numbers_message(bad, labels, what, reason))
    return numbers, int(present[-1]) + 1 if len(present) else 0


def _first_absent(present: np.ndarray) -> int:
    """The smallest class number no image carries (`present`: sorted, unique, >= 0)."""
    expected = np.arange(len(present))
    gaps = np.flatnonzero(present != expected)
    return int(gaps[0]) if len(gaps) else len(present)


def _value_counts(values: np.ndarray) -> Counter[str]:
    # NaN != NaN: count it under one name, not once per row.
    return Counter("NaN" if math.isnan(v) else f"{v:g}" for v in values.tolist())


def _class_numbers_message(
    bad: dict[str, Counter[str]], labels: dict[str, np.ndarray], what: str, reason: str | None
) -> str:
    total = sum(v.size for v in labels.values())
    wrong = sum(sum(c.values()) for c in bad.values())
    where = "; ".join(f"{key} {_counted(counts)}" for key, counts in bad.items())
    merged: Counter[str] = sum(bad.values(), Counter())
    why = reason or _advice(merged)
    return (
        f"{what}: labels that are not class numbers: {where} ({wrong} of {total} labels); "
        f"{why}; drop or relabel those rows"
    )


def _counted(counts: Counter[str]) -> str:
    shown = ", ".join(f"{value} ×{n}" for value, n in counts.most_common(SHOWN))
    return shown + (f" (+{len(counts) - SHOWN} other values)" if len(counts) > SHOWN else "")


def _advice(values: Counter[str]) -> str:
    """What the bad numeric values usually mean."""
    notes = []
    parsed = [_number(v.strip()) for v in values]
    if any(v is not None and v < 0 for v in parsed):
        notes.append(
            "a negative label (-1) usually marks an unknown or uncertain finding "
            "(multi-label: data.label_columns)"
        )
    if any(v is not None and not math.isfinite(v) for v in parsed) or "NaN" in values:
        notes.append("NaN/inf marks a missing label")
    if any(v is not None and math.isfinite(v) and not v.is_integer() for v in parsed):
        notes.append("a fractional label is not a class (soft labels or a measurement?)")
    return "; ".join(notes) or "labels are whole class numbers 0..K-1"


def _quote(label: str) -> str:
    """A label as written, its spaces visible: `normal `; a long or odd one shortened."""
    if label.isprintable() and len(label) <= 40:
        return f"`{label}`"
    return shorten(label)


def require_two_classes(class_names: list[str], where: str) -> None:
    """Refuse a single-label source with fewer than two classes (`where`: the source).

    Raises:
        UserError: one class only, naming `where`.
    """
    if len(class_names) < 2:
        raise UserError(
            f"data.root {where}: only one class ({', '.join(class_names)}); "
            "a classifier needs at least two class folders"
        )


def require_test_classes_in_pool(
    class_names: list[str], pool: np.ndarray, test: np.ndarray | None, where: str
) -> None:
    """Refuse a single-label source whose test split holds a class the cross-validation pool
    (train + val) has no image of: no model can learn it, and its test metrics would score a
    class never trained (a class number shifted between splits, a test-only class). A class
    no split holds (named in `data.class_names` on purpose) is left alone.

    Args:
        pool, test: (N,) class numbers of the pool and of the test split (None: no test).

    Raises:
        UserError: naming the classes, their test images and where (`where`: the source).
    """
    if test is None:
        return
    in_pool = np.bincount(pool, minlength=len(class_names))
    in_test = np.bincount(test, minlength=len(class_names))
    absent = [k for k in range(len(class_names)) if in_pool[k] == 0 and in_test[k] > 0]
    if not absent:
        return
    named = ", ".join(f"{shorten(class_names[k])} ({in_test[k]} in test)" for k in absent[:SHOWN])
    more = f" and {len(absent) - SHOWN} more" if len(absent) > SHOWN else ""
    raise UserError(
        f"{where}: class(es) {named}{more} have no image in train + val ({len(pool)} images), "
        "so no model can learn them; check the labels (a class number shifted between "
        "splits?), or take those images out of the test split"
    )
