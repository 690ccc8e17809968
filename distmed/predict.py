"""`python -m distmed.predict --model best_model.pt IMAGES_OR_FOLDER... --output preds.csv`.

Rebuilds the model from the checkpoint alone, decodes each file exactly as training did
(`decode_image` with the decoding settings saved in the model, then `to_model_input`),
predicts in batches (on the GPU when there is one) and writes one CSV row per file. Files
that cannot be read are named on stderr and in the CSV's `error` column; every other file is
still predicted. A multi-label model writes, per finding, its probability (`prob_<finding>`,
a sigmoid each) and its decision at the finding's saved threshold (`label_<finding>`, 1 or 0),
and the findings present (`predicted_findings`, joined by `|`).

Exit status: 0 every file predicted; 3 some files unreadable (the rest predicted, CSV
written); 2 bad input (no model file, no images, bad option).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from distmed.artifacts import write_csv_atomic
from distmed.cli import (
    add_debug_option,
    add_model_option,
    add_threshold_option,
    bounded,
    checked_threshold,
    model_path,
    run_command,
)
from distmed.errors import EXIT_SOME_UNREADABLE, UserError, did_you_mean

if TYPE_CHECKING:  # for annotations; imported where used, after parsing
    import numpy as np
    import torch

    from distmed.data import DecodeSettings
    from distmed.inference import Prediction
    from distmed.savedmodel import SavedModel

FINDING_SEPARATOR = "|"  # predicted_findings, as NIH ChestX-ray14 writes a set

EPILOG = """exit status: 0 all files predicted; 3 some files unreadable (named on stderr and
in the CSV's error column, the rest predicted); 2 bad input.

examples:
  python -m distmed.predict --model runs/demo/best_model.pt scans/ --output preds.csv
  python -m distmed.predict --model best_model.pt a.png b.png --output p.csv --gradcam cams/
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.predict",
        description="Predict image files or folders with a saved best_model.pt.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched deeply)")
    add_model_option(parser)
    parser.add_argument(
        "--output", help="CSV to write (default: predictions-<time>.csv in the current folder)"
    )
    parser.add_argument("--gradcam", help="also write a Grad-CAM overlay per image here")
    parser.add_argument(
        "--finding",
        help="multi-label models: the finding Grad-CAM explains (default: each image's most "
        "probable finding)",
    )
    parser.add_argument(
        "--batch-size",
        type=bounded(int, 1, 4096, "64"),
        default=64,
        help="images per batch, 1 to 4096 (64)",
    )
    add_threshold_option(parser)
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    from distmed.inference import choose_device, load_inference_model, predict_batches, tta_of
    from distmed.tta import describe as describe_tta

    path = model_path(args)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    paths = collect_images(args.inputs)
    model, saved = load_inference_model(path, args.ensemble)
    device = choose_device(args.cpu)
    model.to(device)
    options = saved.preprocessing.decode_settings()
    cam_dir = Path(args.gradcam) if args.gradcam else None
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    threshold = _threshold(args.threshold, saved)
    target = finding_index(saved, args.finding)
    results, flat = [], []
    for batch in predict_batches(model, paths, options, args.batch_size, device, saved.task):
        results += batch
        if cam_dir is not None:
            offset = len(results) - len(batch)
            flat += write_gradcams(model, batch, options, cam_dir, offset, target)
    output = Path(args.output or f"predictions-{datetime.now():%Y%m%d-%H%M%S}.csv")
    if saved.multilabel is not None:
        write_findings_csv(output, results, saved, finding_thresholds(args.threshold, saved))
    else:
        write_csv(output, results, saved, threshold)
    bad = [r for r in results if r.probs is None]
    for r in bad:
        print(f"unreadable: {r.path} ({r.error})", file=sys.stderr)
    if flat:
        toward = "the predicted class"
        if saved.multilabel is not None:
            toward = f"finding {args.finding}" if args.finding else "the most probable finding"
        print(flat_note(flat, cam_dir, toward=toward), file=sys.stderr)
    tta = describe_tta(tta_of(model))
    with_tta = "" if tta == "none" else f" with test-time augmentation: {tta}"
    print(
        f"{len(results) - len(bad)} of {len(results)} images predicted on {device}{with_tta} "
        f"-> {output}"
    )
    print(decision_note(saved, threshold, given=args.threshold is not None))
    return EXIT_SOME_UNREADABLE if bad else 0


def decision_note(saved: SavedModel, threshold: float | None, given: bool) -> str:
    """Which CSV column is the model's decision, and by what rule (one line)."""
    if saved.multilabel is not None:
        return (
            "decision: label_<finding> (1 when prob_<finding> reaches that finding's threshold); "
            "predicted_findings lists the findings at 1"
        )
    if not saved.binary:
        return "decision: predicted_class, the most probable class (prob_<class> columns)"
    positive = saved.class_names[saved.positive_index or 0]
    if threshold is None:
        return (
            "decision: predicted_class, the more probable class (no operating threshold, so "
            "label_at_threshold is empty)"
        )
    source = "given with --threshold" if given else "chosen on the search's out-of-fold predictions"
    return (
        f"decision: label_at_threshold ({positive} when prob_{positive} >= {threshold:.4g}, the "
        f"operating threshold {source}); predicted_class is the more probable class (0.5)"
    )


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Files as given (any name: unreadable ones are reported later); folders searched."""
    from distmed.data import FILE_EXTENSIONS, is_image_file

    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not p.name.startswith(".") and is_image_file(p)
            )
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not paths:
        raise UserError(f"no images ({', '.join(FILE_EXTENSIONS)}, DICOM) in {', '.join(inputs)}")
    return paths


def finding_index(saved: SavedModel, finding: str | None) -> int | None:
    """The output index of `--finding` (None when not given).

    Raises:
        UserError: given for a single-label model, or not one of the model's findings.
    """
    if finding is None:
        return None
    if saved.multilabel is None:
        raise UserError("--finding applies to multi-label models only (this one has classes)")
    if finding not in saved.class_names:
        raise UserError(
            f"--finding {finding!r}: not a finding of this model; its findings: "
            f"{', '.join(saved.class_names)}{did_you_mean([finding], saved.class_names)}"
        )
    return saved.class_names.index(finding)


def finding_thresholds(override: float | None, saved: SavedModel) -> np.ndarray:
    """A multi-label model's (L,) decision thresholds: `--threshold` for every finding, else
    the saved ones (chosen per finding on out-of-fold predictions), else 0.5 each (said)."""
    from distmed.inference import saved_finding_thresholds
    from distmed.task.multilabel import MultilabelTask

    task = saved.task
    assert isinstance(task, MultilabelTask)
    given = checked_threshold(override, True)
    if given is not None:
        return task.thresholds_of(given)
    saved_values = saved_finding_thresholds(saved)
    if saved_values is None:
        print(
            "note: the model holds no thresholds per finding (resume its search with "
            "distmed.tune --resume, or pass --threshold); label_<finding> is at 0.5",
            file=sys.stderr,
        )
    return task.thresholds_of(saved_values)


def _threshold(override: float | None, saved: SavedModel) -> float | None:
    from distmed.inference import saved_threshold

    if saved.multilabel is not None:
        return None  # per finding: `finding_thresholds`
    given = checked_threshold(override, saved.binary)
    if given is not None:
        return given
    if not saved.binary:
        return None
    value = saved_threshold(saved)
    if value is None:
        print(
            "note: the model holds no operating threshold (resume its search with "
            "distmed.tune --resume, or pass --threshold); label_at_threshold is left empty",
            file=sys.stderr,
        )
    return value


def write_csv(
    path: Path, results: list[Prediction], saved: SavedModel, threshold: float | None
) -> None:
    """path, predicted_class, prob_<class>..., [label_at_threshold,] error."""
    from distmed.inference import label_at_threshold

    names = saved.class_names
    binary = saved.binary
    header = ["path", "predicted_class", *(f"prob_{n}" for n in names)]
    header += ["label_at_threshold"] if binary else []
    lines: list[list[str]] = []
    for r in results:
        if r.probs is None:
            lines.append([str(r.path)] + [""] * (len(header) - 1) + [r.error])
            continue
        row = [str(r.path), names[int(r.probs.argmax())], *(f"{p:.6f}" for p in r.probs)]
        if binary:
            row.append("" if threshold is None else label_at_threshold(r.probs, saved, threshold))
        lines.append([*row, ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(path, [*header, "error"], lines)


def write_findings_csv(
    path: Path, results: list[Prediction], saved: SavedModel, thresholds: np.ndarray
) -> None:
    """A multi-label model's CSV: path, predicted_findings, prob_<finding>...,
    label_<finding>... (1 where the probability reaches the finding's threshold), error."""
    from distmed.task.multilabel import MultilabelTask

    task = saved.task
    assert isinstance(task, MultilabelTask)
    names = saved.class_names
    header = [
        "path",
        "predicted_findings",
        *(f"prob_{n}" for n in names),
        *(f"label_{n}" for n in names),
    ]
    lines: list[list[str]] = []
    for r in results:
        if r.probs is None:
            lines.append([str(r.path)] + [""] * (len(header) - 1) + [r.error])
            continue
        present = task.decide(r.probs[None, :], thresholds)[0]
        found = FINDING_SEPARATOR.join(n for n, d in zip(names, present, strict=True) if d)
        probs = [f"{p:.6f}" for p in r.probs]
        lines.append([str(r.path), found, *probs, *(str(int(d)) for d in present), ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(path, [*header, "error"], lines)


def write_gradcams(
    model: torch.nn.Module,
    batch: list[Prediction],
    options: DecodeSettings,
    folder: Path,
    offset: int,
    target: int | None = None,
) -> list[str]:
    """One overlay PNG per readable file, for its predicted class (a multi-label model:
    output `target`, the chosen finding's logit, else its most probable finding):
    NNNN_<name>.png.

    Returns the names of the PNGs whose heat map is flat (`gradcam.is_flat`).
    """
    from distmed.inference import gradcam_pictures

    readable = [(offset + i, r) for i, r in enumerate(batch) if r.probs is not None]
    if not readable:
        return []
    pictures = gradcam_pictures(model, [r for _, r in readable], options, target)
    flat = []
    for (number, r), cam in zip(readable, pictures, strict=True):
        name = f"{number:04d}_{r.path.stem}.png"
        cam.picture.save(folder / name)
        if cam.flat:
            flat.append(name)
    return flat


def flat_note(
    names: list[str], folder: Path | None, most: int = 10, toward: str = "the predicted class"
) -> str:
    """One stderr line naming the overlays whose heat map is flat (the first `most`)."""
    shown = ", ".join(str(folder / n if folder else n) for n in names[:most])
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return (
        f"note: {len(names)} Grad-CAM map(s) flat, no gradient toward {toward} "
        f"(the overlay shows no evidence either way): {shown}{more}"
    )


if __name__ == "__main__":
    sys.exit(main())
