"""distmed.cv fold arithmetic: make_folds, fold_specs, check_batch_fits."""

from __future__ import annotations

import numpy as np
import pytest

from distmed.config import CVConfig, load_config
from distmed.cv import check_batch_fits, fold_specs, make_folds
from distmed.data import Split
from distmed.errors import UserError
from distmed.task import task_for


def split_of(labels, groups=None) -> Split:
    labels = np.asarray(labels, dtype=np.int64)
    return Split(
        ids=[f"s{i}" for i in range(len(labels))],
        labels=labels,
        groups=None if groups is None else np.asarray(groups, dtype=object),
    )


def imbalanced_split() -> Split:
    rng = np.random.default_rng(3)
    return split_of(rng.permutation([0] * 23 + [1] * 12 + [2] * 7))


def grouped_split() -> tuple[Split, np.ndarray]:
    """30 patients with 1-4 images each; a patient's images share its label."""
    rng = np.random.default_rng(7)
    labels, groups = [], []
    for patient in range(30):
        label = patient % 2
        for _ in range(rng.integers(1, 5)):
            labels.append(label)
            groups.append(f"patient{patient:02d}")
    order = rng.permutation(len(labels))
    return split_of(np.array(labels)[order], np.array(groups)[order]), np.array(groups)[order]


NAMES3 = ["a", "b", "c"]


def test_folds_are_disjoint_and_cover_every_sample():
    split = imbalanced_split()
    folds = make_folds(split, CVConfig(folds=5, seed=0), task_for(NAMES3))
    assert folds.shape == (1, len(split))  # one repeat
    assert folds.dtype == np.int64
    assignment = folds[0]
    # every sample is in exactly one fold: one fold number each, all in 0..k-1
    assert set(assignment.tolist()) == set(range(5))
    assert assignment.min() >= 0
    specs = fold_specs(assignment, 5)
    vals = [set(s["val"]) for s in specs]
    assert sum(len(v) for v in vals) == len(split)
    assert set().union(*vals) == set(range(len(split)))
    for i in range(5):
        for j in range(i + 1, 5):
            assert not vals[i] & vals[j]


def test_folds_are_stratified():
    split = imbalanced_split()
    folds = 5
    assignment = make_folds(split, CVConfig(folds=folds, seed=1), task_for(NAMES3))[0]
    totals = np.bincount(split.labels)
    for fold in range(folds):
        counts = np.bincount(split.labels[assignment == fold], minlength=3)
        for label in range(3):
            expected = totals[label] / folds
            assert abs(counts[label] - expected) <= 1, (fold, label, counts, expected)


def test_folds_are_reproducible_with_same_seed():
    split = imbalanced_split()
    first = make_folds(split, CVConfig(folds=4, seed=5), task_for(NAMES3))[0]
    second = make_folds(split, CVConfig(folds=4, seed=5), task_for(NAMES3))[0]
    assert np.array_equal(first, second)


def test_folds_differ_with_another_seed():
    split = imbalanced_split()
    first = make_folds(split, CVConfig(folds=4, seed=5), task_for(NAMES3))[0]
    other = make_folds(split, CVConfig(folds=4, seed=6), task_for(NAMES3))[0]
    assert not np.array_equal(first, other)


def test_grouped_folds_keep_patients_together():
    split, groups = grouped_split()
    assignment = make_folds(split, CVConfig(folds=5, seed=0), task_for(["neg", "pos"]))[0]
    assert set(assignment.tolist()) == set(range(5))
    for patient in set(groups.tolist()):
        assert len(set(assignment[groups == patient].tolist())) == 1, patient
    # both classes in every validation fold
    for fold in range(5):
        assert set(split.labels[assignment == fold].tolist()) == {0, 1}


def test_grouped_folds_are_reproducible():
    split, _ = grouped_split()
    first = make_folds(split, CVConfig(folds=3, seed=2), task_for(["neg", "pos"]))[0]
    second = make_folds(split, CVConfig(folds=3, seed=2), task_for(["neg", "pos"]))[0]
    assert np.array_equal(first, second)


def test_class_smaller_than_folds():
    split = split_of([0] * 10 + [1] * 3)
    with pytest.raises(UserError) as info:
        make_folds(split, CVConfig(folds=4), task_for(["common", "rare"]))
    message = str(info.value)
    assert "cv.folds" in message
    assert "'rare'" in message
    # exactly enough images works
    assert set(make_folds(split, CVConfig(folds=3), task_for(["common", "rare"]))[0].tolist()) == {
        0,
        1,
        2,
    }


def test_many_tiny_classes_ask_whether_the_labels_are_ids():
    """24 'classes' of 2 images: a label column holding patient ids. Lowering cv.folds, the
    usual advice, would train an id classifier (new-user try)."""
    names = [f"pt{k:02d}" for k in range(24)]
    ids = split_of([k for k in range(24) for _ in range(2)])
    with pytest.raises(UserError, match=r"24 of 24 classes are that small: are the labels ids"):
        make_folds(ids, CVConfig(folds=5), task_for(names))
    rare = split_of([0] * 10 + [1] * 3)  # one small class of two: the usual advice only
    with pytest.raises(UserError) as info:
        make_folds(rare, CVConfig(folds=4), task_for(["common", "rare"]))
    assert "ids" not in str(info.value) and "add images or lower cv.folds" in str(info.value)


def test_a_batch_larger_than_a_fold_says_where_to_change_it():
    with pytest.raises(UserError, match=r"=64 is larger .* \(51 images\); lower train.batch_size"):
        check_batch_fits(64, 51)
    # A value the space draws: --set cannot change a searched key, the space file can.
    with pytest.raises(UserError, match=r"=64 \(a value the space draws\).*space.train.batch_size"):
        check_batch_fits(64, 51, searched=True)
    check_batch_fits(51, 51)  # a batch of the whole fold fits


def test_too_few_patient_groups_for_folds():
    labels = [0] * 6 + [1] * 6
    groups = ["p1", "p1", "p2", "p2", "p3", "p3", "q1", "q1", "q1", "q2", "q2", "q2"]
    with pytest.raises(UserError) as info:
        make_folds(split_of(labels, groups), CVConfig(folds=3), task_for(["neg", "pos"]))
    assert "cv.folds" in str(info.value)
    assert "'pos'" in str(info.value)


def test_fold_specs_train_and_val_are_disjoint_complements():
    split = imbalanced_split()
    assignment = make_folds(split, CVConfig(folds=3, seed=0), task_for(NAMES3))[0]
    specs = fold_specs(assignment, 3)
    assert len(specs) == 3
    for k, spec in enumerate(specs):
        train, val = set(spec["train"]), set(spec["val"])
        assert not train & val
        assert train | val == set(range(len(split)))
        assert all(assignment[i] == k for i in val)
        assert spec["train"] == sorted(spec["train"])
        assert all(isinstance(i, int) for i in spec["train"] + spec["val"])


def test_fold_specs_by_hand():
    specs = fold_specs(np.array([1, 0, 1, 0, 2]), 3)
    assert specs == [
        {"train": [0, 2, 4], "val": [1, 3]},
        {"train": [1, 3, 4], "val": [0, 2]},
        {"train": [0, 1, 2, 3], "val": [4]},
    ]


def test_check_batch_fits():
    # 10 samples in 5 folds: every training set holds 8
    specs = fold_specs(np.repeat(np.arange(5), 2), 5)
    smallest = min(len(s["train"]) for s in specs)
    check_batch_fits(8, smallest)
    with pytest.raises(UserError) as info:
        check_batch_fits(9, smallest)
    assert "train.batch_size=9" in str(info.value)
    assert "8 images" in str(info.value)


def test_check_batch_fits_uses_smallest_fold():
    specs = fold_specs(np.array([0, 0, 0, 0, 1, 1]), 2)  # train sizes 2 and 4
    smallest = min(len(s["train"]) for s in specs)
    assert smallest == 2
    with pytest.raises(UserError, match="2 images"):
        check_batch_fits(3, smallest)


def test_a_mistyped_positive_class_stops_before_the_decode(tmp_path, monkeypatch):
    """It used to surface only after the whole data set was decoded (long, for a typo)."""
    from conftest import write_image_folder

    from distmed import cv
    from distmed.data import scan_source

    root = write_image_folder(tmp_path / "data", {"no": 6, "yes": 6})
    cfg = load_config(None, [f"data.root={root}", "data.positive_class=maybe", "cv.folds=2"])
    decoded = []
    monkeypatch.setattr(cv, "build_cache", lambda *a, **k: decoded.append(1))
    with pytest.raises(UserError, match="data.positive_class 'maybe' is not a class"):
        cv.prepare_data(cfg, scan_source(cfg.data))
    assert decoded == []


# --------------------------------------------------------------------------- cv.repeats


def test_repeated_folds_give_r_times_k_specs_in_repeat_major_order():
    split = imbalanced_split()
    folds = make_folds(split, CVConfig(folds=3, seed=0, repeats=2), task_for(NAMES3))
    assert folds.shape == (2, len(split))
    specs = fold_specs(folds, 3)
    assert len(specs) == 6
    for repeat in range(2):
        vals = [specs[repeat * 3 + f]["val"] for f in range(3)]
        # every sample is validated exactly once per repeat
        assert sorted(i for val in vals for i in val) == list(range(len(split)))
        for f, val in enumerate(vals):
            assert val == np.flatnonzero(folds[repeat] == f).tolist()
    assert not np.array_equal(folds[0], folds[1])  # another shuffle, not a copy


def test_repeat_zero_is_the_single_repeat_split_and_repeat_r_uses_seed_plus_r():
    from sklearn.model_selection import StratifiedKFold

    split = imbalanced_split()
    single = make_folds(split, CVConfig(folds=4, seed=5), task_for(NAMES3))
    repeated = make_folds(split, CVConfig(folds=4, seed=5, repeats=3), task_for(NAMES3))
    assert np.array_equal(repeated[0], single[0])
    assert fold_specs(repeated, 4)[:4] == fold_specs(single, 4)  # R=1 runs are unchanged
    for r in (1, 2):
        alone = make_folds(split, CVConfig(folds=4, seed=5 + r), task_for(NAMES3))[0]
        assert np.array_equal(repeated[r], alone)
    # ... and one repeat is exactly scikit-learn's shuffled StratifiedKFold with cv.seed
    pieces = StratifiedKFold(4, shuffle=True, random_state=5).split(split.labels, split.labels)
    for fold, (_, val) in enumerate(pieces):
        assert np.flatnonzero(single[0] == fold).tolist() == sorted(val.tolist())


def test_grouped_repeats_never_split_a_patient_across_train_and_val():
    split, groups = grouped_split()
    folds = make_folds(split, CVConfig(folds=4, seed=0, repeats=3), task_for(["neg", "pos"]))
    assert len({tuple(row) for row in folds.tolist()}) == 3  # the repeats differ
    for spec in fold_specs(folds, 4):
        train, val = set(groups[spec["train"]]), set(groups[spec["val"]])
        assert not train & val
        assert set(split.labels[spec["val"]].tolist()) == {0, 1}


def test_a_fold_without_a_class_in_a_later_repeat_names_the_repeat(monkeypatch):
    """The class check holds per repeat: repeat 1 here gets an unstratified split."""
    from sklearn.model_selection import KFold, StratifiedKFold

    from distmed import cv

    class UnstratifiedForSeed1:
        def __init__(self, n_splits: int, shuffle: bool, random_state: int):
            self.n_splits, self.seed = n_splits, random_state

        def split(self, x, y):
            if self.seed == 1:  # sorted labels, unshuffled: fold 0 holds only class 0
                return KFold(self.n_splits).split(x)
            return StratifiedKFold(self.n_splits, shuffle=True, random_state=self.seed).split(x, y)

    monkeypatch.setattr(cv, "StratifiedKFold", UnstratifiedForSeed1)
    split = split_of([0] * 6 + [1] * 6)
    assert make_folds(split, CVConfig(folds=3, seed=0), task_for(["neg", "pos"])).shape == (1, 12)
    with pytest.raises(
        UserError, match="cv fold 0 of repeat 1 has no validation image of class pos"
    ):
        make_folds(split, CVConfig(folds=3, seed=0, repeats=2), task_for(["neg", "pos"]))


@pytest.mark.parametrize("value", [0, 21])
def test_cv_repeats_out_of_range_names_the_key(value):
    with pytest.raises(UserError, match=r"cv\.repeats"):
        load_config(None, [f"cv.repeats={value}"])


def test_cv_repeats_default_is_one():
    assert load_config(None).cv.repeats == 1
