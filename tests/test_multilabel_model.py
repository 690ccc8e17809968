"""Per-finding thresholds and temperatures chosen on out-of-fold predictions, and a
multi-label `best_model.pt` that round-trips its task (#32). No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmed.calibration import (
    FindingTemperatures,
    apply_finding_temperatures,
    fit_finding_temperatures,
)
from distmed.config import ExperimentConfig
from distmed.errors import UserError
from distmed.model import build_model
from distmed.pipeline import operating_threshold
from distmed.savedmodel import (
    FindingThresholds,
    SavedModel,
    save_model,
    save_threshold,
)
from distmed.task import MultilabelTask

FINDINGS = ("Atelectasis", "Edema", "Effusion")
TASK = MultilabelTask(FINDINGS, ("ones", "ignore", "zeros"), ("zeros", "ignore", "ignore"),
                      ("Atelectasis", "Effusion"))  # fmt: skip


def oof_set(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (targets (n, 3) with NaN, probabilities (n, 3)), some signal each."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 3)) < [0.3, 0.5, 0.2]).astype(np.float64)
    probs = np.clip(0.3 * targets + 0.7 * rng.random((n, 3)), 0.001, 0.999)
    targets[rng.random(n) < 0.3, 1] = np.nan  # Edema unknown on about a third
    return targets, probs


def brute_force_threshold(truth: np.ndarray, score: np.ndarray, sensitivity=None) -> float:
    """Youden's J (or the highest cut reaching `sensitivity`) by trying every score as the
    cut "positive at or above", highest first; the first best cut wins. Returned moved to the
    middle, in logit space, of the gap below it (every cut there decides the same)."""
    best, best_j = None, -np.inf
    for cut in np.unique(score)[::-1]:
        said = score >= cut
        sens = (said & truth).sum() / truth.sum()
        spec = (~said & ~truth).sum() / (~truth).sum()
        if sensitivity is not None:
            if sens >= sensitivity:
                return _mid_gap(score, float(cut))
            continue
        if sens + spec - 1 > best_j:
            best, best_j = cut, sens + spec - 1
    return _mid_gap(score, float(best))


def _mid_gap(score: np.ndarray, cut: float) -> float:
    below = score[score < cut]
    if not len(below):
        return cut
    log_odds = [np.log(p / (1 - p)) for p in (below.max(), cut)]
    return float(1 / (1 + np.exp(-(log_odds[0] + log_odds[1]) / 2)))


@pytest.mark.parametrize("target", [None, 0.9])
def test_thresholds_per_finding_equal_a_hand_computation_on_oof(target):
    labels, probs = oof_set()
    chosen = operating_threshold((labels, probs), TASK, "t1", None, target)
    assert isinstance(chosen, FindingThresholds)
    for j in range(3):
        known = ~np.isnan(labels[:, j])
        expected = brute_force_threshold(labels[known, j] == 1, probs[known, j], target)
        assert chosen.values[j] == pytest.approx(expected)
        assert chosen.num_samples[j] == known.sum()
        said = probs[known, j] >= expected
        truth = labels[known, j] == 1
        assert chosen.validation_sensitivity[j] == pytest.approx((said & truth).sum() / truth.sum())
    assert chosen.method == ("youden" if target is None else "sensitivity>=0.9")
    assert "trial t1" in chosen.chosen_on and chosen.defaulted == []


def test_thresholds_live_on_the_calibrated_scale():
    labels, probs = oof_set(seed=1)
    temperatures = fit_finding_temperatures(labels, probs, TASK)
    chosen = operating_threshold((labels, probs), TASK, "t1", temperatures)
    calibrated = apply_finding_temperatures(probs, temperatures.temperatures)
    for j in range(3):
        known = ~np.isnan(labels[:, j])
        expected = brute_force_threshold(labels[known, j] == 1, calibrated[known, j])
        assert chosen.values[j] == pytest.approx(expected)


def test_a_temperature_per_finding_minimises_that_findings_bce():
    rng = np.random.default_rng(2)
    n = 400
    targets = (rng.random((n, 2)) < 0.4).astype(np.float64)
    true_logits = np.where(targets == 1, 1.0, -1.0) + rng.normal(0, 1.2, (n, 2))
    # Finding a over-confident (logits x 4), finding b under-confident (x 0.5).
    probs = 1 / (1 + np.exp(-true_logits * np.array([4.0, 0.5])))
    task = MultilabelTask(("a", "b"))
    fit = fit_finding_temperatures(targets, probs, task)
    t_a, t_b = fit.temperatures
    assert t_a > 2 and t_b < 1

    def bce(j, temperature):
        p = np.clip(apply_finding_temperatures(probs, np.array([temperature] * 2))[:, j], 1e-12, 1)
        y = targets[:, j]
        return -(y * np.log(p) + (1 - y) * np.log(np.clip(1 - p, 1e-12, 1))).mean()

    for j, found in enumerate(fit.temperatures):
        grid = np.exp(np.linspace(np.log(0.05), np.log(20), 400))
        assert bce(j, found) <= min(bce(j, t) for t in grid) + 1e-6
    assert fit.findings[0].ece_after < fit.findings[0].ece_before


def test_a_finding_without_enough_known_labels_keeps_temperature_one():
    labels, probs = oof_set(seed=3)
    labels[5:, 1] = np.nan  # Edema: five known labels
    fit = fit_finding_temperatures(labels, probs, TASK)
    assert fit.findings[1] is None and fit.temperatures[1] == 1.0
    assert fit.findings[0] is not None


# --------------------------------------------------------------------------- best_model.pt


def _cfg() -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": 16}, "model": {"weights": "none"}}
    )


def test_a_multilabel_model_round_trips_its_task_thresholds_and_temperatures(tmp_path):
    labels, probs = oof_set(seed=4)
    temperatures = fit_finding_temperatures(labels, probs, TASK)
    thresholds = operating_threshold((labels, probs), TASK, "t1", temperatures)
    cfg = _cfg()
    state = build_model(cfg.model, 3).state_dict()
    path = tmp_path / "best_model.pt"
    save_model(path, state, cfg, TASK, 1, "refit-t1", calibration=temperatures,
               threshold=thresholds)  # fmt: skip
    saved, weights = SavedModel.load_with_weights(path)
    assert saved.task == TASK and saved.format == 2 and not saved.binary
    assert saved.finding_thresholds == thresholds and saved.threshold is None
    np.testing.assert_allclose(saved.finding_calibration.temperatures, temperatures.temperatures)
    assert saved.calibration is None and weights.keys() == state.keys()
    assert weights["fc.weight"].shape[0] == 3  # the head has L outputs

    other = thresholds.model_copy(update={"values": [0.1, 0.2, 0.3], "method": "x"})
    save_threshold(path, other)
    assert SavedModel.load(path).finding_thresholds.values == [0.1, 0.2, 0.3]


def test_a_single_label_model_is_still_written_as_format_1(tmp_path):
    from distmed.task import BinaryTask

    cfg = _cfg()
    path = tmp_path / "best_model.pt"
    save_model(path, build_model(cfg.model, 2).state_dict(), cfg, BinaryTask(("a", "b")), 1, "r")
    saved = SavedModel.load(path)
    assert saved.format == 1 and saved.multilabel is None and saved.binary


def test_a_tampered_multilabel_file_is_one_line(tmp_path):
    cfg = _cfg()
    path = tmp_path / "best_model.pt"
    save_model(path, build_model(cfg.model, 3).state_dict(), cfg, TASK, 1, "refit-t1",
               calibration=FindingTemperatures(findings=[None, None, None]))  # fmt: skip
    payload = torch.load(path, weights_only=True)
    payload["multilabel"]["uncertain"] = ["ones"]  # one policy for three findings
    torch.save(payload, path)
    with pytest.raises(UserError, match="multilabel.uncertain holds 1 entries for 3 findings"):
        SavedModel.load(path)
    payload["multilabel"]["uncertain"] = ["maybe"] * 3
    torch.save(payload, path)
    with pytest.raises(UserError, match="best_model.pt"):
        SavedModel.load(path)


def test_a_one_finding_multilabel_model_saves_predicts_and_refuses_one_class(tmp_path):
    """Multi-label with one finding (one sigmoid output) is a valid request: its model is
    saved with its threshold and temperature and predicts; a single-label file still needs
    two classes."""
    import csv

    from PIL import Image

    from distmed import predict

    task = MultilabelTask(("Effusion",))
    rng = np.random.default_rng(5)
    labels = (rng.random((60, 1)) < 0.4).astype(np.float64)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.7, (60, 1)), 0.01, 0.99)
    temperatures = fit_finding_temperatures(labels, probs, task)
    thresholds = operating_threshold((labels, probs), task, "t1", temperatures)
    cfg = _cfg()
    path = tmp_path / "best_model.pt"
    save_model(path, build_model(cfg.model, 1).state_dict(), cfg, task, 1, "refit-t1",
               calibration=temperatures, threshold=thresholds)  # fmt: skip
    saved = SavedModel.load(path)
    assert saved.task == task and saved.class_names == ["Effusion"]
    assert saved.finding_thresholds == thresholds
    for i in range(3):
        Image.fromarray(np.full((20, 20), 60 * i, np.uint8)).save(tmp_path / f"i{i}.png")
    out = tmp_path / "preds.csv"
    assert predict.main(["--model", str(path), *map(str, tmp_path.glob("i*.png")),
                         "--output", str(out)]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and all(0 <= float(r["prob_Effusion"]) <= 1 for r in rows)

    single = saved.model_dump(mode="json") | {"multilabel": None, "format": 1}
    single |= {"finding_thresholds": None, "finding_calibration": None}
    with pytest.raises(ValueError, match="single-label model has at least 2 classes"):
        SavedModel.model_validate(single)
