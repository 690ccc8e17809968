"""A saved model as one network that predicts: the refit model or the fold ensemble, calibrated.

`load_inference_model(path, ensemble)` rebuilds it from `best_model.pt` alone. Its outputs
are logits in the sense that the saved task's activation of them (`Task.probabilities`:
softmax over classes, or a sigmoid per finding of a multi-label model) is the final
prediction: the refit model's logits divided by the saved temperature (one per finding for a
multi-label model), or, for the fold ensemble, the log (multi-label: the logit) of the mean
of the fold models' temperature-scaled probabilities. Predict, evaluate, the app, export and
the search's test evaluation all go through it, so they agree.

Also what every consumer of such a model shares: the device, file-by-file prediction
(`predict_batches`), the decision at the saved threshold, Grad-CAM overlays, and the one
evaluation of a decoded or streamed split (`evaluate_test`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from distmed.artifacts import atomic_path
from distmed.config import AugmentConfig, ModelConfig
from distmed.data import DecodeSettings, load_cached, try_decode
from distmed.data.stream import StreamSpec, stream_batches
from distmed.errors import UserError, first_line
from distmed.loop import Runtime, fold_dataset, predict, predict_batch
from distmed.model import (
    NORMALIZATION_ATTRIBUTE,
    build_model,
    input_normalization,
    network_normalization,
)
from distmed.savedmodel import SavedModel
from distmed.sharedpass import BatchReader
from distmed.task.base import Task
from distmed.tta import average_probabilities

Ensemble = Literal["refit", "folds"]
ENSEMBLES: tuple[Ensemble, ...] = ("refit", "folds")
# log(0) would be -inf in an exported graph; a probability this small is 0 to any reader.
MIN_PROBABILITY = 1e-12
# A mean sigmoid of 1.0 (float32 saturates from a logit of ~17) would be an infinite logit.
MIN_SIGMOID = 1e-7
# The refit model's test-split predictions, saved once so the report never re-evaluates;
# the fold ensemble's beside them when the model keeps its fold models.
TEST_PREDICTIONS = "test_predictions.npz"
TEST_PREDICTIONS_FOLDS = "test_predictions_folds.npz"
GRADCAM_MIN_SIZE = 224  # overlays of 28 px images are upscaled so people can see them


class InferenceModel(nn.Module):
    """Normalised images (B, 3, S, S) -> logits (B, K) whose activation is the prediction.

    Single-label (softmax): one member gives its logits / `temperature`; several (the fold
    ensemble) give the log of the mean of softmax(member logits / `temperature`), i.e. the
    ensemble averages probabilities (as `--ensemble folds` promises), and a softmax of the
    output gives that mean back.

    Multi-label (`finding_temperatures` given, (L,) positive numbers; a sigmoid per finding):
    one member gives its logits / T_l per finding; several give logit(mean_m sigmoid(member
    logits / T_l)), so a sigmoid of the output gives the mean probability per finding back
    (clamped to [MIN_SIGMOID, 1 - MIN_SIGMOID], no infinities in an exported graph).

    `tta` is the saved model's test-time augmentation: the callers holding the images
    (`predict_cached`, `predict_batches`) average it through `distmed.tta`; export puts
    its flips inside the graph.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        temperature: float = 1.0,
        tta: AugmentConfig | None = None,
        finding_temperatures: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not members or temperature <= 0:
            raise ValueError("an InferenceModel needs members and a positive temperature")
        self.members = nn.ModuleList(members)
        self.temperature = float(temperature)
        self.tta = tta
        self.multilabel = finding_temperatures is not None
        per_finding = torch.tensor(
            list(finding_temperatures or [1.0]), dtype=torch.float32
        ).reshape(-1)
        if self.multilabel and not (per_finding > 0).all():
            raise ValueError("finding temperatures must be positive")
        # A buffer: it moves with .to(device) and is a constant of a traced/exported graph.
        self.register_buffer("finding_temperatures", per_finding)
        self.finding_temperatures: torch.Tensor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return self._finding_logits(images)
        if len(self.members) == 1:
            return self.members[0](images).float() / self.temperature
        probs = torch.stack(
            [torch.softmax(m(images).float() / self.temperature, dim=1) for m in self.members]
        ).mean(dim=0)
        return torch.log(probs.clamp_min(MIN_PROBABILITY))

    def _finding_logits(self, images: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](images).float() / self.finding_temperatures
        probs = torch.stack(
            [torch.sigmoid(m(images).float() / self.finding_temperatures) for m in self.members]
        ).mean(dim=0)
        probs = probs.clamp(MIN_SIGMOID, 1 - MIN_SIGMOID)
        return torch.log(probs) - torch.log1p(-probs)  # the logit, sigmoid's inverse


def load_inference_model(
    path: Path, ensemble: Ensemble = "refit"
) -> tuple[InferenceModel, SavedModel]:
    """The model in `best_model.pt` (safe load: `weights_only=True`), in eval mode.

    Args:
        ensemble: "refit" (the model refitted on all training data) or "folds" (the best
            trial's k fold models, probabilities averaged).

    Raises:
        UserError: not a valid best_model.pt; weights that do not fit its network; fold
            models asked of a file without them. One line naming the file.
    """
    saved, state, fold_states = SavedModel.load_all(path)
    if ensemble == "folds":
        if not fold_states:
            raise UserError(
                f"--model {path}: holds no fold models (written before distmed kept them, "
                "or the best trial's checkpoint was gone); use --ensemble refit"
            )
        members = [network(saved, s, path) for s in fold_states]
    else:
        members = [network(saved, state, path)]
    if saved.multilabel is not None:
        tta, per_finding = saved.config.data.augment, finding_temperatures(saved)
        return InferenceModel(members, 1.0, tta, per_finding).eval(), saved
    temperature = saved.calibration.temperature if saved.calibration else 1.0
    return InferenceModel(members, temperature, saved.config.data.augment).eval(), saved


def finding_temperatures(saved: SavedModel) -> list[float]:
    """A multi-label model's (L,) temperatures: the saved fit per finding, 1 where none."""
    if saved.finding_calibration is None:
        return [1.0] * len(saved.class_names)
    return [float(t) for t in saved.finding_calibration.temperatures]


def load_model(path: Path) -> tuple[nn.Module, SavedModel]:
    """The refit network alone, uncalibrated (what training produced), in eval mode."""
    saved, state = SavedModel.load_with_weights(path)
    return network(saved, state, path).eval(), saved


def network(saved: SavedModel, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """The ResNet `saved.config.model` describes, with `state` loaded (no download).

    Raises:
        UserError: the weights do not fit that network; names `path` and the first key.
    """
    try:
        net = build_network(saved.config.model, len(saved.class_names), state)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: torch lists them all
        # Its first line only says "Error(s) in loading state_dict"; the next names the key.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else first_line(exc)
        raise UserError(
            f"--model {path}: its weights do not fit a {saved.config.model.arch} with "
            f"{len(saved.class_names)} classes ({detail[:160]})"
        ) from exc
    # Normalise as training did: the file's record (ImageNet's in files from before it varied).
    prep = saved.preprocessing
    setattr(net, NORMALIZATION_ATTRIBUTE, (prep.mean, prep.std))
    return net


def build_network(
    model_cfg: ModelConfig, num_classes: int, state: dict[str, torch.Tensor]
) -> nn.Module:
    """The ResNet `model_cfg` describes with `state` loaded; never downloads weights.

    Raises:
        RuntimeError: `state` does not fit it (torch's message lists the keys).
    """
    model = build_model(model_cfg.model_copy(update={"weights": "none"}), num_classes)
    model.load_state_dict(state)
    # Normalised as trained: the configured weights' statistics, not random init's.
    setattr(model, NORMALIZATION_ATTRIBUTE, input_normalization(model_cfg))
    return model


def tta_of(model: nn.Module) -> AugmentConfig | None:
    """The test-time augmentation `model` predicts with (None: a plain network)."""
    return model.tta if isinstance(model, InferenceModel) else None


def members(model: nn.Module) -> list[nn.Module]:
    """The networks inside `model` (itself when it is a plain network): Grad-CAM's targets."""
    return list(model.members) if isinstance(model, InferenceModel) else [model]


def input_stats(model: nn.Module) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The (mean, std) `model`'s (or its first member's) inputs are normalised with."""
    return network_normalization(members(model)[0])


def choose_device(cpu: bool = False) -> torch.device:
    """The first CUDA GPU when there is one (and `cpu` is not asked for), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


@dataclass(frozen=True)
class Prediction:
    path: Path
    probs: np.ndarray | None  # class probabilities; None when the file could not be read
    error: str = ""


def predict_batches(
    model: torch.nn.Module,
    paths: list[Path],
    options: DecodeSettings,
    batch_size: int,
    device: torch.device,
    task: Task,
) -> Iterator[list[Prediction]]:
    """Per batch of files: decoded as in training, probabilities (`task.probabilities` of
    the model's output: (K,) classes or (L,) findings per file) or the read error."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        decoded = [decode_file(p, options) for p in chunk]
        good = [d for d in decoded if isinstance(d, np.ndarray)]
        probs = iter(_probabilities(model, np.stack(good), device, task)) if good else iter(())
        yield [
            Prediction(p, next(probs)) if isinstance(d, np.ndarray) else Prediction(p, None, d)
            for p, d in zip(chunk, decoded, strict=True)
        ]


def decode_file(path: Path, options: DecodeSettings | int) -> np.ndarray | str:
    """uint8 (3, S, S) as the training cache holds it (grey repeated), or why it is unreadable.

    The same decoder and reasons as the training cache (`try_decode`): an oversized,
    multi-frame or corrupt file is one line, and every other file is still predicted.
    """
    image, reason = try_decode(path, options)
    if image is None:
        return reason[:200]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image.transpose(2, 0, 1)


@torch.no_grad()
def _probabilities(
    model: torch.nn.Module, images: np.ndarray, device: torch.device, task: Task
) -> np.ndarray:
    batch = torch.from_numpy(images).to(device)
    probs = average_probabilities(
        model, batch, task.probabilities, tta_of(model), normalization=input_stats(model)
    )
    return probs.cpu().numpy()


def probabilities_of(
    model: torch.nn.Module, images: np.ndarray, device: torch.device, task: Task
) -> np.ndarray:
    """Probabilities (N, K) of decoded uint8 images (N, 3, S, S), the task's activation
    (softmax; a sigmoid per finding): what `predict_batches` gives for files (the registered
    MLflow model's pixels come in memory)."""
    return _probabilities(model, images, device, task)


def saved_finding_thresholds(saved: SavedModel) -> np.ndarray | None:
    """A multi-label model's (L,) operating thresholds saved when its search ended, if any."""
    if saved.finding_thresholds is None:
        return None
    return np.asarray(saved.finding_thresholds.values, dtype=np.float64)


def saved_threshold(saved: SavedModel) -> float | None:
    """The binary operating threshold saved in the model when its search ended, if any."""
    return None if saved.threshold is None else saved.threshold.value


def label_at_threshold(probs: np.ndarray, saved: SavedModel, threshold: float) -> str:
    """Binary decision: the positive class when its probability reaches `threshold`.

    Args:
        probs: (2,) class probabilities of one image.
    """
    return saved.class_names[int(saved.task.decide(probs[None, :], threshold)[0])]


class GradcamPicture(NamedTuple):
    picture: Image.Image  # the overlay, RGB
    flat: bool  # the heat map is (near) constant: the overlay shows no evidence either way


def gradcam_pictures(
    model: torch.nn.Module,
    readable: list[Prediction],
    options: DecodeSettings,
    target: int | None = None,
) -> list[GradcamPicture]:
    """Grad-CAM overlays of each readable file, at least 224 px: for output `target` (a
    multi-label model's finding: its logit) when given, else the most probable output (the
    predicted class; a multi-label model's most probable finding)."""
    from distmed.gradcam import gradcam_maps, is_flat, overlay

    size = options.image_size
    images = np.stack([decode_file(r.path, options) for r in readable])
    targets = []
    for r in readable:
        assert r.probs is not None  # readable files have probabilities
        targets.append(int(r.probs.argmax()) if target is None else target)
    maps = gradcam_maps(model, images, targets)
    side = max(size, GRADCAM_MIN_SIZE)
    return [
        GradcamPicture(
            Image.fromarray(overlay(image, heat)).resize((side, side), Image.Resampling.BILINEAR),
            is_flat(heat),
        )
        for image, heat in zip(images, maps, strict=True)
    ]


def predict_cached(
    model: torch.nn.Module,
    images_path: Path,
    task: Task,
    device: torch.device,
    labels: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities (N, K)) of decoded images in `images_path`, in file order
    (a multi-label task: labels are (N, L) targets, probabilities (N, L) sigmoids).

    `positions`: only these images (default all); `labels`: every cached image's label
    (default placeholders, for callers that map labels themselves).
    """
    images = load_cached(images_path)
    if labels is None:
        labels = np.zeros(len(images), dtype=np.int64)
    chosen = np.arange(len(labels)) if positions is None else np.asarray(positions)
    # Class indices (N,) or a multi-label task's rows of targets (N, L), as training loads them.
    loader = DataLoader(fold_dataset(images, labels, chosen), batch_size=batch_size)
    runtime = Runtime(device, mean=input_stats(model)[0], std=input_stats(model)[1])
    _, truth, probs = predict(model.to(device), loader, runtime, task, tta_of(model))  # by index
    return truth, probs


@torch.no_grad()
def predict_streamed(
    model: torch.nn.Module,
    spec: StreamSpec,
    task: Task,
    device: torch.device,
    labels: np.ndarray,
    positions: np.ndarray | None = None,
    batch_size: int = 256,
    read: BatchReader | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities (N, K)) of the streamed images at `positions` (default all),
    in position order, as `predict_cached` gives them for the cache.

    Ray Data tasks decode the files (`stream.stream_batches`) and this process predicts
    batch by batch as they arrive, so it holds a few batches, never the split. `read`: the
    `sharedpass.BatchReader` (default the stream; tests pass an in-memory one).

    Raises:
        RuntimeError: the batches did not cover every position exactly once.
    """
    chosen = np.arange(spec.rows) if positions is None else np.asarray(positions)
    if read is None:
        read = lambda order: stream_batches(spec, order, batch_size)  # noqa: E731
    runtime = Runtime(device, mean=input_stats(model)[0], std=input_stats(model)[1])
    model = model.to(device).eval()
    found: list[np.ndarray] = []
    parts: list[torch.Tensor] = []
    for images, rows in read(chosen):
        parts.append(predict_batch(model, images, runtime, task, tta_of(model)))
        found.append(rows.numpy())
    seen = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    if not np.array_equal(np.sort(seen), np.sort(chosen)):  # never score an image twice
        raise RuntimeError(f"the stream gave {len(seen)} rows for {len(chosen)} images")
    by_position = np.argsort(seen, kind="stable")
    probs = torch.cat(parts).numpy() if parts else np.zeros((0, task.num_outputs))
    return np.asarray(labels)[seen[by_position]], probs[by_position]


def evaluate_test(
    model: torch.nn.Module,
    test_images: Path | StreamSpec,
    labels: np.ndarray,
    task: Task,
    save_to: Path | None = None,
    indices: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics on the held-back test split, computed once, in this process.

    `test_images`: its decoded cache file, or its files streamed (`data.loader: stream`,
    `predict_streamed`). `save_to` also keeps the predictions (labels, probabilities, the
    decoded-image file, "" for a stream) in an .npz, so the report plots them without
    touching the test split again. `indices`: score only these positions (a nested search's
    outer validation part of the pool); `labels` are then the labels of every pool image.
    """
    device = choose_device()
    if isinstance(test_images, StreamSpec):
        truth, probs = predict_streamed(model, test_images, task, device, labels, indices)
        images_path = ""  # nothing decoded is kept (the report says so)
    else:
        truth, probs = predict_cached(model, test_images, task, device, labels, indices)
        images_path = str(test_images)
    if save_to is not None:
        with atomic_path(save_to) as tmp, tmp.open("wb") as handle:  # a name gets .npz added
            np.savez(handle, labels=truth, probs=probs, images_path=images_path)
    metrics = task.metrics(truth, probs)
    metrics["num_samples"] = len(truth)
    return metrics
