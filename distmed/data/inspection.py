"""What a source holds, before any training: layout, splits, classes with counts (several
findings per image: positives, negatives, uncertain and missing per finding, and images with
no positive finding), image formats/modes/sizes/bit depths, skipped files, patients per split
and class, and duplicates
(byte- or pixel-identical) within a split, across splits (test leakage) and across classes
(label conflicts). The per-file part is cached per source fingerprint; entry points print it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from distmed.artifacts import write_json_atomic
from distmed.config import DataConfig
from distmed.data.cache import cache_root
from distmed.data.decode import UnreadableImage, describe_file
from distmed.data.index import DataIndex, Split
from distmed.data.labels import format_merges
from distmed.data.objects import readable_file
from distmed.data.settings import DecodeSettings
from distmed.errors import UserError, first_line

log = logging.getLogger(__name__)

# Bump when the per-file part changes, so cached inspections are not reused.
INSPECTION_VERSION = 5  # 5: unreadable reasons whole, the file's path left out
SHOWN = 5  # paths shown per list in the printed summary
# An unreadable file's reason longer than this is cut at a space (a decoder may say a lot).
MAX_REASON_CHARS = 200
KEPT = 50  # duplicate groups kept per kind in the results (the counts are always complete)
DUPLICATE_KINDS = ("within_split", "across_splits", "across_classes")
CODE_NAMES = ("positive", "negative", "uncertain", "missing")  # raw codes 1, 0, -1, blank


def inspect_index(index: DataIndex, cfg: DataConfig) -> dict[str, Any]:
    """The full summary of a scanned source (reads every file once; cached per fingerprint)."""
    per_file = _cached_file_survey(index, cfg)
    return {
        "source": index.name,
        "root": cfg.root,
        "layout": index.layout,
        "classes": index.class_names,
        "multilabel": index.multilabel,
        # Two classes: the scored one (sensitivity, ROC, thresholds); None otherwise.
        "positive_class": _positive_class(index, cfg),
        # data.normalize_labels: class -> {label as written: images}; {} when nothing merged
        "merged_labels": index.merged_labels,
        "splits": _finding_counts(index) if index.multilabel else _split_counts(index),
        "patients": _patients(index),
        "images": per_file["images"],
        "skipped": _listing(index.ignored),
        "unreadable": _listing(per_file["unreadable"]),
        "duplicates": per_file["duplicates"],
    }


def inspect_data(index: DataIndex, cfg: DataConfig) -> dict[str, Any]:
    """`inspect_index`, printing the short summary (and a duplicate warning) as training
    starts; returns the full summary for the results.

    Raises:
        UserError: duplicates across splits or classes with `data.on_duplicates: error`.
    """
    inspection = inspect_index(index, cfg)
    print(format_summary(inspection, short=True), flush=True)
    warning = check_duplicates(inspection, cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return inspection


def duplicate_problem(summary: dict[str, Any]) -> str | None:
    """One line about duplicates across splits or classes, or None when there are none."""
    dup = summary["duplicates"]
    parts = []
    for kind, what in (("across_splits", "split"), ("across_classes", "class")):
        if dup[kind]["count"]:
            example = " = ".join(dup[kind]["groups"][0]["files"][:2])
            parts.append(f"{dup[kind]['count']} in more than one {what} (e.g. {example})")
    if not parts:
        return None
    if any(group.get("same_file_name") for group in dup["across_classes"]["groups"]):
        parts.append(
            "one file copied into several class folders is a label set (multi-label): a "
            "folder per class gives one label per image; for several findings per image give a "
            "labels CSV with one column per finding (data.label_columns) or a set column "
            "(data.label_delimiter)"
        )
    return (
        "identical images: " + "; ".join(parts) + "; remove the copies (python -m distmed.data "
        f"{summary['root']} lists them all)"
    )


def check_duplicates(summary: dict[str, Any], cfg: DataConfig) -> str | None:
    """The duplicate warning to print, or a `UserError` with `data.on_duplicates: error`."""
    problem = duplicate_problem(summary)
    if problem and cfg.on_duplicates == "error":
        raise UserError(f"{problem}, or set data.on_duplicates=warn to train anyway")
    return problem


def format_summary(summary: dict[str, Any], short: bool = False) -> str:
    """The summary as text: a few lines (`short`, printed at the start of a run) or all."""
    lines = [f"data: {summary['source']}: {summary['layout']}"]
    if summary.get("multilabel"):  # absent from summaries written before it existed
        lines.extend(_format_findings(summary, short))
    else:
        lines.extend(_format_classes(summary))
    shared = (summary["patients"] or {}).get("in_pool_and_test")
    if shared and shared["count"]:
        lines.append(
            f"  patients in both the CV pool and test: {shared['count']} "
            f"({', '.join(shared['first'])})"
        )
    images = summary["images"]
    if not short:
        for key in ("formats", "modes", "sizes", "bit_depths"):
            lines.append(f"  {key.replace('_', ' ')}: {_counts(images[key])}")
    for key, title in (("skipped", "skipped"), ("unreadable", "unreadable")):
        listing = summary[key]
        if listing["count"]:
            lines.append(f"  {title}: {listing['count']} ({_counts(listing['reasons'])})")
            if not short:
                lines.extend(f"    {path}" for path in listing["first"])
    dup = summary["duplicates"]
    lines.append(
        "  duplicates: "
        + ", ".join(f"{dup[k]['count']} {k.replace('_', ' ')}" for k in DUPLICATE_KINDS)
    )
    if not short:
        for kind in DUPLICATE_KINDS:  # every group: each one is a possible leak or conflict
            for group in dup[kind]["groups"]:
                lines.append(f"    {kind.replace('_', ' ')}, {group['kind']}:")
                lines.extend(f"      {f}" for f in group["files"])
    return "\n".join(lines)


def _positive_class(index: DataIndex, cfg: DataConfig) -> str | None:
    """The class a binary set scores: `data.positive_class`, else the second class (sorted
    folder or label order) - said on every run, since a silent choice flips what sensitivity,
    the ROC curve and the threshold mean (new-user try: 'normal' scored in abnormal/normal)."""
    names = list(index.class_names)
    if index.multilabel or len(names) != 2:
        return None
    return cfg.positive_class if cfg.positive_class in names else names[1]


def _format_classes(summary: dict[str, Any]) -> list[str]:
    lines = [f"  classes: {', '.join(summary['classes'])}"]
    positive = summary.get("positive_class")  # absent from summaries written before it existed
    if positive is not None:
        lines.append(
            f"  positive class (sensitivity, ROC, threshold): {positive}; "
            "set data.positive_class to score the other"
        )
    if summary.get("merged_labels"):  # absent from summaries written before it existed
        lines.append(
            f"  labels merged (data.normalize_labels): {format_merges(summary['merged_labels'])}"
        )
    for split, info in summary["splits"].items():
        per_class = ", ".join(f"{name} {n}" for name, n in info["per_class"].items())
        lines.append(
            f"  {split}: {info['images']} images ({per_class}){_patients_note(summary, split)}"
        )
    note = _many_classes_note(summary)
    if note:
        lines.append(f"  note: {note}")
    return lines


# More classes than this, with fewer images than MIN_CLASS_IMAGES in the median class, reads
# like a column of ids taken for the labels (a new user's sheet with `group` and `label`
# swapped inspected as 100 classes of 2 images without a word).
MANY_CLASSES = 10
MIN_CLASS_IMAGES = 3


def _many_classes_note(summary: dict[str, Any]) -> str | None:
    totals: dict[str, int] = {}
    for info in summary["splits"].values():
        for name, count in info["per_class"].items():
            totals[name] = totals.get(name, 0) + count
    if len(totals) <= MANY_CLASSES:
        return None
    median = float(np.median(list(totals.values())))
    if median >= MIN_CLASS_IMAGES:
        return None
    return (
        f"{len(totals)} classes with a median of {median:g} image(s) each: is the label the "
        "one you meant? (a patient or image id read as the label makes each one a class; a "
        "sheet's label column is `label`, its patient column `group`)"
    )


def _patients_note(summary: dict[str, Any], split: str) -> str:
    patients = (summary["patients"] or {}).get(split)
    extra = f", {patients} patients" if patients is not None else ""
    # Patients per class (finding: with a positive): what the fold check counts (absent from
    # older summaries).
    by_class = (summary["patients"] or {}).get("per_class", {}).get(split)
    if by_class:
        what = "with a positive: " if summary.get("multilabel") else ""
        extra += f" ({what}{', '.join(f'{name} {n}' for name, n in by_class.items())})"
    return extra


def _format_findings(summary: dict[str, Any], short: bool) -> list[str]:
    """Per split a line of images, and a table: per finding and split the raw codes' counts
    (`short`: one line per finding)."""
    names = summary["classes"]
    lines = [f"  findings ({len(names)}): {', '.join(names)}"]
    for split, info in summary["splits"].items():
        lines.append(
            f"  {split}: {info['images']} images, {info['no_positive']} with no positive "
            f"finding{_patients_note(summary, split)}"
        )
    width = max(len("finding"), *(len(name) for name in names))
    if short:
        lines.append(f"  per finding, {'/'.join(CODE_NAMES)}:")
        for name in names:
            cells = "  ".join(
                f"{split} " + "/".join(str(info["per_finding"][name][c]) for c in CODE_NAMES)
                for split, info in summary["splits"].items()
            )
            lines.append(f"    {name:<{width}}  {cells}")
        return lines
    lines.append(f"  {'finding':<{width}}  split  {'  '.join(f'{c:>9}' for c in CODE_NAMES)}")
    for name in names:
        for split, info in summary["splits"].items():
            counts = info["per_finding"][name]
            cells = "  ".join(f"{counts[c]:>9}" for c in CODE_NAMES)
            lines.append(f"  {name:<{width}}  {split:<5}  {cells}")
    return lines


def _counts(table: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in table.items()) or "-"


def _listing(entries: dict[str, str]) -> dict[str, Any]:
    return {
        "count": len(entries),
        "reasons": dict(Counter(entries.values()).most_common()),
        "first": [f"{path} ({reason})" for path, reason in list(entries.items())[:SHOWN]],
    }


def _samples(index: DataIndex) -> Iterator[tuple[str, Split, int]]:
    for split in (index.pool, index.test):
        if split is None:
            continue
        for position in range(len(split)):
            yield _origin(split, position), split, position


def _origin(split: Split, position: int) -> str:
    return str(split.origins[position]) if split.origins is not None else "all"


def _split_counts(index: DataIndex) -> dict[str, Any]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for origin, split, position in _samples(index):
        counts[origin][index.class_names[int(split.labels[position])]] += 1
    order = [s for s in ("all", "train", "val", "test") if s in counts]
    return {
        s: {
            "images": sum(counts[s].values()),
            "per_class": {name: counts[s][name] for name in index.class_names},
        }
        for s in order
    }


def _finding_counts(index: DataIndex) -> dict[str, Any]:
    """Per split: images, images with no positive finding, and per finding the number of
    positive, negative, uncertain (-1) and missing (blank) labels, as the source codes them
    (before any data.uncertain / data.missing policy)."""
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    for origin, split, position in _samples(index):
        rows[origin].append(np.asarray(split.labels[position], dtype=np.float32))
    order = [s for s in ("all", "train", "val", "test") if s in rows]
    out: dict[str, Any] = {}
    for s in order:
        codes = np.stack(rows[s])
        tallies = {
            "positive": (codes == 1).sum(axis=0),
            "negative": (codes == 0).sum(axis=0),
            "uncertain": (codes == -1).sum(axis=0),
            "missing": np.isnan(codes).sum(axis=0),
        }
        out[s] = {
            "images": len(codes),
            "no_positive": int((~(codes == 1).any(axis=1)).sum()),
            "per_finding": {
                name: {kind: int(tallies[kind][j]) for kind in CODE_NAMES}
                for j, name in enumerate(index.class_names)
            },
        }
    return out


def _positive_findings(index: DataIndex, split: Split, position: int) -> list[str]:
    """The findings coded positive (1) for one image (several findings per image)."""
    codes = np.asarray(split.labels[position])
    return [name for name, code in zip(index.class_names, codes, strict=True) if code == 1]


def _label_of(index: DataIndex, split: Split, position: int) -> str:
    """An image's label as the summary names it: its class, or its positive findings."""
    if index.multilabel:
        return "+".join(_positive_findings(index, split, position)) or "no positive finding"
    return index.class_names[int(split.labels[position])]


def _patients(index: DataIndex) -> dict[str, Any] | None:
    if index.pool.groups is None:
        return None
    by_split: dict[str, set[str]] = defaultdict(set)
    by_class: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for origin, split, position in _samples(index):
        groups = split.groups
        assert groups is not None  # a grouped pool comes with a grouped test split
        by_split[origin].add(str(groups[position]))
        if index.multilabel:
            for name in _positive_findings(index, split, position):
                by_class[origin][name].add(str(groups[position]))
        else:
            name = index.class_names[int(split.labels[position])]
            by_class[origin][name].add(str(groups[position]))
    out: dict[str, Any] = {s: len(g) for s, g in by_split.items()}
    # A patient with images of two classes counts in both (the fold check counts so too).
    out["per_class"] = {
        s: {name: len(by_class[s][name]) for name in index.class_names} for s in by_split
    }
    pool = by_split.get("all", set()) | by_split.get("train", set()) | by_split.get("val", set())
    shared = sorted(pool & by_split.get("test", set()))
    out["in_pool_and_test"] = {"count": len(shared), "first": shared[:SHOWN]}
    return out


# --------------------------------------------------------------------------- per-file survey


def _cached_file_survey(index: DataIndex, cfg: DataConfig) -> dict[str, Any]:
    options = cfg.decode_settings()
    decoding = hashlib.sha256(options.key().encode()).hexdigest()[:8]
    key = f"v{INSPECTION_VERSION}-{index.fingerprint[:24]}-{decoding}"
    path = cache_root(cfg) / "inspect" / f"{index.name}-{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    survey = _file_survey(index, options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, survey, indent=None)
    except OSError as exc:  # only a speed-up; the decoded cache reports a full disk itself
        log.warning("could not cache the data inspection in %s (%s)", path.parent, exc)
    return survey


def _file_survey(index: DataIndex, options: DecodeSettings) -> dict[str, Any]:
    """Formats, modes, sizes, bit depths, unreadable files and duplicate groups."""
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    bits: Counter[str] = Counter()
    unreadable: dict[str, str] = {}
    groups: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    for origin, split, position in _samples(index):
        sample_id = split.ids[position]
        label = _label_of(index, split, position)
        if split.images is not None:
            array = np.ascontiguousarray(split.images[position])
            fmt, mode = "npz array", "L" if array.ndim == 2 else "RGB"
            size, depth, byte_key = f"{array.shape[1]}x{array.shape[0]}", array.itemsize * 8, None
        else:
            described = _describe_sample(split, position, options)
            if isinstance(described, str):
                unreadable[sample_id] = described
                continue
            fmt, mode, size, depth, array, byte_key = described
        formats[fmt] += 1
        modes[mode] += 1
        sizes[size] += 1
        bits[f"{depth}-bit"] += 1
        digest = hashlib.sha256(f"{array.shape}|{array.dtype}|".encode())
        digest.update(array.tobytes())
        groups[digest.hexdigest()].append((origin, sample_id, label, byte_key or ""))
    return {
        "images": {
            "formats": dict(formats.most_common()),
            "modes": dict(modes.most_common()),
            "sizes": _top(sizes),
            "bit_depths": dict(bits.most_common()),
        },
        "unreadable": unreadable,
        "duplicates": _duplicates(groups.values()),
    }


def _describe_sample(
    split: Split, position: int, options: DecodeSettings
) -> tuple[str, str, str, int, np.ndarray, str] | str:
    """(format, mode, size, bit depth, decoded array, sha256 of the bytes) of a file or an
    object in a bucket (read through a temporary local copy with this machine's credentials,
    `objects.readable_file`); or why it cannot be read, on one line."""
    source = split.uris[position] if split.uris is not None else None
    try:
        with readable_file(source or str(_path_of(split, position))) as path:
            try:
                byte_key = hashlib.sha256(path.read_bytes()).hexdigest()
                return (*describe_file(path, options), byte_key)
            except UnreadableImage as exc:  # too large, multi-frame, no finite pixel, ...
                return unreadable_reason(exc, path, named=False)
            except Exception as exc:  # any decoder failure: named, never fatal here
                return unreadable_reason(exc, path)
    except Exception as exc:  # the object itself could not be read (gone, no access)
        return unreadable_reason(exc, Path(source or ""))


def _path_of(split: Split, position: int) -> Path:
    assert split.paths is not None  # a split holds arrays, files or objects
    return split.paths[position]


def unreadable_reason(exc: BaseException, path: Path, named: bool = True) -> str:
    """Why `path` could not be read, on one line: `exc`'s first line (after its type name
    when `named`), the file's own path left out (the listing names the file in full, and
    without it the same fault counts as one reason), and a longer reason cut at a space
    before `MAX_REASON_CHARS` with `…`, never inside a word or a path.
    """
    text = first_line(exc)
    for form in (str(path), str(path.resolve())):  # PIL quotes the path; OSError appends it
        text = re.sub(rf"[:,]?\s*['\"]?{re.escape(form)}['\"]?", "", text)
    text = text.strip(" :,") or "no reason given"
    if named:
        text = f"{type(exc).__name__}: {text}"
    if len(text) > MAX_REASON_CHARS:
        cut = text.rfind(" ", 0, MAX_REASON_CHARS)
        text = (text[:cut] if cut > 0 else text) + " …"
    return text


def _top(counter: Counter, shown: int = 8) -> dict[str, int]:
    top = dict(counter.most_common(shown))
    rest = sum(counter.values()) - sum(top.values())
    return top | ({"other": rest} if rest else {})


def _duplicates(groups) -> dict[str, Any]:
    out: dict[str, Any] = {kind: {"count": 0, "groups": []} for kind in DUPLICATE_KINDS}
    for members in groups:
        if len(members) < 2:
            continue
        byte_keys = {m[3] for m in members}
        entry: dict[str, Any] = {
            "kind": "byte-identical"
            if len(byte_keys) == 1 and "" not in byte_keys
            else "same pixels",
            "files": [f"{sample_id} ({label})" for _, sample_id, label, _ in members],
        }
        kinds = []
        if len({m[2] for m in members}) > 1:
            kinds.append("across_classes")
            # `Effusion/x.png` = `Atelectasis/x.png`: one image filed under each of its labels
            classes_of_name: dict[str, set[str]] = defaultdict(set)
            for _, sample_id, label, _ in members:
                classes_of_name[PurePosixPath(sample_id).name].add(label)
            entry["same_file_name"] = any(len(c) > 1 for c in classes_of_name.values())
        if len({m[0] for m in members}) > 1:
            kinds.append("across_splits")
        for kind in kinds or ["within_split"]:
            out[kind]["count"] += len(members)
            if len(out[kind]["groups"]) < KEPT:
                out[kind]["groups"].append(entry)
    return out
