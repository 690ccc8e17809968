"""Folds and the cross-validated run: make_folds (stratified / grouped, seeded), cross_validate.

Folds are index arithmetic over the CV pool, identical for every trial with the same
`cv.seed`; `cv.repeats` > 1 repeats the k-fold split with seeds `cv.seed + r`.
`cross_validate` runs one `TorchTrainer` fit that trains all folds (`distmed.worker`
hosts `distmed.loop` in Ray Train) and turns rank 0's return value into a `CVResult`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold  # type: ignore[import-untyped]
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from distmed import _ray_compat
from distmed.artifacts import check_free_space, delete_partial_checkpoints, registered_checkpoints
from distmed.config import CVConfig, ExperimentConfig
from distmed.cvstats import corrected_standard_error
from distmed.data import CachedData, DataIndex, Split, build_cache, drop_samples
from distmed.data.stream import STREAM_CHANNELS, StreamSpec, split_stream
from distmed.data.streamindex import write_plan_arrays
from distmed.errors import UserError, shorten
from distmed.fitcallbacks import StopOnUserError
from distmed.loop import checkpoint_bytes
from distmed.metrics import METRIC_NAMES
from distmed.resources import WorkerLayout
from distmed.task.base import Task
from distmed.task.factory import task_of_index
from distmed.task.multilabel import FINDING_AUC_PREFIX as FINDING
from distmed.task.multilabel import MULTILABEL_LOSS_REFUSAL, MultilabelTask
from distmed.uris import shown
from distmed.worker import STATE_FILE, FoldIndices, WorkerConfig, train_folds

log = logging.getLogger(__name__)
# Fewer validation images of a class than this in a fold make that fold's ROC-AUC close to
# a coin toss: with one positive it is the rank of that single image among the negatives.
MIN_VALIDATION_IMAGES = 5
# Retries of a worker group that did not start in time (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
# see resources.bound_ray_waits); Ray Train's default is to retry without end.
START_RETRIES = 2


@dataclass(frozen=True)
class FoldResult:
    fold: int  # 0..R*k-1, repeat-major: repeat fold // k, fold fold % k of that repeat
    stop_epoch: int
    metrics: dict[str, float]  # validation metrics at the epoch the training rule stopped at
    history: list[dict[str, float]]
    # Out-of-fold predictions at the stopping epoch: CV-pool positions, labels (class indices;
    # a multi-label task's (N, L) targets, NaN ignored), probabilities (N, K or L).
    val_indices: list[int] = field(default_factory=list)
    val_labels: list[int] | list[list[float]] = field(default_factory=list)
    val_probs: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class CVResult:
    folds: list[FoldResult]
    precision: str
    device: str
    world_size: int
    checkpoint_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    folds_per_repeat: int | None = None  # k of `cv.repeats` x k folds; None: one repeat

    @property
    def repeats(self) -> int:
        return len(self.folds) // (self.folds_per_repeat or len(self.folds))

    @property
    def fold_aucs(self) -> list[float]:
        return [f.metrics["roc_auc"] for f in self.folds]

    @property
    def diverged_folds(self) -> list[int]:
        """Folds whose loss became NaN/inf (their metrics are NaN)."""
        return [f.fold for f in self.folds if f.history and f.history[-1].get("diverged")]

    @property
    def mean_roc_auc(self) -> float:
        return float(np.mean(self.fold_aucs))

    @property
    def std_roc_auc(self) -> float:
        return float(np.std(self.fold_aucs))

    @property
    def constant_folds(self) -> list[int]:
        """Folds whose model gave every validation image the same probabilities (to 1e-6):
        their ROC-AUC of 0.5 is a tie by construction, not a chance-level ranking (e.g. a
        net from random init whose BatchNorm statistics are still their initial values)."""
        return [
            f.fold
            for f in self.folds
            if len(f.val_probs) > 1 and float(np.ptp(np.asarray(f.val_probs), axis=0).max()) <= 1e-6
        ]

    @property
    def se_roc_auc(self) -> float:
        """Standard error of `mean_roc_auc` (`cvstats.corrected_standard_error`)."""
        return corrected_standard_error(self.fold_aucs, self.folds_per_repeat or len(self.folds))

    def mean_metrics(self) -> dict[str, float]:
        """Fold means of `METRIC_NAMES`, and of every per-finding AUC a multi-label task
        records (`task.finding_auc_key`)."""
        names = [*METRIC_NAMES, *(k for k in self.folds[0].metrics if k.startswith(FINDING))]
        return {
            name: float(np.mean([f.metrics.get(name, math.nan) for f in self.folds]))
            for name in names
        }


def make_folds(split: Split, cfg: CVConfig, task: Task) -> np.ndarray:
    """Fold numbers, shape (cv.repeats, N): row r gives each sample's fold (0..k-1) in repeat r.

    Stratified on the task's key (`Task.stratify_key`: the class; several findings per
    image: an (N, L) 0/1 key, `_multilabel_folds`), and grouped (a patient's images share a
    fold) when groups exist. Repeat r shuffles with seed `cv.seed + r`, so row 0 is the
    single-repeat assignment.

    Raises:
        UserError: a class has fewer images (or patients) than cv.folds, or some repeat's
            fold has no validation image of a class; several findings: see
            `_multilabel_folds`.
    """
    key = task.stratify_key(split.labels)
    if key.ndim == 2:
        return _multilabel_folds(split, key, cfg, task)
    class_names = list(task.class_names)
    counts = np.bincount(split.labels, minlength=len(class_names))
    for name, count in zip(class_names, counts, strict=True):
        if count < cfg.folds:
            raise UserError(
                f"class {name!r} has {count} image(s), fewer than cv.folds={cfg.folds}; "
                f"{_few_images_advice(counts, cfg.folds)}"
            )
    if split.groups is not None:
        _check_groups(split, cfg, class_names)
    repeats = [_one_repeat(split, key, cfg, class_names, r) for r in range(cfg.repeats)]
    return np.stack(repeats)


# Most classes this small: the labels are more likely identifiers than diagnoses.
ID_LIKE_SHARE = 0.5
ID_LIKE_MIN_CLASSES = 10


def _few_images_advice(counts: np.ndarray, folds: int) -> str:
    """What to do about a class smaller than the folds. When most of many classes are that
    small, the label is more likely a patient or image id than a diagnosis (new-user try: a
    manifest whose `label` column held patient ids read as 24 classes of 2 images), and
    lowering cv.folds would train an id classifier: say so first."""
    small = int((counts < folds).sum())
    if len(counts) >= ID_LIKE_MIN_CLASSES and small >= ID_LIKE_SHARE * len(counts):
        return (
            f"{small} of {len(counts)} classes are that small: are the labels ids (patient, "
            "study)? the `label` column (or class folder) must name the diagnosis; else add "
            "images or lower cv.folds"
        )
    return "add images or lower cv.folds"


def _multilabel_folds(split: Split, key: np.ndarray, cfg: CVConfig, task: Task) -> np.ndarray:
    """(cv.repeats, N) folds stratified on several findings at once, patients kept whole.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas 2011, "On the Stratification of
    Multi-Label Data", ECML PKDD; `iterstrat.ml_stratifiers.MultilabelStratifiedKFold`) over
    patients: a patient's key is the max over its images (positive for a finding when any of
    its images is), its fold is every image's fold. Without groups each image is its own
    unit. Repeat r is seeded `cv.seed + r`.

    A finding with fewer positive patients than folds cannot have one in every fold: it is
    not checked here (the task leaves it out of the score). Every scored finding
    (`task.scored`, default all) with at least cv.folds positive patients has a positive
    image in every validation fold, or the run stops.

    Raises:
        UserError: fewer patients (images) than cv.folds, or a scored finding with enough
            positive patients but none in some fold.
    """
    positive = np.asarray(key) > 0
    units, unit_of = _units(split)
    if len(units) < cfg.folds:
        what = "patient groups" if split.groups is not None else "images"
        raise UserError(
            f"the CV pool has {len(units)} {what}, fewer than cv.folds={cfg.folds}; add images "
            "or lower cv.folds"
        )
    unit_key = np.zeros((len(units), positive.shape[1]), dtype=bool)
    np.logical_or.at(unit_key, unit_of, positive)  # a patient is positive where any image is
    # iterstrat wants a multilabel-indicator target (two columns or more): a lone finding gets
    # an all-negative partner, which changes no fold (a label without positives is skipped).
    target = unit_key if unit_key.shape[1] > 1 else np.hstack([unit_key, np.zeros_like(unit_key)])
    rows = []
    for repeat in range(cfg.repeats):
        splitter = MultilabelStratifiedKFold(
            n_splits=cfg.folds, shuffle=True, random_state=cfg.seed + repeat
        )
        unit_fold = np.full(len(units), -1, dtype=np.int64)
        for fold, (_, val_units) in enumerate(splitter.split(np.zeros(len(units)), target)):
            unit_fold[val_units] = fold
        assignment = unit_fold[unit_of]
        _check_finding_folds(positive, unit_key, assignment, cfg, task, repeat)
        rows.append(assignment)
    return np.stack(rows)


def _units(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The units folds are drawn over (patients, sorted; else the images) and each image's."""
    if split.groups is None:
        return np.arange(len(split)), np.arange(len(split))
    units, unit_of = np.unique(np.asarray(split.groups, dtype=str), return_inverse=True)
    return units, unit_of.ravel()


def _check_finding_folds(
    positive: np.ndarray,
    unit_key: np.ndarray,
    assignment: np.ndarray,
    cfg: CVConfig,
    task: Task,
    repeat: int,
) -> None:
    """Every scored finding with >= cv.folds positive patients has a positive in every
    validation fold (iterative stratification nearly always gives it; it does not promise)."""
    names = list(task.class_names)
    scored = set(getattr(task, "scored", names))
    for j, name in enumerate(names):
        if name not in scored or unit_key[:, j].sum() < cfg.folds:
            continue
        empty = [k for k in range(cfg.folds) if not positive[assignment == k, j].any()]
        if empty:
            where = f"cv fold {empty[0]}" + (f" of repeat {repeat}" if cfg.repeats > 1 else "")
            raise UserError(
                f"{where} has no validation image positive for finding {name!r} "
                f"({int(unit_key[:, j].sum())} positive patients or images over "
                f"{cfg.folds} folds); lower cv.folds, change cv.seed or leave {name!r} out "
                "of data.score_findings"
            )


def _one_repeat(
    split: Split, key: np.ndarray, cfg: CVConfig, class_names: list[str], repeat: int
) -> np.ndarray:
    """Fold number per sample of one k-fold split stratified on `key`, shuffled with seed
    `cv.seed + repeat`."""
    seed = cfg.seed + repeat
    assignment = np.full(len(split), -1, dtype=np.int64)
    if split.groups is not None:
        splitter = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=seed)
        pieces = splitter.split(np.zeros(len(split)), key, split.groups)
    else:
        splitter = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=seed)
        pieces = splitter.split(np.zeros(len(split)), key)
    for fold, (_, val_idx) in enumerate(pieces):
        assignment[val_idx] = fold
    for fold in range(cfg.folds):
        missing = set(range(len(class_names))) - set(split.labels[assignment == fold])
        if missing:
            names = ", ".join(class_names[c] for c in sorted(missing))
            where = f"cv fold {fold}" + (f" of repeat {repeat}" if cfg.repeats > 1 else "")
            raise UserError(
                f"{where} has no validation image of class {names} (too few patients "
                "per class for the grouping); lower cv.folds"
            )
    return assignment


def _check_groups(split: Split, cfg: CVConfig, class_names: list[str]) -> None:
    for label, name in enumerate(class_names):
        patients = len(set(split.groups[split.labels == label]))
        if patients < cfg.folds:
            raise UserError(
                f"class {name!r} has images from {patients} patient group(s), fewer than "
                f"cv.folds={cfg.folds}; lower cv.folds or check data.group_*"
            )


def thin_validation_folds(
    labels: np.ndarray, assignment: np.ndarray, class_names: list[str], folds: int
) -> str | None:
    """A warning when some validation fold holds fewer than MIN_VALIDATION_IMAGES images of
    a class, else None.

    Such a fold's ROC-AUC rests on those few images: with one positive it is the share of
    negatives ranked below that one image (0 or 1 when the model separates it), so the fold
    scores, their mean and their standard error say little. `assignment`: `make_folds`'
    (R, N) fold numbers; `labels`: the pool's `Task.stratify_key`, (N,) class indices or,
    for several findings per image, (N, L) 0/1 (a finding's positive images are counted).
    """
    rows = np.atleast_2d(assignment)
    labels = np.asarray(labels)
    parts = []
    for label, name in enumerate(class_names):
        hit = labels[:, label] > 0 if labels.ndim == 2 else labels == label
        counts = [int(np.sum(hit[row == k])) for row in rows for k in range(folds)]
        thin = sum(c < MIN_VALIDATION_IMAGES for c in counts)
        if thin:
            shown = ", ".join(map(str, counts[:10])) + (", ..." if len(counts) > 10 else "")
            what = "positive images of finding" if labels.ndim == 2 else "images of class"
            parts.append(f"{thin} of {len(counts)} hold fewer than {MIN_VALIDATION_IMAGES} "
                         f"{what} {shorten(name)} ({shown})")  # fmt: skip
    if not parts:
        return None
    return (
        f"validation folds: {'; '.join(parts)}. A fold's ROC-AUC on so few images is nearly "
        "a coin toss, so the CV score and its SE say little; add images of that class or "
        "lower cv.folds"
    )


def gaps_in_test_split(index: DataIndex, task: Task | None = None) -> str | None:
    """A warning when the test split lacks a class or holds fewer than MIN_VALIDATION_IMAGES
    of one (its test metrics for that class are then undefined or rest on a few images);
    None when every class is there or there is no test split. A multi-label `task` counts
    each finding's positives after its policies."""
    if index.test is None or len(index.test) == 0:
        return None
    if isinstance(task, MultilabelTask):
        counts = task.stratify_key(index.test.labels).sum(axis=0)
    else:
        counts = np.bincount(index.test.labels, minlength=len(index.class_names))
    missing = [shorten(n) for n, c in zip(index.class_names, counts, strict=True) if c == 0]
    few = [
        f"{shorten(n)} ({c})"
        for n, c in zip(index.class_names, counts, strict=True)
        if 0 < c < MIN_VALIDATION_IMAGES
    ]
    parts = []
    what = "positive image of finding" if index.multilabel else "image of class"
    if missing:
        parts.append(
            f"has no {what} {', '.join(missing)}: its test ROC-AUC (and that class's "
            "sensitivity or specificity) is undefined, null in the results"
        )
    if few:
        of = "positive images of finding" if index.multilabel else "images of"
        parts.append(f"holds fewer than {MIN_VALIDATION_IMAGES} {of} {', '.join(few)}")
    if not parts:
        return None
    return f"the test split ({len(index.test)} images) {'; '.join(parts)}"


def score_caveat(
    fold_aucs: Sequence[float], thin_folds: str | None, constant_folds: Sequence[int] = ()
) -> str | None:
    """What a CV score line must add to stay honest: how many folds had a defined ROC-AUC,
    which folds' model predicted one value for every image (`CVResult.constant_folds`), and
    that the folds hold too few images of a class (`thin_validation_folds`)."""
    finite = sum(math.isfinite(a) for a in fold_aucs)
    notes = []
    if finite < len(fold_aucs):
        notes.append(f"only {finite} of {len(fold_aucs)} folds have a defined ROC-AUC")
    if constant_folds:
        folds = ", ".join(str(k + 1) for k in constant_folds)
        notes.append(
            f"fold(s) {folds} gave every validation image the same probability: the model "
            "learned nothing there, its 0.5 is a tie (train longer, check optim.lr; from "
            "random init set train.precise_bn_images, see docs/training.md)"
        )
    if thin_folds is not None:
        notes.append(
            f"folds hold fewer than {MIN_VALIDATION_IMAGES} images of a class (see the "
            "warning before training): fold ROC-AUCs near 0 or 1 and a small SE there are "
            "chance, not precision"
        )
    return f"caution: {'; '.join(notes)}" if notes else None


def finding_auc_text(task: MultilabelTask, means: dict[str, float]) -> str:
    """One line of a multi-label CV result: the score is the mean over the scored findings,
    then each finding's fold-mean ROC-AUC (`CVResult.mean_metrics`), unscored ones marked."""
    parts = [
        f"{shorten(name)} {means.get(FINDING + name, math.nan):.4f}"
        + ("" if name in task.scored else " (not scored)")
        for name in task.class_names
    ]
    return (
        f"the CV ROC-AUC is the mean over {len(task.scored)} scored finding(s); per finding: "
        + ", ".join(parts)
    )


def fold_specs(assignment: np.ndarray, folds: int) -> list[dict[str, list[int]]]:
    """Train/validation index lists per fold (what the worker loop consumes).

    `assignment`: `make_folds`' (R, N) fold numbers, or one repeat's (N,). Returns R * k
    specs in repeat-major order: spec r * k + f is fold f of repeat r.
    """
    rows = np.atleast_2d(assignment)
    positions = np.arange(rows.shape[1])
    return [
        {"train": positions[row != k].tolist(), "val": positions[row == k].tolist()}
        for row in rows
        for k in range(folds)
    ]


def check_batch_fits(batch_size: int, smallest_train_fold: int, searched: bool = False) -> None:
    """Refuse a batch larger than a fold's training set. `searched`: the value is one the
    space draws, which `--set` cannot change (the fix is in the space file).

    Raises:
        UserError: one line naming the value, the fold's size and where to change it.
    """
    if batch_size > smallest_train_fold:
        source, fix = (
            (" (a value the space draws)", "narrow space.train.batch_size in a copy of the space")
            if searched
            else ("", "lower train.batch_size")
        )
        raise UserError(
            f"train.batch_size={batch_size}{source} is larger than the smallest fold's "
            f"training set ({smallest_train_fold} images); {fix}"
        )


@dataclass(frozen=True)
class FoldPlan:
    """What the workers train on: decoded images, labels, and train/val indices per fold.

    Plain data so it crosses process boundaries (Ray `train_loop_config`, Tune parameters).
    `images_ref` is set on a cluster (`share_images`): workers on nodes that lack the cache
    file at `images_path` read the decoded images from Ray's object store instead.
    """

    images_path: str
    labels: list[int] | list[list[float]]  # `Task.targets` of the pool (multi-label: NaN ignored)
    task: Task
    folds: list[dict[str, list[int]]]  # cv.repeats x k of them, repeat-major (`fold_specs`)
    images_ref: Any = None
    folds_per_repeat: int | None = None  # k; None: `folds` are one repeat
    stream: StreamSpec | None = None  # data.loader stream: no cache, `images_path` is ""

    def smallest_train_fold(self) -> int:
        return min(len(f["train"]) for f in self.folds)


def plan_folds(
    cfg: ExperimentConfig,
    index: DataIndex,
    cache: CachedData,
    assignment: np.ndarray,
    task: Task | None = None,
) -> FoldPlan:
    """The (repeated) k-fold plan over the CV pool (the test split never enters it).

    `task`: the pool's task (`task_of_index`, built when not given); the plan's labels are its
    `targets` of the pool (a multi-label task's policies applied once, here)."""
    task = task or task_of_index(index, cfg.data, cfg.cv.folds)
    return FoldPlan(
        images_path=str(cache.pool_path),
        labels=task.targets(index.pool.labels).tolist(),
        task=task,
        folds=fold_specs(assignment, cfg.cv.folds),
        folds_per_repeat=cfg.cv.folds,
    )


@dataclass(frozen=True)
class PreparedData:
    """A source made ready for training: index, decoded cache, fold assignment and plan."""

    index: DataIndex
    cache: CachedData | None  # None: data.loader stream decodes in the workers
    assignment: np.ndarray  # (cv.repeats, N) fold numbers, `make_folds`
    plan: FoldPlan
    thin_folds: str | None = None  # `thin_validation_folds`' warning
    test_gaps: str | None = None  # `gaps_in_test_split`' warning
    test_stream: StreamSpec | None = None  # data.loader stream: the test split's files


def held_out_images(data: PreparedData) -> Path | StreamSpec | None:
    """The test split to score: its decoded cache file, its stream, or None (no split)."""
    return data.cache.test_path if data.cache is not None else data.test_stream


def trained_channels(data: PreparedData) -> int:
    """Channels of the images the model trains from (`savedmodel.preprocessing_for`): the
    cache's (1 for an all-grey set, else 3), or a streamed row's."""
    return data.cache.channels if data.cache is not None else STREAM_CHANNELS


def prepare_data(
    cfg: ExperimentConfig, scanned: DataIndex, batch_sizes: Sequence[int] = ()
) -> PreparedData:
    """Folds and the decoded cache of a scanned source; unreadable files left out if asked.

    Every data problem surfaces here, before Ray starts; fold problems before the (slow)
    first decode. `batch_sizes`: every batch size a search draws (a refusal then points at
    the space); empty: `cfg.train.batch_size` is the one checked.
    """
    # A typo (data.positive_class, a finding's name) stops before the decode.
    task = task_of_index(scanned, cfg.data, cfg.cv.folds)
    if scanned.multilabel and cfg.train.sampler == "balanced":
        # The sampler weights one class per image; said here, not inside a Ray worker.
        raise UserError(
            "train.sampler: balanced draws by class, and these images have several findings; "
            "use train.sampler: shuffle with train.class_weights: balanced (per-finding pos_weight)"
        )
    if scanned.multilabel and (cfg.train.loss != "cross_entropy" or cfg.train.label_smoothing):
        raise UserError(MULTILABEL_LOSS_REFUSAL)
    assignment = make_folds(scanned.pool, cfg.cv, task)
    said = _warn_few_images(scanned, assignment, cfg.cv.folds, task)  # before the slow decode
    if cfg.data.loader == "stream":
        if scanned.multilabel:
            raise UserError(
                "data.loader: stream reads one label per image in this version; for several "
                "findings per image use data.loader: cache"
            )
        return _prepare_stream(cfg, scanned, assignment, batch_sizes, said)
    cache = build_cache(scanned, cfg.data)
    index = drop_samples(scanned, cache.skipped)
    if index.skipped:
        names = ", ".join(list(index.skipped)[:5])
        log.warning(
            "data.skip_invalid: left out %d unreadable image file(s): %s%s",
            len(index.skipped),
            names,
            " ..." if len(index.skipped) > 5 else "",
        )
        assignment = make_folds(index.pool, cfg.cv, task)
    plan = plan_folds(cfg, index, cache, assignment, task)
    for size in batch_sizes or [cfg.train.batch_size]:
        check_batch_fits(size, plan.smallest_train_fold(), searched=bool(batch_sizes))
    if cfg.cv.repeats > 1:
        repeats, k = cfg.cv.repeats, cfg.cv.folds
        log.info(
            "cv.repeats=%d: every run trains %d x %d = %d folds, %d times the compute of "
            "one %d-fold CV",
            *(repeats, repeats, k, repeats * k, repeats, k),
        )
    thin, gaps = (
        said if index is scanned else _warn_few_images(index, assignment, cfg.cv.folds, task)
    )
    return PreparedData(index, cache, assignment, plan, thin, gaps)


def _prepare_stream(
    cfg: ExperimentConfig,
    index: DataIndex,
    assignment: np.ndarray,
    batch_sizes: Sequence[int],
    said: tuple[str | None, str | None],
) -> PreparedData:
    """The plan of a streamed run: folds and file names, nothing decoded here (the workers'
    Ray Data tasks decode, `distmed.data.stream`)."""
    options, cpus = cfg.data.decode_settings(), cfg.data.stream_decode_cpus
    stream = split_stream(index.pool, options, cpus, index.name)
    test = None if index.test is None else split_stream(index.test, options, cpus, index.name)
    plan = FoldPlan(
        images_path="",
        labels=index.pool.labels.tolist(),
        task=task_of_index(index, cfg.data, cfg.cv.folds),
        folds=fold_specs(assignment, cfg.cv.folds),
        folds_per_repeat=cfg.cv.folds,
        stream=stream,
    )
    for size in batch_sizes or [cfg.train.batch_size]:
        check_batch_fits(size, plan.smallest_train_fold(), searched=bool(batch_sizes))
    return PreparedData(index, None, assignment, plan, *said, test_stream=test)


def _warn_few_images(
    index: DataIndex, assignment: np.ndarray, folds: int, task: Task
) -> tuple[str | None, str | None]:
    """Log `thin_validation_folds`' and `gaps_in_test_split`' warnings (once per run, before
    training; the results keep them too) and return them."""
    key = task.stratify_key(index.pool.labels)
    thin = thin_validation_folds(key, assignment, index.class_names, folds)
    gaps = gaps_in_test_split(index, task)
    for warning in (thin, gaps):
        if warning is not None:
            log.warning(warning)
    return thin, gaps


def share_images(plan: FoldPlan) -> FoldPlan:
    """The plan with its decoded images in Ray's object store, for workers on other nodes.

    The cache file exists only on the node that built it (the driver's); Ray copies the
    object to each node that reads it, once per node.
    """
    if plan.stream is not None:  # nothing decoded to share: every node decodes its own
        return plan
    images = np.load(plan.images_path)  # a plain array: a memory map would be copied anyway
    return replace(plan, images_ref=ray.put(images))


def cross_validate(
    cfg: ExperimentConfig,
    plan: FoldPlan,
    layout: WorkerLayout,
    storage: str | Path,
    run_name: str,
    callbacks: Sequence[Any] = (),
    detail_uri: str | None = None,
) -> CVResult:
    """Train every fold of `plan` with one Ray Train fit; collect each fold's final metrics.

    Reusing `run_name` under the same `storage` resumes that run from its last checkpoint.
    `callbacks` are Ray Train callbacks (Tune's report callback inside a trial).
    `detail_uri`: a folder where rank 0 keeps the per-fold histories and out-of-fold
    predictions up to date every epoch (see `distmed.results.write_trial_detail`).
    """
    check_batch_fits(cfg.train.batch_size, plan.smallest_train_fold())
    result = fit_folds(cfg, plan, layout, storage, run_name, callbacks, detail_uri)
    return _to_cv_result(result.return_value, result.checkpoint, plan.folds_per_repeat)


def fit_folds(
    cfg: ExperimentConfig,
    plan: FoldPlan,
    layout: WorkerLayout,
    storage: str | Path,
    run_name: str,
    callbacks: Sequence[Any] = (),
    detail_uri: str | None = None,
):
    """One `TorchTrainer` fit of `distmed.worker.train_folds` over the plan's folds."""
    uri = storage_uri(storage)
    if plan.stream is None:
        labels, folds, arrays = plan.labels, [FoldIndices(**spec) for spec in plan.folds], None
    else:  # per-image lists as files in storage, not in the store
        plan = replace(plan, stream=plan.stream.published(uri))
        labels, folds, arrays = [], [], write_plan_arrays(plan.labels, plan.folds, uri)
    trainer = TorchTrainer(
        # Ray's annotation wants None back; Ray Train v2 returns rank 0's value.
        train_folds,  # type: ignore[arg-type]
        train_loop_config=WorkerConfig(
            config=cfg,
            images_path=plan.images_path,
            images_ref=plan.images_ref,
            labels=labels,
            task=plan.task,
            folds=folds,
            folds_per_repeat=plan.folds_per_repeat,
            threads=layout.threads,
            detail_uri=detail_uri,
            stream=plan.stream,
            plan_arrays=arrays,
        ).to_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=layout.num_workers,
            use_gpu=layout.use_gpu,
            resources_per_worker=layout.resources_per_worker,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=uri,
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # k models + optimisers each
            failure_config=FailureConfig(
                max_failures=layout.max_failures,
                # A worker group that cannot start is retried this often, not forever.
                # ray.train picks its v2 classes at import time; mypy sees the v1 one.
                controller_failure_limit=START_RETRIES,  # type: ignore[call-arg]
            ),
            callbacks=[*callbacks, StopOnUserError()],  # type: ignore[list-item]  # v2 (above)
        ),
    )
    if "://" not in uri:  # what an earlier, failed write of this run left half-written
        for name in delete_partial_checkpoints(Path(uri) / run_name):
            log.warning(
                "removed checkpoint %s of an earlier attempt: Ray Train never registered it "
                "(written during a failure or after a Ctrl-C), so no resume can read it",
                name,
            )
        need = checkpoint_bytes(cfg, plan.task.num_outputs, len(plan.folds))
        check_free_space(Path(uri), need, "the results folder")
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except ray.train.TrainingFailedError as exc:  # Train V2 raises it from fit()
        explained = explain_fit_error(exc, layout)
        if explained is exc:
            raise
        raise explained from exc
    return result


def interrupted_fit_text(storage: str | Path, run_name: str) -> str:
    """What a Ctrl-C'd fit in `storage/run_name` keeps, for `distmed.train`'s one line: Ray
    Train resumes from the last checkpoint it registered (its snapshot, read here for a local
    folder), which rerunning the same command into the same output does."""
    uri = storage_uri(storage)
    where = shown(f"{uri.rstrip('/')}/{run_name}")
    if "://" in uri:
        return f"training stopped; rerun the same command to resume from its checkpoint in {where}"
    _, latest = registered_checkpoints(Path(uri) / run_name)
    if latest is None:
        return (
            "training stopped before its first checkpoint was registered: rerunning the "
            "same command starts again from epoch 1"
        )
    return (
        f"training stopped; epoch {latest.get('epoch', '?')} is saved in {where}: rerun the "
        "same command (same --output) to resume from there"
    )


def explain_fit_error(error: BaseException, layout: WorkerLayout) -> BaseException:
    """A one-line `UserError` for a worker group that never started; `error` itself otherwise.

    Ray Train's own text ("The worker group startup timed out ...") says neither what was
    waited for nor what to do.
    """
    startup_timeout = _ray_compat.worker_group_startup_timeout_error()
    if not isinstance(getattr(error, "controller_failure", None), startup_timeout):
        return error
    timeout = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    wanted = " + ".join(f"{v:g} {k}" for k, v in layout.resources_per_worker.items())
    return UserError(
        f"Ray Train could not start {layout.num_workers} worker(s) of {wanted} each within "
        f"{timeout} s, {START_RETRIES + 1} times: other Ray work holds the cluster's CPUs/GPUs "
        "or the machine is overloaded ('ray status' shows who holds them); stop it, or lower "
        "--max-concurrent / --workers, then run again (a search: add --resume)"
    )


def storage_uri(storage: str | Path) -> str:
    """A URI (s3://, gs://) as given; a local path made absolute (workers run elsewhere)."""
    text = str(storage)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def _to_cv_result(value: dict[str, Any], checkpoint, folds_per_repeat: int | None) -> CVResult:
    folds = []
    for number, fold in enumerate(value["folds"]):
        last = fold["history"][-1]
        metrics = {name: last[f"val_{name}"] for name in METRIC_NAMES}
        # A multi-label task's per-finding ROC-AUCs (`task.finding_auc_key`) ride along.
        metrics |= {k[4:]: v for k, v in last.items() if k.startswith(f"val_{FINDING}")}
        metrics["loss"] = last["val_loss"]
        metrics["num_samples"] = int(last["val_num_samples"])
        folds.append(
            FoldResult(
                number,
                int(last["epoch"]),
                metrics,
                fold["history"],
                val_indices=fold.get("val_indices", []),
                val_labels=fold.get("val_labels", []),
                val_probs=fold.get("val_probs", []),
            )
        )
    aucs = [f.metrics["roc_auc"] for f in folds]
    if not all(math.isfinite(a) for a in aucs):
        log.warning("some folds have no finite ROC-AUC: %s", aucs)
    return CVResult(
        folds=folds,
        precision=value["precision"],
        device=value["device"],
        world_size=value["world_size"],
        checkpoint_path=str(Path(checkpoint.path) / STATE_FILE) if checkpoint else None,
        extra={"channels_last": value["channels_last"], "peak_rss_mib": value["peak_rss_mib"]},
        folds_per_repeat=folds_per_repeat,
    )
