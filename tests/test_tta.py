"""Test-time augmentation (`distmed.tta`) in validation, predict and export: what it averages,
that a flip-invariant model is unchanged by it, and that its draws are reproducible."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import saved_record, write_image_folder
from torch import nn
from torch.utils.data import DataLoader

from distmed import evaluate as evaluate_cli
from distmed import export, predict
from distmed.config import AugmentConfig, ExperimentConfig
from distmed.data import CachedImageDataset, to_model_input
from distmed.inference import decode_file, load_inference_model
from distmed.loop import FoldData, Runtime, build_fold, evaluate
from distmed.loop import predict as predict_loader
from distmed.model import build_model
from distmed.task import BinaryTask
from distmed.tta import FlipAveraged, describe, forward_passes

TWO = BinaryTask(("neg", "pos"), 1)
CPU = Runtime(torch.device("cpu"))
SIZE = 16
FLIPS = AugmentConfig(tta="flips")


def _net(seed: int = 0) -> nn.Module:
    """A small network whose linear head sees positions: not flip-invariant."""
    torch.manual_seed(seed)
    side = SIZE - 2
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * side**2, 2))


class _FlipInvariant(nn.Module):
    """g(x) + g(horizontal flip of x): the same output for an image and its mirror."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.inner(x.flip(-1))


def _images(count: int = 12, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, channels, SIZE, SIZE), dtype=np.uint8)


def _loader(images: np.ndarray) -> DataLoader:
    labels = np.arange(len(images)) % 2
    dataset = CachedImageDataset(images, labels, np.arange(len(images)))
    return DataLoader(dataset, batch_size=5)


def _probs(model: nn.Module, images: np.ndarray, tta: AugmentConfig | None) -> np.ndarray:
    return predict_loader(model.eval(), _loader(images), CPU, TWO, tta)[2]


def test_tta_of_a_flip_invariant_model_changes_nothing():
    images = _images()
    invariant = _FlipInvariant(_net())
    np.testing.assert_allclose(_probs(invariant, images, FLIPS), _probs(invariant, images, None))
    # ...while it does change a model that sees left from right (so the check can fail).
    plain = invariant.inner
    assert not np.allclose(_probs(plain, images, FLIPS), _probs(plain, images, None))


def test_flip_tta_is_the_mean_of_the_views_probabilities():
    images = _images()
    model = _net().eval()
    inputs = to_model_input(torch.from_numpy(images))
    with torch.no_grad():
        views = [torch.softmax(model(x), dim=1) for x in (inputs, inputs.flip(-1))]
    np.testing.assert_allclose(
        _probs(model, images, FLIPS), ((views[0] + views[1]) / 2).numpy(), rtol=1e-5
    )


def test_policy_tta_is_reproducible_and_leaves_the_training_draws_alone():
    images = _images()
    model = _net()
    cfg = AugmentConfig(policy="trivialaugment", tta="policy", tta_draws=3)
    torch.manual_seed(1)
    first = _probs(model, images, cfg)
    after_tta = torch.rand(3)
    torch.manual_seed(1)
    plain = _probs(model, images, None)
    # The draws come from their own RNG: the global one moves as a plain pass moves it (the
    # DataLoader takes one seed), so TTA does not shift the training draws that follow.
    assert torch.equal(torch.rand(3), after_tta)
    torch.manual_seed(2)
    second = _probs(model, images, cfg)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, plain)


def test_forward_passes_state_the_cost():
    assert forward_passes(None) == forward_passes(AugmentConfig()) == 1
    assert forward_passes(FLIPS) == 2  # horizontal only by default
    assert forward_passes(AugmentConfig(tta="flips", vflip=True)) == 4
    assert forward_passes(AugmentConfig(tta="policy", tta_draws=5)) == 6
    assert describe(None) == describe(AugmentConfig()) == "none"
    assert describe(FLIPS) == "flips (2 forward passes an image)"
    assert describe(AugmentConfig(tta="policy", tta_draws=5)) == (
        "policy, 5 draws (6 forward passes an image)"
    )


def test_validation_scores_the_tta_average():
    images = np.repeat(_images(16), 3, axis=1)
    labels = np.arange(16) % 2
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"image_size": SIZE, "augment": {"tta": "flips"}},
            "model": {"weights": "none", "stem": "small", "unfreeze": 5},
        }
    )
    fold = build_fold(FoldData(0, range(8), range(8, 16), images, labels, TWO), cfg, CPU, 4)
    evaluate(fold, CPU)
    assert fold.val_probs is not None and fold.val_loader is not None
    expected = predict_loader(fold.model, fold.val_loader, CPU, TWO, FLIPS)[2]
    plain = predict_loader(fold.model, fold.val_loader, CPU, TWO, None)[2]
    np.testing.assert_allclose(fold.val_probs.numpy(), expected)
    assert not np.allclose(expected, plain)


@pytest.fixture(scope="module")
def flip_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A best_model.pt of a random-init ResNet-18 saved with data.augment.tta=flips."""
    path = tmp_path_factory.mktemp("model") / "best_model.pt"
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"root": "x", "image_size": SIZE, "augment": {"tta": "flips"}},
            "model": {"weights": "none"},
        }
    )
    saved = saved_record(SIZE, ["neg", "pos"], config=cfg)
    torch.manual_seed(0)
    saved.save(path, build_model(cfg.model, 2).state_dict())
    return path


def _flip_mean(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(inputs).softmax(1) + model(inputs.flip(-1)).softmax(1)) / 2


def test_predict_and_export_average_the_saved_models_flips(
    flip_model: Path, tmp_path: Path, capsys
):
    model, _ = load_inference_model(flip_model)
    folder = write_image_folder(tmp_path / "images", {"a": 3}, size=SIZE)
    out = tmp_path / "predictions.csv"
    assert predict.main(["--model", str(flip_model), str(folder), "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "3 of 3 images predicted on cpu with test-time augmentation: flips (2 forward" in said
    inputs = to_model_input(torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8))
    target = tmp_path / "model.onnx"
    argv = ["--model", str(flip_model), "--format", "onnx", "--output", str(target)]
    assert export.main(argv) == 0
    import onnxruntime

    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": inputs.numpy()})
    np.testing.assert_allclose(
        torch.from_numpy(logits).softmax(1).numpy(), _flip_mean(model, inputs).numpy(), atol=1e-5
    )
    sidecar = json.loads(target.with_name("model.onnx.json").read_text())
    assert "flips" in sidecar["output"]["test_time_augmentation"]
    # predict's CSV holds the flip-averaged probabilities of the files
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    decoded = np.stack([decode_file(Path(row["path"]), SIZE) for row in rows])
    expected = _flip_mean(model, to_model_input(torch.from_numpy(decoded)))
    written = np.array([[float(row["prob_neg"]), float(row["prob_pos"])] for row in rows])
    np.testing.assert_allclose(written, expected.numpy(), atol=2e-6)


def test_evaluate_says_and_records_the_test_time_augmentation(
    flip_model: Path, tmp_path: Path, capsys
):
    folder = write_image_folder(tmp_path / "images", {"neg": 3, "pos": 3}, size=SIZE)
    out = tmp_path / "evaluation"
    argv = ["--model", str(flip_model), "--data", str(folder), "--cpu", "--bootstrap", "20"]
    assert evaluate_cli.main([*argv, "--output", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "; test-time augmentation: flips (2 forward passes an image) -> " in line
    record = json.loads((out / evaluate_cli.EVALUATION_JSON).read_text())
    assert record["tta"] == "flips (2 forward passes an image)"


def test_flip_averaged_graph_equals_the_tta_prediction():
    model = _net().eval()
    images = _images(6, channels=3)
    graph = FlipAveraged(model, FLIPS)
    with torch.no_grad():
        exported = graph(to_model_input(torch.from_numpy(images))).softmax(1).numpy()
    np.testing.assert_allclose(exported, _probs(model, images, FLIPS), rtol=1e-5, atol=1e-6)


def test_export_refuses_random_tta_in_one_line_unless_asked_without(tmp_path: Path, capsys):
    path = tmp_path / "best_model.pt"
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"root": "x", "image_size": SIZE, "augment": {"tta": "policy"}},
            "model": {"weights": "none"},
        }
    )
    torch.manual_seed(0)
    weights = build_model(cfg.model, 2).state_dict()
    saved_record(SIZE, ["neg", "pos"], config=cfg).save(path, weights)
    target = tmp_path / "model.torchscript.pt"
    argv = ["--model", str(path), "--format", "torchscript", "--output", str(target)]
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--no-tta" in err and "tta=policy" in err and len(err.splitlines()) == 1
    assert not target.exists()
    assert export.main([*argv, "--no-tta"]) == 0 and target.exists()


def test_exported_flip_average_of_several_findings_is_the_mean_sigmoid():
    """A multi-label graph averages each finding's sigmoid over the flips (not a softmax
    across findings): a sigmoid of its output is the mean of the views' sigmoids."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    images = torch.randn(5, 3, 8, 8)
    averaged = FlipAveraged(network, AugmentConfig(hflip=True, tta="flips"), multilabel=True)
    expected = (torch.sigmoid(network(images)) + torch.sigmoid(network(images.flip(-1)))) / 2
    torch.testing.assert_close(torch.sigmoid(averaged(images)), expected, atol=1e-6, rtol=0)
