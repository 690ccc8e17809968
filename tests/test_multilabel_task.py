"""distmed.task.MultilabelTask: policies, masked loss, per-finding scores, decisions (#32)."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from sklearn import metrics as skm

from distmed import metrics
from distmed.errors import UserError
from distmed.task import AnyTask, MultilabelTask, finding_auc_key, multilabel_task

NAN = np.nan
FINDINGS = ("Atelectasis", "Edema", "Effusion")


def scored_set(seed: int = 0, n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """(targets (n, 3) of 0/1, probabilities (n, 3)) with some signal per finding."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 3)) < [0.3, 0.5, 0.2]).astype(np.float32)
    probs = np.clip(0.35 * targets + 0.65 * rng.random((n, 3)), 0.001, 0.999)
    return targets, probs


def test_policies_per_finding_turn_raw_codes_into_targets():
    raw = np.array([[1, 0, -1], [-1, NAN, 0], [NAN, -1, 1]], dtype=np.float32)
    task = MultilabelTask(FINDINGS, uncertain=("ignore", "ones", "zeros"),
                          missing=("zeros", "ignore", "ignore"))  # fmt: skip
    expected = np.array([[1, 0, 0], [NAN, NAN, 0], [0, 1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(task.targets(raw), expected)
    np.testing.assert_array_equal(task.stratify_key(raw), [[1, 0, 0], [0, 0, 0], [0, 1, 1]])
    assert task.targets(raw).dtype == np.float32
    with pytest.raises(ValueError, match="codes"):
        task.targets(np.array([[1, 2, 0]], dtype=np.float32))


def test_defaults_are_ignore_and_every_finding_scored():
    task = MultilabelTask(FINDINGS)
    assert task.uncertain == task.missing == ("ignore",) * 3
    assert task.scored == FINDINGS and task.num_outputs == 3 and task.thresholded
    assert np.isnan(task.targets(np.array([[-1, NAN, 1]]))[0, :2]).all()


def test_masked_labels_change_neither_loss_nor_metrics():
    targets, probs = scored_set()
    task = MultilabelTask(FINDINGS)
    # The same data plus images whose every label is uncertain or missing (ignored), with
    # confident wrong outputs: nothing about them may count.
    extra_raw = np.array([[-1, NAN, -1]] * 7, dtype=np.float32)
    extra_probs = np.tile([0.999, 0.001, 0.999], (7, 1))
    with_masked = np.vstack([targets, task.targets(extra_raw)])
    probs_masked = np.vstack([probs, extra_probs])
    plain, masked = task.metrics(targets, probs), task.metrics(with_masked, probs_masked)
    assert masked == pytest.approx(plain, nan_ok=True)
    assert task.nll(with_masked, probs_masked) == pytest.approx(task.nll(targets, probs))
    assert task.brier(with_masked, probs_masked) == pytest.approx(task.brier(targets, probs))
    loss = task.build_loss(None, "cpu")
    logits = torch.logit(torch.tensor(probs, dtype=torch.float32))
    logits_masked = torch.logit(torch.tensor(probs_masked, dtype=torch.float32))
    logits_masked.requires_grad_(True)
    value = loss(logits_masked, torch.tensor(with_masked))
    assert value.item() == pytest.approx(loss(logits, torch.tensor(targets)).item(), rel=1e-6)
    value.backward()
    assert torch.all(logits_masked.grad[len(targets) :] == 0)


def test_each_finding_is_scored_on_its_own_unmasked_images():
    targets, probs = scored_set(1)
    targets[:10, 0] = NAN  # Atelectasis unknown on the first ten images
    task = MultilabelTask(FINDINGS)
    got = task.metrics(targets, probs)
    aucs = [
        skm.roc_auc_score(targets[10:, 0], probs[10:, 0]),
        skm.roc_auc_score(targets[:, 1], probs[:, 1]),
        skm.roc_auc_score(targets[:, 2], probs[:, 2]),
    ]
    for name, auc in zip(FINDINGS, aucs, strict=True):
        assert got[finding_auc_key(name)] == pytest.approx(auc)
    assert got["roc_auc"] == pytest.approx(np.mean(aucs))
    assert task.finding_aucs(got) == {n: got[finding_auc_key(n)] for n in FINDINGS}
    curves = task.curves(targets, probs)
    assert [c.name for c in curves] == list(FINDINGS) and len(curves[0].truth) == 70


def test_the_score_averages_the_scored_findings_only_and_records_all():
    targets, probs = scored_set(2)
    task = MultilabelTask(FINDINGS, scored=("Effusion", "Atelectasis"))
    assert task.scored == ("Atelectasis", "Effusion")  # the findings' order
    got = task.metrics(targets, probs)
    expected = np.mean([skm.roc_auc_score(targets[:, j], probs[:, j]) for j in (0, 2)])
    assert got["roc_auc"] == pytest.approx(expected)
    assert set(FINDINGS) == set(task.finding_aucs(got))


def test_decisions_and_macro_metrics_use_each_findings_threshold():
    targets, probs = scored_set(3)
    task = MultilabelTask(FINDINGS)
    cuts = np.array([0.2, 0.5, 0.8])
    decided = task.decide(probs, cuts)
    assert decided.shape == (80, 3) and decided.dtype == np.int8
    np.testing.assert_array_equal(decided, probs >= cuts)
    np.testing.assert_array_equal(task.decide(probs), probs >= 0.5)
    at = task.metrics_at(targets, probs, cuts)
    sens = [skm.recall_score(targets[:, j], probs[:, j] >= cuts[j]) for j in range(3)]
    assert at["sensitivity"] == pytest.approx(np.mean(sens))
    ece = np.mean(
        [metrics.expected_calibration_error(probs[:, j], targets[:, j]) for j in range(3)]
    )
    assert task.calibration_error(targets, probs) == pytest.approx(ece)


def test_loss_is_bce_over_known_entries_with_pos_weight_by_hand():
    targets = np.array([[1, 0], [0, NAN], [1, 1], [0, 0], [NAN, 0]], dtype=np.float32)
    task = MultilabelTask(("a", "b"))
    weights = task.class_weights(targets)
    # a: 2 positives, 2 negatives -> 1; b: 1 positive, 3 negatives -> 3.
    np.testing.assert_allclose(weights, [1.0, 3.0])
    logits = torch.tensor([[0.3, -1.0], [2.0, 5.0], [-0.5, 0.7], [0.1, -0.2], [9.0, 1.5]])
    terms = []
    for i, j in zip(*np.nonzero(~np.isnan(targets)), strict=True):
        p, y = torch.sigmoid(logits[i, j]).item(), targets[i, j]
        terms.append(-(weights[j] * y * np.log(p) + (1 - y) * np.log(1 - p)))
    got = task.build_loss(weights, "cpu")(logits, torch.tensor(targets)).item()
    assert got == pytest.approx(np.mean(terms), rel=1e-5)
    # No positive (or no negative) in the fold: weight 1, never inf.
    np.testing.assert_allclose(task.class_weights(np.zeros((4, 2))), [1.0, 1.0])


def test_probabilities_are_a_sigmoid_per_finding():
    logits = torch.tensor([[0.0, 2.0, -3.0]])
    probs = MultilabelTask(FINDINGS).probabilities(logits)
    torch.testing.assert_close(probs, torch.sigmoid(logits))


def test_masked_bootstrap_draw_equals_the_metrics_on_the_unmasked_images():
    targets, probs = scored_set(4, 50)
    known = np.ones(50, dtype=bool)
    known[::4] = False
    truth = targets[:, 0] == 1
    draw = metrics._binary_draws(truth, probs[:, 0], truth, 0.4, np.arange(50)[None], known)
    direct = metrics.binary_metrics(truth[known], probs[known, 0], probs[known, 0] >= 0.4)
    assert dict(zip(metrics.CI_METRICS, draw[0], strict=True)) == pytest.approx(
        {m: direct[m] for m in metrics.CI_METRICS}
    )


def test_bootstrap_gives_the_mean_and_every_finding():
    targets = np.tile(np.array([[0, 1, 0], [1, 0, 1]], dtype=np.float32), (20, 1))
    probs = np.where(targets == 1, 0.9, 0.1)
    ci = MultilabelTask(FINDINGS).bootstrap(targets, probs, resamples=100)
    assert ci["roc_auc"] == (1.0, 1.0)
    assert ci["roc_auc/Edema"] == (1.0, 1.0) and "sensitivity/Effusion" in ci


def test_a_multilabel_task_crosses_process_boundaries_unchanged():
    task = MultilabelTask(FINDINGS, ("ones", "ignore", "zeros"), ("zeros",) * 3, ("Edema",))
    assert pickle.loads(pickle.dumps(task)) == task
    adapter = TypeAdapter(AnyTask)
    assert adapter.validate_python(adapter.dump_python(task, mode="json")) == task


# --------------------------------------------------------------------------- built from a pool


def pool(positives: list[int], n: int = 40) -> np.ndarray:
    """(n, len(positives)) raw codes: finding j positive on its first positives[j] images."""
    raw = np.zeros((n, len(positives)), dtype=np.float32)
    for j, count in enumerate(positives):
        raw[:count, j] = 1
    return raw


def test_a_finding_rarer_than_the_folds_is_left_out_of_the_score(caplog):
    with caplog.at_level(logging.WARNING, logger="distmed.task"):
        task = multilabel_task(FINDINGS, pool([10, 3, 12]), folds=5)
    assert task.scored == ("Atelectasis", "Effusion")
    assert "'Edema' 3 positive" in caplog.text


def test_a_named_finding_too_rare_to_score_stops_the_run():
    with pytest.raises(UserError, match=r"data.score_findings.*'Edema' 3 positive"):
        multilabel_task(FINDINGS, pool([10, 3, 12]), score_findings=["Edema"], folds=5)
    with pytest.raises(UserError, match="data.score_findings: 'Pneumonia'"):
        multilabel_task(FINDINGS, pool([10, 9, 12]), score_findings=["Pneumonia"], folds=5)
    named = multilabel_task(FINDINGS, pool([10, 9, 12]), score_findings=["Edema"], folds=5)
    assert named.scored == ("Edema",)


def test_the_policy_decides_whether_a_finding_has_enough_positives():
    raw = pool([10, 2, 12])
    raw[2:8, 1] = -1  # six uncertain Edema labels
    assert "Edema" not in multilabel_task(FINDINGS, raw, folds=5).scored
    ones = multilabel_task(FINDINGS, raw, uncertain={"Edema": "ones"}, folds=5)
    assert ones.scored == FINDINGS and ones.uncertain == ("ignore", "ones", "ignore")
    with pytest.raises(UserError, match="data.uncertain: 'maybe' for 'Edema'"):
        multilabel_task(FINDINGS, raw, uncertain={"Edema": "maybe"}, folds=5)
    with pytest.raises(UserError, match="data.missing: 'Fracture'"):
        multilabel_task(FINDINGS, raw, missing={"Fracture": "zeros"}, folds=5)
    with pytest.raises(UserError, match="no finding"):
        multilabel_task(FINDINGS, pool([1, 2, 3]), folds=5)


def test_a_misspelt_finding_name_suggests_the_finding():
    """data.score_findings and the policy dicts say which finding a typo meant."""
    with pytest.raises(UserError, match=r"^data.score_findings: 'Edma' .*did you mean 'Edema'\?$"):
        multilabel_task(FINDINGS, pool([10, 9, 12]), score_findings=["Edma"], folds=5)
    with pytest.raises(
        UserError, match=r"^data.uncertain: 'effusion' .*did you mean 'Effusion'\?$"
    ):
        multilabel_task(FINDINGS, pool([10, 9, 12]), uncertain={"effusion": "ones"}, folds=5)
    with pytest.raises(UserError) as info:
        multilabel_task(FINDINGS, pool([10, 9, 12]), score_findings=["Pneumothorax"], folds=5)
    assert "did you mean" not in str(info.value)  # nothing close: no guess
