"""`python -m distmed.export --model best_model.pt --format torchscript|onnx [--output FILE]`.

Exports the network (normalised float (B, 3, S, S) in, logits (B, K) out; the saved
temperature and, with `--ensemble folds`, the averaging of the fold models are inside the
graph, so a softmax of the output is what `distmed.predict` reports; a multi-label model's
L outputs each take a sigmoid instead, its temperatures per finding inside the graph; so is
the flip averaging of `data.augment.tta: flips`, while tta=policy's random draws cannot be
exported and are refused unless `--no-tta`) and writes FILE.json beside it: the
preprocessing that must come first, the class (finding) names, the positive class and the
operating threshold (one per finding), so the file can be used without distmed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distmed import __version__
from distmed.artifacts import write_json_atomic
from distmed.cli import (
    add_debug_option,
    add_model_option,
    model_path,
    run_command,
)
from distmed.errors import UserError

if TYPE_CHECKING:  # for annotations; imported where used, after parsing
    import torch

    from distmed.savedmodel import SavedModel

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 18


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.export",
        description="Export best_model.pt to TorchScript or ONNX, with a preprocessing sidecar "
        "JSON (FILE.json).",
    )
    add_model_option(parser)
    parser.add_argument("--format", required=True, help="torchscript or onnx")
    parser.add_argument(
        "--output",
        help="file to write (default: beside --model, model.onnx or model.torchscript.pt)",
    )
    parser.add_argument(
        "--no-tta",
        action="store_true",
        help="export the network without its test-time augmentation (its outputs then "
        "differ from distmed.predict's)",
    )
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    from distmed.inference import load_inference_model

    if args.format not in FORMATS:
        raise UserError(f"--format {args.format}: choose one of {', '.join(FORMATS)}")
    path = model_path(args)
    output = Path(args.output) if args.output else default_output(path, args.format)
    output.parent.mkdir(parents=True, exist_ok=True)
    loaded, saved = load_inference_model(path, args.ensemble)
    tta = "none" if args.no_tta else saved.config.data.augment.tta
    model = with_tta(loaded, saved, tta, path)
    example = example_input(saved)
    if args.format == "torchscript":
        export_torchscript(model, example, output)
    elif not export_onnx(model, example, output):
        print(
            f"note: the model is too large for one ONNX file (2 GB protobuf limit): its weights "
            f"are in {output.name}.data, which must stay beside {output.name}"
        )
    write_json_atomic(sidecar_path(output), sidecar(saved, args.format, args.ensemble, tta))
    print(f"{args.format}: {output}; preprocessing: {sidecar_path(output)}")
    return 0


def with_tta(model: torch.nn.Module, saved: SavedModel, tta: str, path: Path) -> torch.nn.Module:
    """The graph to export: the model, with tta=flips' flip averaging inside it.

    Raises:
        UserError: tta=policy, whose random draws a fixed graph cannot reproduce.
    """
    from distmed.tta import FlipAveraged

    if tta == "policy":
        raise UserError(
            f"--model {path}: it predicts with data.augment.tta=policy (random draws of the "
            "training augmentation), which an exported graph cannot reproduce; add --no-tta "
            "to export the network alone"
        )
    if tta != "flips":
        return model
    return FlipAveraged(model, saved.config.data.augment, multilabel=saved.multilabel is not None)


def default_output(model_path: Path, fmt: str) -> Path:
    return model_path.with_name("model.onnx" if fmt == "onnx" else "model.torchscript.pt")


def example_input(saved: SavedModel) -> torch.Tensor:
    """A zero batch (2, 3, S, S) to trace with; S is the model's image size in pixels."""
    import torch

    size = saved.preprocessing.image_size
    return torch.zeros(2, 3, size, size)


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, output: Path) -> None:
    # Tracing is exact for ResNets (no data-dependent control flow).
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example)
    traced.save(str(output))


# ONNX files are protobufs, which cannot exceed 2 GB; leave room for the graph.
ONNX_INLINE_LIMIT_BYTES = 1_800_000_000


def export_onnx(model: torch.nn.Module, example: torch.Tensor, output: Path) -> bool:
    """ONNX through torch.export (the exporter torch recommends; the TorchScript-based one is
    deprecated), with a dynamic batch dimension. Needs `onnx` and `onnxscript`.

    Returns True when `output` is one self-contained file (weights inside: every ResNet
    fits); False when the weights had to go to `output`.data beside it.
    """
    import torch

    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    inline = weights < ONNX_INLINE_LIMIT_BYTES
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with quiet_loggers(ONNX_CHATTY_LOGGERS):
            torch.onnx.export(
                model.eval(),
                (example,),
                str(output),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=not inline,
                verbose=False,
            )
    except ImportError as exc:
        raise UserError(
            f"ONNX export needs {exc.name}: pip install 'distmed[onnx]' (onnx, onnxscript)"
        ) from exc
    return inline


# The exporter's optimiser passes log a line per pass at INFO ("Removed 182 unused nodes",
# "Applied 63 of general pattern rewrite rules"): its working, not news to the user.
ONNX_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, the `names` loggers (and their children) drop records below
    `level`: INFO chatter goes, warnings and errors still show. Their levels are restored
    after, so nothing else is silenced."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def sidecar(
    saved: SavedModel, fmt: str, ensemble: str = "refit", tta: str = "none"
) -> dict[str, Any]:
    """How to feed the exported model and read its output, without distmed (a JSON dict)."""
    from distmed.inference import finding_temperatures

    prep = saved.preprocessing
    names = saved.class_names
    temperature = saved.calibration.temperature if saved.calibration else None
    members = saved.fold_models.num_models if ensemble == "folds" and saved.fold_models else 1
    output = {
        "name": "logits",
        "shape": ["batch", len(names)],
        "apply": "softmax",
        "models": members,
        "combined": "log of the mean of the models' probabilities" if members > 1 else None,
        "temperature": temperature,
        "calibrated": "logits already divided by the temperature" if temperature else None,
        "test_time_augmentation": "mean probability over the image and its flips, inside the graph"
        if tta == "flips"
        else None,
    }
    multilabel: dict[str, Any] = {}
    if saved.multilabel is not None:
        fitted = saved.finding_calibration is not None
        output |= {
            "apply": "sigmoid per finding (each output its own probability)",
            "combined": "logit of the mean of the models' probabilities" if members > 1 else None,
            "temperature": finding_temperatures(saved) if fitted else None,
            "calibrated": "logits already divided by each finding's temperature"
            if fitted
            else None,
        }
        cuts = saved.finding_thresholds
        multilabel = {
            "findings": names,
            "thresholds": cuts.values if cuts else None,
            "threshold_rule": f"present where sigmoid >= its threshold ({cuts.method}, chosen "
            f"on {cuts.chosen_on})"
            if cuts
            else "none saved: 0.5 each",
            "uncertain": saved.multilabel.uncertain,
            "missing": saved.multilabel.missing,
            "scored": saved.multilabel.scored,
        }
    return {
        "format": fmt,
        "distmed_version": __version__,
        "source": saved.source,
        "architecture": saved.config.model.arch,
        "input": {
            "name": "image",
            "shape": ["batch", 3, prep.image_size, prep.image_size],
            "dtype": "float32",
            "layout": "NCHW, RGB; grey images repeated to 3 channels",
        },
        "preprocessing": {
            "image_size": prep.image_size,
            "resize": prep.resize_text,
            "scale": prep.scale,
            "mean": list(prep.mean),
            "std": list(prep.std),
            "formula": "(pixel / 255 - mean[c]) / std[c] per channel c",
            "channels_in_training_cache": prep.channels_in_cache,
            "resize_mode": prep.resize,
            "intensity": prep.intensity,
            "percentiles": list(prep.percentiles),
            "window": list(prep.window) if prep.window else None,
            "max_pixels": prep.max_pixels,
            "decoding": "EXIF orientation applied; DICOM: modality LUT, then the file's VOI "
            "LUT/window unless intensity is window, MONOCHROME1 inverted; non-finite pixels "
            "set to 0 after scaling",
        },
        "output": output,
        "class_names": names,
        "positive_class": saved.positive_class,
        "threshold": saved.threshold.model_dump(mode="json") if saved.threshold else None,
        **({"multilabel": multilabel} if multilabel else {}),
    }


if __name__ == "__main__":
    sys.exit(main())
