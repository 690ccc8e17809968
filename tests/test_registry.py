"""The registered MLflow pyfunc model predicts what `distmed predict` predicts.

Against a SQLite tracking store in tmp_path (no server, no Ray): the search against a real
`mlflow server` registers its best model too (tests/test_tune_ray.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distmed import predict
from distmed.config import ExperimentConfig
from distmed.model import build_model
from distmed.savedmodel import save_model, save_threshold
from distmed.task import task_for

mlflow = pytest.importorskip("mlflow", reason="pip install mlflow (in .[dev])")

CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def best_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init resnet18 at 24 px, temperature-scaled, with a saved threshold."""
    path = tmp_path_factory.mktemp("run") / "best_model.pt"
    cfg = ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": 24, "resize": "pad"}, "model": {"weights": "none"}}
    )
    torch.manual_seed(0)
    save_model(path, build_model(cfg.model, 2).state_dict(), cfg, task_for(CLASSES), 1, "t1")
    save_threshold(
        path,
        {"value": 0.4, "method": "youden", "chosen_on": "out-of-fold predictions",
         "positive_class": "malignant", "num_samples": 10},
    )  # fmt: skip
    return path


def _images(folder: Path, mode: str, count: int = 5) -> tuple[np.ndarray, list[Path]]:
    """`count` uint8 (N, 40, 30, C) images (not the model's size, not square), saved as PNG."""
    rng = np.random.default_rng(len(mode))
    folder.mkdir(parents=True)
    shape = (count, 40, 30) if mode == "L" else (count, 40, 30, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(image, mode).save(paths[-1])
    return (pixels[..., None] if mode == "L" else pixels), paths


def _predicted(paths: list[Path], model: Path, out: Path) -> np.ndarray:
    """`distmed predict`'s probabilities for `paths`, read back from its CSV (6 decimals)."""
    assert (
        predict.main(["--model", str(model), "--cpu", "--output", str(out), *map(str, paths)]) == 0
    )
    with out.open() as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    return np.array([[float(rows[str(p)][f"prob_{c}"]) for c in CLASSES] for p in paths])


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_the_registered_model_predicts_like_distmed_predict(
    best_model, tmp_path, monkeypatch, mode
):
    from distmed.registry import log_and_register

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artefacts in ./mlruns
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run():
        uri = log_and_register(best_model, "lesions")
    assert uri == "models:/lesions/1"
    # dst_path: MLflow otherwise downloads into a temporary folder it never removes.
    (tmp_path / "downloaded").mkdir()
    loaded = mlflow.pyfunc.load_model(uri, dst_path=str(tmp_path / "downloaded"))
    images, paths = _images(tmp_path / "images", mode)
    probs = loaded.predict(images)
    assert probs.shape == (len(paths), 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, _predicted(paths, best_model, tmp_path / "p.csv"), atol=1e-6)

    meta = loaded.metadata
    [inputs] = meta.get_input_schema().inputs
    assert inputs.type == np.dtype(np.uint8) and inputs.shape == (-1, -1, -1, -1)
    [outputs] = meta.get_output_schema().inputs
    assert outputs.type == np.dtype(np.float32) and outputs.shape == (-1, 2)
    assert meta.metadata["class_names"] == CLASSES and meta.metadata["threshold"] == 0.4


def test_the_registered_model_refuses_what_is_not_uint8_images(best_model, tmp_path):
    from distmed.registry import DistmedImageClassifier, check_images

    with pytest.raises(ValueError, match=r"expected uint8 images .* got float32 \(2, 8, 8, 3\)"):
        check_images(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \(8, 8, 3\)"):
        check_images(np.zeros((8, 8, 3), np.uint8))
    assert issubclass(DistmedImageClassifier, mlflow.pyfunc.PythonModel)
