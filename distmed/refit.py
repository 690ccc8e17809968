"""After the search: refit the chosen config on all training data, save it, test it once.

`best_model.pt` holds weights, config, class names and preprocessing: enough to rebuild the
model and predict with nothing else (`load_model`). The test split is evaluated here and
nowhere else.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from distmed import __version__
from distmed.artifacts import atomic_path
from distmed.config import ExperimentConfig
from distmed.cv import FoldPlan, fit_folds
from distmed.data import IMAGENET_MEAN, IMAGENET_STD, CachedImageDataset, load_cached
from distmed.metrics import classification_metrics
from distmed.model import build_model
from distmed.resources import WorkerLayout
from distmed.worker import STATE_FILE, predict

log = logging.getLogger(__name__)
MODEL_FORMAT = 1
# The refit model's test-split predictions, saved once so the report never re-evaluates.
TEST_PREDICTIONS = "test_predictions.npz"


def refit_epochs(stop_epochs: list[int]) -> int:
    """Epochs for the final fit: the mean of the epochs the folds stopped at."""
    return max(1, round(float(np.mean(stop_epochs))))


def refit(
    cfg: ExperimentConfig,
    plan: FoldPlan,
    layout: WorkerLayout,
    storage: str,
    run_name: str,
    epochs: int,
) -> dict[str, torch.Tensor]:
    """Train `cfg` on every CV-pool image for `epochs` epochs; returns the model state."""
    final_cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"epochs": epochs, "patience": None})}
    )
    everything = list(range(len(plan.labels)))
    single = replace(plan, folds=[{"train": everything, "val": []}])
    result = fit_folds(final_cfg, single, layout, storage, run_name)
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    return state["folds"][0]["model"]


def save_model(
    path: Path,
    state: dict[str, torch.Tensor],
    cfg: ExperimentConfig,
    class_names: list[str],
    channels: int,
    positive: int | None,
    source: str,
) -> None:
    """Write `best_model.pt` atomically: weights plus what rebuilding and predicting need.

    `source` names the refit run that produced it, so a resumed search can reuse the file.
    """
    payload = {
        "format": MODEL_FORMAT,
        "distmed_version": __version__,
        "source": source,
        "model_state": state,
        "config": cfg.model_dump(mode="json"),
        "class_names": list(class_names),
        "positive_index": positive,
        "preprocessing": {
            "image_size": cfg.data.image_size,
            "resize": "bilinear, to a square image_size x image_size",
            "channels_in_cache": channels,
            "scale": "uint8 / 255; 16-bit and float images min-max scaled per image",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def saved_source(path: Path) -> str | None:
    """The refit run a saved `best_model.pt` came from (None when there is no such file)."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("source")


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from `best_model.pt` alone (safe load: `weights_only=True`)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ExperimentConfig.model_validate(payload["config"])
    no_download = cfg.model.model_copy(update={"weights": "none"})
    model = build_model(no_download, len(payload["class_names"]))
    model.load_state_dict(payload["model_state"])
    model.eval()
    return model, payload


def evaluate_test(
    model: torch.nn.Module,
    test_images_path: Path,
    labels: np.ndarray,
    positive: int | None,
    save_to: Path | None = None,
) -> dict[str, float]:
    """Metrics on the held-back test split, computed once, in this process.

    `save_to` also keeps the predictions (labels, probabilities, decoded-image file) in an
    .npz, so the report plots them without touching the test split again.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = load_cached(test_images_path)
    dataset = CachedImageDataset(images, labels, np.arange(len(labels)))
    loader = DataLoader(dataset, batch_size=256)
    _, truth, probs = predict(model.to(device), loader, device, "off", False)
    if save_to is not None:
        with atomic_path(save_to) as tmp, tmp.open("wb") as handle:  # a name gets .npz added
            np.savez(handle, labels=truth, probs=probs, images_path=str(test_images_path))
    metrics = classification_metrics(truth, probs, positive)
    metrics["num_samples"] = len(truth)
    return metrics


def save_threshold(path: Path, threshold: dict[str, Any]) -> None:
    """Record the binary operating threshold (chosen on validation data) in `best_model.pt`.

    `predict` then labels new images at that threshold with the checkpoint alone.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["threshold"] = threshold
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
