"""distmed.task: which task a data set is, and what each task decides, scores and trains on."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from distmed.config import load_config
from distmed.errors import UserError
from distmed.task import BinaryTask, MulticlassTask, task_for


def positive_index(cfg, names) -> int | None:
    task = task_for(names, cfg.data.positive_class)
    return task.positive if isinstance(task, BinaryTask) else None


def test_positive_index_default_is_second_class():
    assert positive_index(load_config(None), ["benign", "malignant"]) == 1


def test_positive_index_by_name():
    cfg = load_config(None, ["data.positive_class=benign"])
    assert positive_index(cfg, ["benign", "malignant"]) == 0
    cfg = load_config(None, ["data.positive_class=malignant"])
    assert positive_index(cfg, ["benign", "malignant"]) == 1


def test_positive_index_unknown_name():
    cfg = load_config(None, ["data.positive_class=tumour"])
    with pytest.raises(UserError) as info:
        positive_index(cfg, ["benign", "malignant"])
    assert "data.positive_class" in str(info.value)
    assert "tumour" in str(info.value)


def test_positive_index_multiclass_is_none():
    assert positive_index(load_config(None), ["a", "b", "c"]) is None


# --------------------------------------------------------------------------- the contract

PROBS = np.array([[0.8, 0.2], [0.3, 0.7], [0.55, 0.45], [0.1, 0.9]])
LABELS = np.array([0, 1, 1, 0])


@pytest.mark.parametrize("positive", [0, 1])
def test_binary_scores_rank_by_the_positive_class(positive):
    task = BinaryTask(("benign", "malignant"), positive)
    got = task.metrics(LABELS, PROBS)
    assert got["roc_auc"] == pytest.approx(
        skm.roc_auc_score(positive == LABELS, PROBS[:, positive])
    )
    assert task.positive_class == ("benign", "malignant")[positive]
    assert task.thresholded and task.num_outputs == 2


def test_binary_decides_at_its_threshold_and_by_argmax_without_one():
    task = BinaryTask(("a", "b"), 1)
    np.testing.assert_array_equal(task.decide(PROBS), [0, 1, 0, 1])
    np.testing.assert_array_equal(task.decide(PROBS, 0.4), [0, 1, 1, 1])
    np.testing.assert_array_equal(BinaryTask(("a", "b"), 0).decide(PROBS, 0.5), [0, 1, 0, 1])
    at = task.metrics_at(LABELS, PROBS, 0.4)
    assert at["sensitivity"] == 1.0 and at["specificity"] == 0.5


def test_multiclass_decides_by_argmax_and_scores_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 60)
    labels = rng.integers(0, 3, 60)
    task = MulticlassTask(("a", "b", "c"))
    assert not task.thresholded
    np.testing.assert_array_equal(task.decide(probs, 0.9), probs.argmax(axis=1))
    expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert task.metrics(labels, probs)["roc_auc"] == pytest.approx(expected)
    assert [c.name for c in task.curves(labels, probs)] == ["a", "b", "c"]


def test_loss_and_nll_are_the_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    task = MulticlassTask(("a", "b", "c"))
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert task.build_loss(None, "cpu")(logits, labels).item() == pytest.approx(expected)
    probs = task.probabilities(logits).numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert task.nll(labels.numpy(), probs) == pytest.approx(expected, rel=1e-5)
    weighted = task.build_loss(np.array([1.0, 2.0, 3.0]), "cpu")
    assert weighted.weight.tolist() == [1.0, 2.0, 3.0]


def test_folds_are_stratified_on_the_class():
    labels = np.array([0, 1, 1, 0, 1])
    np.testing.assert_array_equal(BinaryTask(("a", "b")).stratify_key(labels), labels)


def test_binary_bootstrap_matches_its_point_estimate_on_a_separable_set():
    labels = np.array([0] * 20 + [1] * 20)
    p1 = np.r_[np.linspace(0.0, 0.4, 20), np.linspace(0.6, 1.0, 20)]
    probs = np.stack([1 - p1, p1], axis=1)
    ci = BinaryTask(("a", "b")).bootstrap(labels, probs, resamples=200)
    assert ci["roc_auc"] == (1.0, 1.0) and ci["accuracy"] == (1.0, 1.0)


def test_a_task_crosses_process_boundaries_unchanged():
    for task in (BinaryTask(("a", "b"), 0), MulticlassTask(("x", "y", "z"))):
        assert pickle.loads(pickle.dumps(task)) == task
