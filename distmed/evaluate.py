"""`python -m distmed.evaluate --model best_model.pt --data PATH`: external validation.

Scores a trained model on another site's labelled images without training: any source
distmed reads, decoded exactly as training decoded (the model's own `data` settings, through
the same decoded-image cache), classes matched to the model's by name (`--class-map` renames
them). Writes DIR/evaluation.json and DIR/evaluation.html with the metrics and 95% bootstrap
intervals at argmax and at the binary operating threshold, and the report's figures
(`distmed.scorecard`: PNG 300 dpi with SVG and PDF copies in DIR/figures/).

A multi-label model (several findings per image) is scored on a labels sheet with a column
per finding (or the delimited set column it was trained on, or an .npz): findings matched to
the model's by NAME, in any column order (`--class-map DATA=MODEL` renames a finding), the
model's findings the data lacks named in one note, the data's other columns ignored with a
note, the model's uncertain/missing policy applied per finding, and each finding scored
with bootstrap intervals at its saved threshold (`distmed.scorecard.finding_table`).

Exit status: 0 every image scored; 3 some files unreadable under data.skip_invalid (named,
the rest scored); 2 bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distmed import __version__
from distmed.artifacts import write_json_atomic, write_text_atomic
from distmed.cli import (
    MAX_RESAMPLES,
    add_debug_option,
    add_model_option,
    add_threshold_option,
    bounded,
    checked_threshold,
    model_path,
    run_command,
)
from distmed.data.sheets import read_header
from distmed.errors import EXIT_SOME_UNREADABLE, UserError, did_you_mean

if TYPE_CHECKING:  # for annotations; imported where used, after parsing
    import numpy as np
    import torch

    from distmed.config import DataConfig
    from distmed.data import DataIndex, Split
    from distmed.inference import Ensemble
    from distmed.savedmodel import SavedModel
    from distmed.scorecard import Scorecard, Scores

log = logging.getLogger(__name__)
EVALUATION_JSON = "evaluation.json"
EVALUATION_HTML = "evaluation.html"
FIGURES = "figures"
BATCH_SIZE = 64
MIN_RESAMPLES = 10

EPILOG = """exit status: 0 every image scored; 3 some files unreadable (data.skip_invalid or
--skip-invalid: named on stderr and in evaluation.json, the rest scored); 2 bad input.

examples:
  python -m distmed.evaluate --model runs/demo/best_model.pt --data site_b/
  python -m distmed.evaluate --model best_model.pt --data site_b.csv --split all \\
      --class-map pneumonia=PNEUMONIA --class-map normal=NORMAL --output eval-site-b
"""


@dataclass(frozen=True)
class OperatingThreshold:
    """The binary decision threshold used, and where it came from."""

    value: float
    source: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.evaluate",
        description="Score a saved best_model.pt on another site's labelled images (no "
        "training): metrics with 95% bootstrap intervals, ROC/PR/calibration/confusion "
        "figures, in DIR/evaluation.json and DIR/evaluation.html.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="labelled source: class folders, split folders, labels .csv, MedMNIST .npz",
    )
    parser.add_argument(
        "--split",
        choices=("test", "all"),
        help="test: the source's test split; all: every labelled image (default: the test "
        "split when the source has one, else all)",
    )
    parser.add_argument(
        "--class-map",
        action="append",
        default=[],
        metavar="DATA=MODEL",
        help="rename a class of the data to the model's name for it (repeatable), "
        "e.g. --class-map pneumonia=PNEUMONIA",
    )
    parser.add_argument(
        "--output", help="folder for the results (default: evaluation-<data> beside the model)"
    )
    parser.add_argument(
        "--bootstrap",
        type=bounded(int, 10, MAX_RESAMPLES, "1000"),
        default=1000,
        help=f"bootstrap resamples for CIs, 10 to {MAX_RESAMPLES} (default 1000)",
    )
    add_threshold_option(parser)
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave unreadable files out (named; exit 3) even if training stopped on them",
    )
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    from distmed.data import scan_source
    from distmed.inference import tta_of
    from distmed.scorecard import Scores, score, scorecard_json
    from distmed.tta import describe as describe_tta

    path = model_path(args)
    if args.bootstrap < MIN_RESAMPLES:
        raise UserError(f"--bootstrap {args.bootstrap}: use at least 10 resamples, e.g. 1000")
    class_map = parse_class_map(args.class_map)
    model, saved = load_for_evaluation(path, args.ensemble)
    if saved.multilabel is not None:
        return _run_findings(args, path, model, saved, class_map)
    threshold = operating_threshold(args.threshold, saved)
    cfg = evaluation_data_config(saved.config.data, args.data, args.skip_invalid)
    source = scan_source(cfg)
    split = choose_split(source, args.split)
    selected = scored_index(source, split)
    lookup = class_lookup(selected.class_names, saved.class_names, class_map, args.data)
    kept, probs, device = _predict_readable(args, cfg, selected, split, model, saved)
    scores = Scores(lookup[kept.pool.labels], probs, saved.task)
    card = score(scores, threshold.value if threshold else None, args.bootstrap)
    output = Path(args.output) if args.output else default_output(path, source.name, args.ensemble)
    record = evaluation_record(path, args.data, source, split, scores, class_map, threshold)
    temperature = saved.calibration.temperature if saved.calibration else None
    own_data = is_training_data(args.data, saved.config.data.root)
    record.update(ensemble=args.ensemble, temperature=temperature, training_data=own_data)
    record.update(tta=describe_tta(tta_of(model)))
    record.update(scorecard_json(card), skipped_files=kept.skipped)
    write_evaluation(output, record, scores, card)
    for sample_id, reason in kept.skipped.items():
        print(f"unreadable: {sample_id} ({reason})", file=sys.stderr)
    notes = absent_notes(scores) + ([TRAINING_DATA_NOTE] if own_data else [])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary_line(record, card, device) + f" -> {output / EVALUATION_HTML}")
    return EXIT_SOME_UNREADABLE if kept.skipped else 0


def _predict_readable(
    args: argparse.Namespace,
    cfg: Any,
    selected: Any,
    split: str,
    model: torch.nn.Module,
    saved: SavedModel,
) -> tuple[Any, np.ndarray, torch.device]:
    """Decode the selected split (every decode problem before any scoring), drop the
    unreadable images and predict the rest: (kept index, probabilities, device).

    Raises:
        UserError: no image of the split is readable.
    """
    from distmed.data import build_cache, drop_samples
    from distmed.inference import choose_device, predict_cached

    cache = build_cache(selected, cfg)
    kept = drop_samples(selected, cache.skipped)
    if len(kept.pool) == 0:
        raise UserError(f"--data {args.data}: no readable image in the {split} split")
    device = choose_device(args.cpu)
    _, probs = predict_cached(model, cache.pool_path, saved.task, device, batch_size=BATCH_SIZE)
    return kept, probs, device


def _run_findings(
    args: argparse.Namespace,
    path: Path,
    model: torch.nn.Module,
    saved: SavedModel,
    class_map: dict[str, str],
) -> int:
    """`_run` for a multi-label model: findings matched by name, scored per finding."""
    import numpy as np

    from distmed.data import scan_source
    from distmed.inference import tta_of
    from distmed.scorecard import score, scorecard_json
    from distmed.tta import describe as describe_tta

    threshold = finding_threshold(args.threshold, saved)
    training = evaluation_data_config(saved.config.data, args.data, args.skip_invalid)
    cfg, ignored = findings_data_config(training, saved.class_names, class_map, args.data)
    source = scan_source(cfg)
    split = choose_split(source, args.split)
    selected = scored_index(source, split)
    match = match_findings(selected.class_names, saved.class_names, class_map, args.data)
    kept, probs, device = _predict_readable(args, cfg, selected, split, model, saved)
    scores = finding_scores(saved, match, np.asarray(kept.pool.labels), probs)
    cuts = None if threshold is None else threshold.values[match.model_columns]
    card = score(scores, cuts, args.bootstrap)
    output = Path(args.output) if args.output else default_output(path, source.name, args.ensemble)
    record = findings_record(path, args.data, source, split, scores, class_map, threshold)
    own_data = is_training_data(args.data, saved.config.data.root)
    record.update(ensemble=args.ensemble, temperature=None, training_data=own_data)
    record.update(tta=describe_tta(tta_of(model)))
    if saved.finding_calibration is not None:
        record["temperature"] = saved.finding_calibration.temperatures.tolist()
    record.update(missing_findings=match.missing, ignored_columns=ignored + match.extra)
    record.update(scorecard_json(card), skipped_files=kept.skipped)
    write_evaluation(output, record, scores, card)
    for sample_id, reason in kept.skipped.items():
        print(f"unreadable: {sample_id} ({reason})", file=sys.stderr)
    notes = finding_notes(match, ignored, scores) + ([TRAINING_DATA_NOTE] if own_data else [])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary_line(record, card, device) + f" -> {output / EVALUATION_HTML}")
    return EXIT_SOME_UNREADABLE if kept.skipped else 0


TRAINING_DATA_NOTE = (
    "--data is the data the model was trained on (its data.root): these scores are not an "
    "external validation"
)


def default_output(model: Path, data_name: str, ensemble: Ensemble) -> Path:
    """`evaluation-<data>` beside the model (`-folds` for the fold ensemble: one per model).

    The data's name is cut to 100 characters: a folder named up to the file system's limit
    must not make a folder name past it (found only after the scoring).
    """
    return model.parent / f"evaluation-{data_name[:100]}{'-folds' if ensemble == 'folds' else ''}"


def is_training_data(data: str, training_root: str | None) -> bool:
    """Whether `--data` is the folder or file the model was trained on, a folder inside it
    (its train/ split) or one holding it (links resolved). A copy elsewhere is not seen."""
    if training_root is None or "://" in data or data == "demo" or data.startswith("medmnist:"):
        return False
    given = Path(data).expanduser().resolve()
    trained = Path(training_root).expanduser().resolve()
    return given.is_relative_to(trained) or trained.is_relative_to(given)


def load_for_evaluation(path: Path, ensemble: Ensemble) -> tuple[torch.nn.Module, SavedModel]:
    """The model that scores the images, as `distmed.predict` scores (`--ensemble`, the
    saved temperature when there is one), in eval mode, and its saved fields."""
    from distmed.inference import load_inference_model

    return load_inference_model(path, ensemble)


# --------------------------------------------------------------------------- options


def parse_class_map(items: Sequence[str]) -> dict[str, str]:
    """`--class-map DATA=MODEL` items as {data class: model class}.

    Raises:
        UserError: an item without `=`, an empty side, or a data class given twice.
    """
    mapping: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise UserError(
                f"--class-map {item}: expected DATA=MODEL (a class of the data, then the "
                "model's name for it), e.g. --class-map pneumonia=PNEUMONIA"
            )
        if old in mapping:
            raise UserError(f"--class-map {item}: {old!r} is mapped twice; give it once")
        mapping[old] = new
    return mapping


def operating_threshold(override: float | None, saved: SavedModel) -> OperatingThreshold | None:
    """`--threshold`, else the binary threshold saved in the model, else None (argmax only).

    Raises:
        UserError: `--threshold` outside [0, 1], or given for a multi-class model.
    """
    given = checked_threshold(override, saved.binary)
    if given is not None:
        return OperatingThreshold(given, "--threshold")
    if saved.threshold is None:
        return None
    t = saved.threshold
    return OperatingThreshold(
        t.value, f"saved in the model ({t.method}, chosen on {t.chosen_on}, {t.num_samples} images)"
    )


@dataclass(frozen=True)
class FindingThreshold:
    """A multi-label model's (L,) decision thresholds, and where they came from."""

    values: np.ndarray
    source: str


def finding_threshold(override: float | None, saved: SavedModel) -> FindingThreshold | None:
    """`--threshold` for every finding, else the per-finding thresholds saved in the model,
    else None (decisions at 0.5 only).

    Raises:
        UserError: `--threshold` outside [0, 1].
    """
    from distmed.inference import saved_finding_thresholds
    from distmed.task.multilabel import MultilabelTask

    task = saved.task
    assert isinstance(task, MultilabelTask)
    given = checked_threshold(override, True)
    if given is not None:
        return FindingThreshold(task.thresholds_of(given), "--threshold, for every finding")
    values = saved_finding_thresholds(saved)
    if values is None or saved.finding_thresholds is None:
        return None
    t = saved.finding_thresholds
    return FindingThreshold(
        values, f"saved in the model per finding ({t.method}, chosen on {t.chosen_on})"
    )


# --------------------------------------------------------------------------- data


def evaluation_data_config(training: DataConfig, data: str, skip_invalid: bool) -> DataConfig:
    """Training's data section with `root` replaced by `data`: the same decoding (intensity,
    window, resize mode, image size, max_pixels) and the same cache, for another source.

    Settings that belong to the training source or machine are dropped: its manifest and
    patient grouping (nothing is split into folds here), its cache folder and decoding
    processes (this machine's defaults), and its class names unless `data` is an .npz
    (whose labels are numbers those names belong to).
    """
    from distmed.config import DataConfig

    npz = data.startswith("medmnist:") or data.lower().endswith(".npz")
    update: dict[str, Any] = {
        "root": data,
        "manifest": None,
        "group_csv": None,
        "group_regex": None,
        "group_from": None,
        "cache_dir": None,
        "decode_workers": None,
        "class_names": training.class_names if npz else None,
        "skip_invalid": training.skip_invalid or skip_invalid,
    }
    return DataConfig.model_validate({**training.model_dump(), **update})


SHEET_SUFFIXES = (".csv", ".tsv", ".txt")


def findings_data_config(
    cfg: DataConfig, findings: Sequence[str], class_map: dict[str, str], data: str
) -> tuple[DataConfig, list[str]]:
    """The evaluation config of a multi-label model, and the sheet columns it ignores.

    The training run's finding keys name the training data's findings, so they are reset:
    the policies are the saved model's, applied after matching (`finding_scores`). A sheet
    with a column per finding is read for the columns that are (after `class_map`) the
    model's findings, in the sheet's order; its other non-reserved columns are returned to
    be named in a note. A delimited set column (`data.label_delimiter`) and an .npz are read
    as in training.

    Raises:
        UserError: a `--class-map` key that is no column of the sheet, or no column that is
            a finding of the model; one line listing both.
    """
    from distmed.config import DataConfig
    from distmed.data.findings import RESERVED_COLUMNS

    update: dict[str, Any] = {
        "task": "multilabel",
        "uncertain": "ignore",
        "missing": "ignore",
        "score_findings": None,
    }
    ignored: list[str] = []
    sheet = Path(data).expanduser()
    if cfg.label_delimiter is None and sheet.suffix.lower() in SHEET_SUFFIXES:
        header = read_header(sheet, f"--data {data}", ("path",))
        columns = [c for c in header if c and c.casefold() not in RESERVED_COLUMNS]
        _check_map_keys(class_map, columns, data, "columns")
        matched = [c for c in columns if class_map.get(c, c) in findings]
        if not matched:
            raise UserError(
                f"--data {data}: no column is a finding of the model (columns "
                f"{', '.join(columns) or 'none'}; the model's findings {', '.join(findings)}); "
                "rename with --class-map DATA=MODEL"
            )
        ignored = [c for c in columns if c not in matched]
        update["label_columns"] = matched
    return DataConfig.model_validate({**cfg.model_dump(), **update}), ignored


def _check_map_keys(class_map: dict[str, str], names: Sequence[str], data: str, what: str) -> None:
    for old in class_map:
        if old not in names:
            raise UserError(
                f"--class-map {old}={class_map[old]}: --data {data} has no finding {old!r}; "
                f"its {what}: {', '.join(names)}{did_you_mean([old], names)}"
            )


@dataclass(frozen=True)
class FindingMatch:
    """The data's findings matched to the model's by name: pairs of column numbers (in the
    model's order), the model's findings the data lacks, the data's the model lacks."""

    data_columns: list[int]
    model_columns: list[int]
    missing: list[str]
    extra: list[str]


def match_findings(
    data_findings: Sequence[str],
    model_findings: Sequence[str],
    class_map: dict[str, str],
    data: str,
) -> FindingMatch:
    """Each model finding's column in the data, by name after `class_map` (never by position).

    Raises:
        UserError: a `--class-map` key the data lacks, two data findings renamed to one,
            or no finding in common.
    """
    _check_map_keys(class_map, data_findings, data, "findings")
    renamed = [class_map.get(name, name) for name in data_findings]
    doubled = sorted({n for n in renamed if renamed.count(n) > 1 and n in model_findings})
    if doubled:
        raise UserError(
            f"--data {data}: two findings of the data are the model's {doubled[0]!r} (after "
            "--class-map); map one data finding to each model finding"
        )
    pairs = sorted(
        (model_findings.index(n), j) for j, n in enumerate(renamed) if n in model_findings
    )
    if not pairs:
        raise UserError(
            f"--data {data}: none of its findings {', '.join(data_findings)} is a finding of "
            f"the model ({', '.join(model_findings)}); rename with --class-map DATA=MODEL"
            f"{did_you_mean(renamed, model_findings)}"
        )
    return FindingMatch(
        data_columns=[j for _, j in pairs],
        model_columns=[m for m, _ in pairs],
        missing=[n for m, n in enumerate(model_findings) if m not in {p for p, _ in pairs}],
        extra=[d for d, n in zip(data_findings, renamed, strict=True) if n not in model_findings],
    )


def finding_scores(
    saved: SavedModel, match: FindingMatch, raw: np.ndarray, probs: np.ndarray
) -> Scores:
    """The matched findings' targets (the model's uncertain/missing policy per finding
    applied to the data's raw codes) and probabilities, under the model's task restricted to
    them; the mean covers the model's scored findings with known positives and negatives."""
    import numpy as np

    from distmed.scorecard import Scores, scorable_here, unscored_reasons
    from distmed.task.multilabel import MultilabelTask

    task = saved.task
    assert isinstance(task, MultilabelTask)
    cols = match.model_columns
    names = tuple(task.class_names[m] for m in cols)
    sub = MultilabelTask(
        names,
        tuple(task.uncertain[m] for m in cols),
        tuple(task.missing[m] for m in cols),
        tuple(n for n in task.scored if n in names) or names,
    )
    targets = sub.targets(np.asarray(raw, dtype=np.float32)[:, match.data_columns])
    data = saved.config.data
    why = unscored_reasons(task, data.score_findings, saved.config.cv.folds)
    return scorable_here(Scores(targets, np.asarray(probs)[:, cols], sub), why)


def choose_split(index: DataIndex, asked: str | None) -> str:
    """`asked`, or `test` when the source has a test split and `all` when it has none.

    Raises:
        UserError: `--split test` on a source without a test split.
    """
    if asked == "test" and index.test is None:
        raise UserError(
            f"--data {index.name}: no test split ({index.layout or 'no split folders'}); "
            "use --split all to score every image"
        )
    return asked or ("test" if index.test is not None else "all")


def scored_index(index: DataIndex, split: str) -> DataIndex:
    """The index holding only the images to score, as its pool (no test split).

    Its fingerprint is the source's with the split added, so its cache never collides with
    the cache of the whole source (whose pool holds other images).
    """
    parts = [index.test] if split == "test" else [index.pool, index.test]
    chosen = concat_splits([p for p in parts if p is not None])
    fingerprint = hashlib.sha256(f"{index.fingerprint}|evaluate:{split}".encode()).hexdigest()
    return replace(index, pool=chosen, test=None, fingerprint=fingerprint)


def concat_splits(splits: Sequence[Split]) -> Split:
    """One split of the samples of `splits`, in order (all files, all arrays, or all objects
    in a bucket with their versions)."""
    import numpy as np

    from distmed.data import Split

    first = splits[0]
    if len(splits) == 1:
        return first
    paths = [p for s in splits for p in s.paths or []] if first.paths is not None else None
    images = np.concatenate([s.images for s in splits]) if first.images is not None else None
    origins = [s.origins for s in splits if s.origins is not None]
    objects = first.uris is not None
    return Split(
        ids=[i for s in splits for i in s.ids],
        labels=np.concatenate([s.labels for s in splits]),
        paths=paths,
        images=images,
        origins=np.concatenate(origins) if len(origins) == len(splits) else None,
        uris=[u for s in splits for u in s.uris or []] if objects else None,
        versions=[v for s in splits for v in s.versions or []] if objects else None,
    )


def class_lookup(
    data_classes: list[str], model_classes: list[str], class_map: dict[str, str], data: str
) -> np.ndarray:
    """Model class index of each data class, matched by name after `class_map` (never by
    position): (len(data_classes),) ints.

    Several data classes may map to one model class; a model class the data lacks is
    allowed (stated in the results).

    Raises:
        UserError: a `--class-map` key that is no class of the data, or a data class the
            model does not know; one line listing both sets of names.
    """
    import numpy as np

    for old in class_map:
        if old not in data_classes:
            raise UserError(
                f"--class-map {old}={class_map[old]}: --data {data} has no class {old!r}; "
                f"its classes: {', '.join(data_classes)}{did_you_mean([old], data_classes)}"
            )
    renamed = [class_map.get(name, name) for name in data_classes]
    unknown = [name for name in renamed if name not in model_classes]
    if unknown:
        mapped = f" (after --class-map: {', '.join(renamed)})" if class_map else ""
        raise UserError(
            f"--data {data}: classes {', '.join(data_classes)}{mapped} do not match the "
            f"model's {', '.join(model_classes)}: {', '.join(unknown)} unknown to the model; "
            f"rename with --class-map DATA=MODEL, e.g. --class-map "
            f"{_example_mapping(unknown, data_classes, renamed, model_classes)}"
        )
    return np.array([model_classes.index(name) for name in renamed], dtype=np.int64)


def _example_mapping(
    unknown: list[str], data_classes: list[str], renamed: list[str], model_classes: list[str]
) -> str:
    """A `DATA=MODEL` suggestion only where it is safe: the model class spelled alike (case
    aside), or the one model class left for the one data class left. Otherwise the form, as
    a pairing by position would put images under another class's name."""
    old = next(d for d, r in zip(data_classes, renamed, strict=True) if r == unknown[0])
    alike = [m for m in model_classes if m.casefold() == unknown[0].casefold()]
    if alike:
        return f"{old}={alike[0]}"
    uncovered = [m for m in model_classes if m not in renamed]
    if len(unknown) == 1 and len(uncovered) == 1:
        return f"{old}={uncovered[0]}"
    if not uncovered:  # every model class has its data: the unknown ones are extra folders
        return (
            f"DATA=MODEL for each data class whose images are of that model class; leave out "
            f"any other folder (such as {old})"
        )
    extra = "; leave out any folder of no model class" if len(unknown) > len(uncovered) else ""
    return (
        f"DATA=MODEL for each data class whose images are of a model class ({', '.join(uncovered)}"
        f" not yet mapped); names are not paired by position{extra}"
    )


# --------------------------------------------------------------------------- scoring


def absent_notes(scores: Scores) -> list[str]:
    """What an absent model class means for the numbers; empty when every class is there."""
    absent = scores.absent_classes()
    if not absent:
        return []
    if scores.task.thresholded:
        return [
            f"no image of class {absent[0]} in the scored data: ROC-AUC needs both classes "
            "and is undefined (null); only the decisions' rates are meaningful"
        ]
    return [
        f"no image of class(es) {', '.join(absent)} in the scored data: macro ROC-AUC is "
        "undefined (null)"
    ]


def finding_notes(match: FindingMatch, ignored: list[str], scores: Scores) -> list[str]:
    """One line each: the model's findings the data lacks, the data's columns ignored, and
    the findings left out of the mean here (and why)."""
    notes = []
    if match.missing:
        notes.append(
            f"the data has no column for the model's finding(s) {', '.join(match.missing)}: "
            "not scored (rename a column with --class-map DATA=MODEL if it is there)"
        )
    others = ignored + match.extra
    if others:
        notes.append(f"column(s) {', '.join(others)} are not findings of the model: ignored")
    left_out = [f"{n} ({why})" for n, why in scores.unscored.items()]
    if left_out:
        notes.append(f"left out of the mean ROC-AUC: {'; '.join(left_out)}")
    return notes


# --------------------------------------------------------------------------- results


def findings_record(
    model: Path,
    data: str,
    source: DataIndex,
    split: str,
    scores: Scores,
    class_map: dict[str, str],
    threshold: FindingThreshold | None,
) -> dict[str, Any]:
    """What was scored and how, for a multi-label model's evaluation.json."""
    from distmed.task.multilabel import MultilabelTask

    task = scores.task
    assert isinstance(task, MultilabelTask)
    columns = task.columns(scores.labels, scores.probs)
    return {
        **_what_was_scored(model, data, source, split, scores, class_map),
        "multilabel": True,
        "scored_findings": list(task.scored),
        "unscored_findings": scores.unscored,
        "policies": {
            n: {"uncertain": u, "missing": m}
            for n, u, m in zip(task.class_names, task.uncertain, task.missing, strict=True)
        },
        "known_per_finding": {
            n: int(truth.size) for n, (truth, _) in zip(task.class_names, columns, strict=True)
        },
        "positives_per_finding": {
            n: int(truth.sum()) for n, (truth, _) in zip(task.class_names, columns, strict=True)
        },
        "absent_classes": scores.absent_classes(),
        "positive_class": None,
        "threshold_source": threshold.source if threshold else None,
        **_made_by(),
    }


def evaluation_record(
    model: Path,
    data: str,
    source: DataIndex,
    split: str,
    scores: Scores,
    class_map: dict[str, str],
    threshold: OperatingThreshold | None,
) -> dict[str, Any]:
    """What was scored and how, for evaluation.json (the metrics are added to it)."""
    import numpy as np

    from distmed.task.single import BinaryTask

    counts = np.bincount(scores.labels, minlength=len(scores.class_names))
    return {
        **_what_was_scored(model, data, source, split, scores, class_map),
        "images_per_class": dict(zip(scores.class_names, counts.tolist(), strict=True)),
        "absent_classes": scores.absent_classes(),
        "positive_class": (
            scores.task.positive_class if isinstance(scores.task, BinaryTask) else None
        ),
        "threshold_source": threshold.source if threshold else None,
        **_made_by(),
    }


def _what_was_scored(
    model: Path,
    data: str,
    source: DataIndex,
    split: str,
    scores: Scores,
    class_map: dict[str, str],
) -> dict[str, Any]:
    """The fields every evaluation.json opens with: the model, the data and what it holds."""
    return {
        "model": str(model.resolve()),
        "data": _where(data),
        "data_name": source.name,
        "data_layout": source.layout,
        "split": split,
        "num_images": len(scores.labels),
        "class_names": scores.class_names,
        "data_class_names": source.class_names,
        "class_map": class_map,
    }


def _made_by() -> dict[str, str]:
    """distmed's version and the time of the evaluation (UTC), closing each record."""
    return {
        "distmed_version": __version__,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _where(data: str) -> str:
    """A local path made absolute (a reviewer can find it); `demo`, `medmnist:X` as given."""
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else data


def write_evaluation(output: Path, record: dict[str, Any], scores: Scores, card: Scorecard) -> None:
    """DIR/evaluation.json, DIR/evaluation.html and the figures in DIR/figures/."""
    from distmed.scorecard import render_page, scores_section

    figures = output / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    title = f"{record['data_name']} ({record['split']})"
    section = scores_section(scores, card, figures, FIGURES, title, ("argmax", "at_threshold"))
    page = render_page(
        f"evaluation of {Path(record['model']).name} on {title}",
        ["<h2>External evaluation</h2>", about_table(record), section],
    )
    write_json_atomic(output / EVALUATION_JSON, record, indent=2)
    write_text_atomic(output / EVALUATION_HTML, page)


def about_table(record: dict[str, Any]) -> str:
    """What was scored: model, data, split, classes, the class map, threshold, files left out."""
    mapping = ", ".join(f"{k} → {v}" for k, v in record["class_map"].items()) or "none"
    if record.get("multilabel"):
        return _findings_about_table(record, mapping)
    counts = ", ".join(f"{k}: {v}" for k, v in record["images_per_class"].items())
    threshold = (
        f"{record['threshold']:.4f} on {record['positive_class']} ({record['threshold_source']})"
        if record["threshold"] is not None
        else "none (decisions by the most probable class)"
    )
    rows = [
        ["model", f"{record['model']} ({model_text(record)})"],
        ["data", f"{record['data']} ({record['data_layout'] or 'layout not described'})"],
        ["split scored", record["split"]],
        ["images", f"{record['num_images']} ({counts})"],
        ["data classes", ", ".join(record["data_class_names"])],
        ["class map (data → model)", mapping],
        ["operating threshold", threshold],
        ["unreadable files left out", str(len(record["skipped_files"]))],
        ["distmed", f"{record['distmed_version']}, {record['date_utc']}"],
    ]
    return _about_html(record, rows, "classes matched to the model's by name. ")


def _findings_about_table(record: dict[str, Any], mapping: str) -> str:
    """`about_table` of a multi-label evaluation: findings matched, missing and ignored."""
    positives = ", ".join(
        f"{k}: {record['positives_per_finding'][k]} of {n}"
        for k, n in record["known_per_finding"].items()
    )
    threshold = record["threshold_source"] or "none saved (decisions at 0.5)"
    rows = [
        ["model", f"{record['model']} ({model_text(record)})"],
        ["data", f"{record['data']} ({record['data_layout'] or 'layout not described'})"],
        ["split scored", record["split"]],
        ["images", str(record["num_images"])],
        ["findings scored (positives of known labels)", positives],
        ["model findings not in the data", ", ".join(record["missing_findings"]) or "none"],
        [
            "data columns ignored (not model findings)",
            ", ".join(record["ignored_columns"]) or "none",
        ],
        ["finding map (data → model)", mapping],
        ["thresholds", threshold],
        ["unreadable files left out", str(len(record["skipped_files"]))],
        ["distmed", f"{record['distmed_version']}, {record['date_utc']}"],
    ]
    matched = (
        "findings matched to the model's by name, each with the model's uncertain/missing policy. "
    )
    return _about_html(record, rows, matched)


def _about_html(record: dict[str, Any], rows: list[list[str]], matched: str) -> str:
    """The about section: how the images were read and matched (`matched`), whether they
    were trained on, and the `rows` as a two-column table."""
    from distmed.scorecard import table

    note = (
        "<p>Images decoded exactly as in training (the model's own data settings); "
        + matched
        + (
            f"<b>Note: {html.escape(TRAINING_DATA_NOTE)}.</b></p>"
            if record["training_data"]
            else "Nothing was trained on them.</p>"
        )
    )
    return note + table(["", ""], [[html.escape(a), html.escape(b)] for a, b in rows])


def model_text(record: dict[str, Any]) -> str:
    """Which model scored: "refit model" or "fold ensemble", and its temperature (one per
    finding for a multi-label model)."""
    which = "fold ensemble" if record["ensemble"] == "folds" else "refit model"
    t = record["temperature"]
    if isinstance(t, list):
        return f"{which}, temperatures per finding {', '.join(f'{v:.3f}' for v in t)}"
    return f"{which}, {'no temperature' if t is None else f'temperature {t:.3f}'}"


def summary_line(record: dict[str, Any], card: Scorecard, device: torch.device) -> str:
    """One line for the terminal: how many images, where, by which model, and the argmax
    ROC-AUC with CI."""
    import numpy as np

    auc = card.argmax.point["roc_auc"]
    low, high = card.argmax.ci["roc_auc"]
    shown = "undefined" if np.isnan(auc) else f"{auc:.4f} (95% CI {low:.4f}-{high:.4f})"
    scored = f"{record['num_images']} images of {record['data_name']} ({record['split']}) scored"
    tta = record.get("tta", "none")
    views = "" if tta == "none" else f"; test-time augmentation: {tta}"
    if record.get("multilabel"):
        return (
            f"{scored} by the {model_text(record)} on {device}: mean ROC-AUC over "
            f"{len(record['scored_findings'])} finding(s) {shown}{views}"
        )
    return (
        f"{scored} by the {model_text(record)} on {device}: ROC-AUC {shown}, accuracy "
        f"{card.argmax.point['accuracy']:.4f}{views}"
    )


if __name__ == "__main__":
    sys.exit(main())
