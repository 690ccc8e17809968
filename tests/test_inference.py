"""Fold ensembles and calibrated inference: `distmed.inference`, the model file's fold
models, and the search's rule for which trial's checkpoints to keep. No Ray cluster."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import saved_record, write_image_folder

from distmed import export, predict
from distmed.artifacts import latest_checkpoint
from distmed.calibration import TemperatureFit
from distmed.data import to_model_input
from distmed.errors import UserError
from distmed.inference import InferenceModel, load_inference_model
from distmed.model import build_model
from distmed.results import completed_score
from distmed.savedmodel import FOLD_WEIGHTS_KEY, FoldModels, SavedModel
from distmed.search import KeepBestCheckpoints
from distmed.task import BinaryTask

BINARY = BinaryTask(("neg", "pos"))  # class 1 scored, as the binary tests label it

SIZE = 16
CLASSES = ["neg", "pos"]


def _saved(**changes: Any) -> SavedModel:
    return saved_record(SIZE, CLASSES, **changes)


def _networks(saved: SavedModel, count: int) -> list[torch.nn.Module]:
    nets = []
    for seed in range(count):
        torch.manual_seed(seed)
        nets.append(build_model(saved.config.model, 2).eval())
    return nets


def _calibration(temperature: float) -> TemperatureFit:
    return TemperatureFit(
        temperature=temperature,
        nll_before=0.5,
        nll_after=0.4,
        ece_before=0.2,
        ece_after=0.1,
        num_samples=40,
    )


@pytest.fixture(scope="module")
def ensemble_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A best_model.pt with a refit model, 3 fold models and a temperature of 2."""
    path = tmp_path_factory.mktemp("model") / "best_model.pt"
    saved = _saved(
        fold_models=FoldModels(trial="t1", num_models=3, stop_epochs=[2, 3, 2]),
        calibration=_calibration(2.0),
    )
    refit, *folds = _networks(saved, 4)
    saved.save(path, refit.state_dict(), [f.state_dict() for f in folds])
    return path


def _batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    return to_model_input(images)


def test_fold_ensemble_probabilities_are_the_mean_of_the_fold_models(ensemble_model: Path):
    model, saved = load_inference_model(ensemble_model, "folds")
    _, _, fold_states = SavedModel.load_all(ensemble_model)
    inputs = _batch()
    members = []
    for state in fold_states:
        net = build_model(saved.config.model, 2).eval()
        net.load_state_dict(state)
        with torch.no_grad():
            members.append(torch.softmax(net(inputs) / 2.0, dim=1))  # temperature 2
    with torch.no_grad():
        ensemble = torch.softmax(model(inputs), dim=1)
    assert len(model.members) == 3
    torch.testing.assert_close(ensemble, torch.stack(members).mean(0), rtol=1e-5, atol=1e-6)


def test_refit_model_is_temperature_scaled_and_keeps_its_argmax(ensemble_model: Path):
    model, _ = load_inference_model(ensemble_model, "refit")
    raw, _ = load_inference_model(ensemble_model, "refit")
    raw.temperature = 1.0
    inputs = _batch()
    with torch.no_grad():
        scaled, plain = model(inputs), raw(inputs)
    torch.testing.assert_close(scaled, plain / 2.0)
    assert torch.equal(scaled.argmax(1), plain.argmax(1))


def test_fold_models_round_trip_and_threshold_rewrite_keeps_them(ensemble_model, tmp_path):
    from distmed.savedmodel import save_threshold

    path = tmp_path / "best_model.pt"
    path.write_bytes(ensemble_model.read_bytes())
    save_threshold(
        path,
        {
            "value": 0.4,
            "method": "youden",
            "positive_class": "pos",
            "chosen_on": "oof",
            "num_samples": 40,
        },
    )
    saved, _, folds = SavedModel.load_all(path)
    assert saved.threshold is not None and saved.threshold.value == 0.4
    assert len(folds) == 3 and saved.fold_models is not None
    assert saved.calibration is not None and saved.calibration.temperature == 2.0


def test_asking_for_folds_a_file_lacks_is_one_line(tmp_path: Path):
    path = tmp_path / "best_model.pt"
    saved = _saved()
    saved.save(path, _networks(saved, 1)[0].state_dict())
    with pytest.raises(UserError, match="holds no fold models.*--ensemble refit"):
        load_inference_model(path, "folds")


def test_fold_weights_that_disagree_with_the_record_are_refused(ensemble_model, tmp_path):
    payload = torch.load(ensemble_model, weights_only=True)
    payload[FOLD_WEIGHTS_KEY] = payload[FOLD_WEIGHTS_KEY][:2]  # 2 of the 3 announced
    path = tmp_path / "best_model.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="3 fold models"):
        SavedModel.load_all(path)


def test_predict_and_export_use_the_ensemble(ensemble_model: Path, tmp_path: Path):
    images = write_image_folder(tmp_path / "images", {"a": 3}, size=SIZE)
    rows = {}
    for ensemble in ("refit", "folds"):
        out = tmp_path / f"{ensemble}.csv"
        argv = ["--model", str(ensemble_model), str(images), "--output", str(out)]
        assert predict.main([*argv, "--ensemble", ensemble]) == 0
        rows[ensemble] = out.read_text()
    assert rows["refit"] != rows["folds"]
    target = tmp_path / "model.torchscript.pt"
    argv = ["--model", str(ensemble_model), "--format", "torchscript", "--output", str(target)]
    assert export.main([*argv, "--ensemble", "folds"]) == 0
    traced = torch.jit.load(str(target))
    model, _ = load_inference_model(ensemble_model, "folds")
    inputs = _batch()
    with torch.no_grad():
        torch.testing.assert_close(traced(inputs), model(inputs), rtol=1e-4, atol=1e-5)
    sidecar = json.loads((tmp_path / "model.torchscript.pt.json").read_text())
    assert sidecar["output"]["models"] == 3 and sidecar["output"]["temperature"] == 2.0


def test_an_ensemble_needs_members_and_a_positive_temperature():
    with pytest.raises(ValueError):
        InferenceModel([], 1.0)
    with pytest.raises(ValueError):
        InferenceModel([torch.nn.Identity()], 0.0)


# --------------------------------------------------------------------------- checkpoints


def test_completed_score_counts_only_clean_finished_cv():
    assert completed_score({"cv_complete": 1, "cv_roc_auc": 0.8}) == 0.8
    assert completed_score({"cv_complete": 0, "cv_roc_auc": 0.9}) is None  # ASHA-stopped
    assert completed_score({"cv_complete": 1, "cv_roc_auc": 0.9, "folds_diverged": 1}) is None
    assert completed_score({"cv_complete": 1, "cv_roc_auc": math.nan}) is None
    assert completed_score(None) is None


def _trial(trial_id: str, result: dict | None, finished: bool = True) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, last_result=result, is_finished=lambda: finished)


def test_only_the_best_completed_trial_keeps_its_checkpoint(tmp_path: Path):
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"cv-{name}" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    keeper = KeepBestCheckpoints(str(tmp_path))
    a = _trial("a", {"cv_complete": 1, "cv_roc_auc": 0.7})
    b = _trial("b", {"cv_complete": 0, "cv_roc_auc": 0.9})  # stopped early: never the best
    c = _trial("c", {"cv_complete": 1, "cv_roc_auc": 0.8}, finished=False)  # still running
    keeper.on_trial_complete(0, [a], a)
    assert latest_checkpoint(str(tmp_path / "cv-a")) is not None  # the best so far
    keeper.on_trial_complete(1, [a, b, c], b)
    assert latest_checkpoint(str(tmp_path / "cv-b")) is None
    assert latest_checkpoint(str(tmp_path / "cv-a")) is None  # c (0.8) overtook it
    assert latest_checkpoint(str(tmp_path / "cv-c")) is not None  # running: untouched
    d = _trial("d", {"cv_complete": 1, "cv_roc_auc": 0.6})
    keeper.on_trial_error(2, [a, b, c, d], d)
    assert latest_checkpoint(str(tmp_path / "cv-d")) is None


def test_latest_checkpoint_is_the_newest_folder(tmp_path: Path):
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    for stamp in ("2026-01-02_00-00-00.000000", "2026-01-01_10-00-00.000000"):
        (tmp_path / f"checkpoint_{stamp}").mkdir()
    (tmp_path / "cv_detail.json").write_text("{}")
    newest = latest_checkpoint(str(tmp_path))
    assert newest is not None and newest.endswith("checkpoint_2026-01-02_00-00-00.000000")


def test_the_threshold_is_chosen_on_the_calibrated_scale_predict_uses(ensemble_model: Path):
    """The model divides logits by T = 2 at predict time, so the out-of-fold
    threshold must be chosen on temperature-scaled probabilities, not raw ones."""
    import numpy as np

    from distmed.calibration import apply_temperature, oof_threshold
    from distmed.metrics import youden_threshold

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    score = np.clip(0.35 * labels + rng.uniform(0, 0.65, 60), 0.01, 0.99)
    probs = np.stack([1 - score, score], axis=1)
    calibration = SavedModel.load(ensemble_model).calibration
    assert calibration is not None
    chosen = oof_threshold(labels, probs, BINARY, calibration.temperature)
    calibrated = apply_temperature(probs, 2.0)[:, 1]
    assert chosen is not None
    assert chosen.value == pytest.approx(youden_threshold(labels == 1, calibrated))
    assert chosen.value != pytest.approx(youden_threshold(labels == 1, score))


def test_report_shows_refit_and_fold_ensemble_side_by_side(ensemble_model: Path, tmp_path):
    """The test metrics of both models from their saved predictions, and the reliability
    diagram before/after the model's temperature."""
    import re

    import numpy as np

    from distmed.inference import TEST_PREDICTIONS_FOLDS
    from distmed.runreport import ensemble_section

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 40)
    refit_pos = np.clip(0.4 * labels + rng.uniform(0, 0.6, 40), 0.01, 0.99)
    folds_pos = np.clip(0.3 * labels + rng.uniform(0, 0.7, 40), 0.01, 0.99)
    refit = np.stack([1 - refit_pos, refit_pos], axis=1)
    folds = np.stack([1 - folds_pos, folds_pos], axis=1)
    np.savez(tmp_path / TEST_PREDICTIONS_FOLDS, labels=labels, probs=folds)
    run = SimpleNamespace(
        test={"labels": labels, "probs": refit},
        run_dir=tmp_path,
        task=BinaryTask(tuple(CLASSES)),
        model_path=ensemble_model,
        calibration=SavedModel.load(ensemble_model).calibration,
    )
    figures = tmp_path / "report"
    figures.mkdir()
    page = ensemble_section(run, figures, resamples=50)  # type: ignore[arg-type]
    shown = dict(re.findall(r"data-key='([^']+)' data-value='([^']+)'", page))
    for key, probs in (("refit_model", refit), ("fold_ensemble", folds)):
        expected = BINARY.metrics(labels, probs)
        for name in ("roc_auc", "brier", "ece"):
            assert float(shown[f"{key}.{name}"]) == pytest.approx(expected[name]), (key, name)
    assert float(shown["temperature"]) == 2.0
    assert (figures / "calibration_before_after.png").is_file()


@pytest.mark.parametrize("value", ["1.5", "-3", "nan"])
def test_a_threshold_that_is_not_a_probability_is_refused_by_predict_and_evaluate(
    ensemble_model: Path, tmp_path: Path, capsys, value: str
):
    from distmed import evaluate

    images = write_image_folder(tmp_path / "images", {"a": 2, "b": 2}, size=SIZE)
    argv = ["--model", str(ensemble_model), "--threshold", value]
    refused = f"--threshold: '{value}': use a number from 0 to 1"  # while parsing
    assert predict.main([*argv, str(images), "--output", str(tmp_path / "p.csv")]) == 2
    assert refused in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
    assert evaluate.main([*argv, "--data", str(images), "--output", str(tmp_path / "e")]) == 2
    assert refused in capsys.readouterr().err


def test_predict_says_which_column_is_the_decision_and_by_what_rule(
    ensemble_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A new user could not tell predicted_class (argmax) from label_at_threshold."""
    images = write_image_folder(tmp_path / "images", {"a": 3}, size=SIZE)
    out = tmp_path / "p.csv"
    argv = ["--model", str(ensemble_model), str(images), "--output", str(out)]
    assert predict.main([*argv, "--threshold", "0.3"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("decision:")]
    positive = CLASSES[1]
    assert said == [
        f"decision: label_at_threshold ({positive} when prob_{positive} >= 0.3, the operating "
        "threshold given with --threshold); predicted_class is the more probable class (0.5)"
    ]
    rows = list(csv.DictReader(out.open()))
    assert rows and all(
        (r["label_at_threshold"] == positive) == (float(r[f"prob_{positive}"]) >= 0.3) for r in rows
    )
