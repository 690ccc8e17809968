"""The best model as an MLflow pyfunc model, registered in the MLflow model registry.

Owns the wrapper a serving stack loads (`mlflow.pyfunc.load_model("models:/NAME/1")`): raw
uint8 images in, class probabilities out, with distmed's preprocessing inside, so the
registered model predicts what `distmed predict` predicts for the same pixels. The model's
only artefact is `best_model.pt`; it is rebuilt by `inference.load_inference_model` (the
refit model, temperature-scaled), and every image goes through the decoder's own steps
(`to_grey_or_rgb`, `fit_size`: the saved image size and resize policy) and
`inference.probabilities_of`.

Imported only when `tracking.mlflow.register` is set (mlflow is an optional dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.pyfunc.model import PythonModel
from mlflow.types import Schema, TensorSpec
from PIL import Image

from distmed import version
from distmed.data import DecodeSettings
from distmed.data.decode import fit_size, to_grey_or_rgb
from distmed.inference import choose_device, load_inference_model, probabilities_of
from distmed.savedmodel import SavedModel

ARTIFACT = "best_model"  # the key of best_model.pt among the pyfunc model's artefacts
MODEL_NAME = "model"  # the logged model's name within the run
CODE = Path(__file__).with_name("registry_code.py")  # what MLflow runs to load the model


class DistmedImageClassifier(PythonModel):
    """pyfunc: uint8 images (N, H, W, C), C = 1 (grey) or 3 (RGB), one H x W per call ->
    float32 class probabilities (N, K), columns in the order of the metadata's `class_names`.

    Raises (from `predict`):
        ValueError: not uint8, not 4-D, or C is not 1 or 3 (the message says which).
    """

    def load_context(self, context: Any) -> None:
        path = Path(context.artifacts[ARTIFACT])
        self.device = choose_device(cpu=True)  # serving replicas: CPU, as `--cpu` predicts
        self.model, saved = load_inference_model(path, "refit")
        self.task = saved.task
        self.model.to(self.device)
        self.options = saved.preprocessing.decode_settings()

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        # np.ndarray: a hint MLflow takes as "no schema from hints" (the signature rules).
        images = check_images(np.asarray(model_input))
        decoded = np.stack([decode_pixels(image, self.options) for image in images])
        return probabilities_of(self.model, decoded, self.device, self.task)


def check_images(images: np.ndarray) -> np.ndarray:
    """`images` when they are uint8 (N, H, W, 1 or 3); else ValueError saying what to send."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images (N, H, W, 1) grey or (N, H, W, 3) RGB, got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    return images


def decode_pixels(image: np.ndarray, options: DecodeSettings) -> np.ndarray:
    """uint8 (H, W, 1 or 3) -> uint8 (3, S, S): what `inference.decode_file` gives for an
    8-bit file holding these pixels (grey repeated into 3 channels)."""
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    fitted = fit_size(to_grey_or_rgb(picture, options), options)
    if fitted.ndim == 2:
        fitted = np.repeat(fitted[..., None], 3, axis=2)
    return fitted.transpose(2, 0, 1)


def signature(num_classes: int) -> ModelSignature:
    """Input: uint8 (-1, -1, -1, -1) images; output: float32 (-1, num_classes) probabilities.

    Unnamed tensors: `predict` receives the array itself (a named one comes as a dict).
    """
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


def model_metadata(saved: SavedModel) -> dict[str, Any]:
    """What a reader of the registered model needs beside the probabilities."""
    threshold = saved.threshold.value if saved.threshold is not None else None
    return {
        "class_names": list(saved.class_names),
        "image_size": saved.preprocessing.image_size,
        "threshold": threshold,
        "distmed_version": version(),
    }


def log_and_register(best_model: Path, name: str) -> str:
    """Log `best_model` as a pyfunc model in the active run and register it as `name`;
    returns the registered version's URI, `models:/NAME/VERSION`.

    The tracking URI and run are the caller's (`mlflow.start_run(run_id=...)`). The pip
    requirement is distmed itself (its own dependencies come with it), given rather than
    inferred: inference loads the model in a subprocess, which is slow and adds nothing.
    """
    saved = SavedModel.load(best_model)
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(CODE),  # models from code: loading unpickles nothing
        artifacts={ARTIFACT: str(best_model)},
        signature=signature(len(saved.class_names)),
        pip_requirements=[f"distmed=={version()}"],
        metadata=model_metadata(saved),
        registered_model_name=name,
    )
    return f"models:/{name}/{info.registered_model_version}"
