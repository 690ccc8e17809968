"""distmed.results and the Ray-free parts of distmed.search: rows, files, Optuna states, ASHA.

Nothing here starts Ray: result grids are plain stand-ins, and CVOptunaSearch is driven
directly through the Searcher interface that Tune's controller calls.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from distmed.config import load_config
from distmed.results import (
    TrialRow,
    best_config,
    best_is_separable,
    best_row,
    collect_rows,
    format_table,
    runner_up_row,
    status_counts,
    write_best_config,
    write_trials_csv,
)
from distmed.search import CVOptunaSearch, build_scheduler, max_epochs
from distmed.space import apply_params, load_space, to_tune_domains

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "search_spaces" / "demo.yaml"
KEYS = ["optim.lr", "optim.name"]
NAN = float("nan")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def row(
    trial_id: str,
    status: str = "completed",
    auc: float = 0.8,
    *,
    std: float = 0.02,
    se: float = 0.03,
    lr: float = 1e-3,
    name: str = "adam",
    folds: list[float] | None = None,
    epochs: int = 8,
    time_s: float = 12.34,
    error: str = "",
) -> TrialRow:
    folds = [auc - 0.01, auc + 0.01] if folds is None else folds
    return TrialRow(
        trial_id=trial_id,
        params={"optim.lr": lr, "optim.name": name},
        status=status,
        cv_roc_auc=auc,
        cv_roc_auc_std=std,
        cv_roc_auc_se=se,
        fold_aucs=folds,
        fold_epochs=[epochs] * len(folds),
        epochs_reported=epochs,
        time_s=time_s,
        error=error,
    )


def mixed_rows() -> list[TrialRow]:
    return [
        row("t_00000", "completed", 0.81, lr=1e-3, name="adam"),
        row("t_00001", "stopped", 0.95, lr=2e-3, name="sgd", epochs=2),
        row("t_00002", "completed", 0.88, lr=5e-4, name="adamw"),
        row("t_00003", "errored", 0.99, folds=[], epochs=0, error="RuntimeError: boom"),
        row("t_00004", "completed", NAN, std=NAN, folds=[NAN, NAN]),
    ]


# --------------------------------------------------------------------------- best_row


def test_best_row_is_the_best_completed_trial():
    best = best_row(mixed_rows())
    assert best is not None
    assert (
        best.trial_id == "t_00002"
    )  # 0.88 beats 0.81; stopped 0.95, errored 0.99 and NaN never win


def test_best_row_order_does_not_matter():
    rows = mixed_rows()
    assert best_row(list(reversed(rows))).trial_id == "t_00002"


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [row("a", "stopped", 0.9), row("b", "errored", 0.95)],
        [row("a", "completed", NAN), row("b", "stopped", 0.9)],
        [row("a", "completed", math.inf), row("b", "completed", -math.inf)],
    ],
    ids=["empty", "none-completed", "only-nan-completed", "only-infinite"],
)
def test_best_row_none_without_a_finite_completed_trial(rows):
    assert best_row(rows) is None


# --------------------------------------------------------------------------- trials.csv


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_trials_csv_header_and_one_row_per_trial(tmp_path):
    path = tmp_path / "trials.csv"
    rows = mixed_rows()
    write_trials_csv(path, rows, KEYS)
    header, records = read_csv(path)
    assert header == [
        "trial_id",
        "optim.lr",
        "optim.name",
        "cv_roc_auc",
        "cv_roc_auc_std",
        "cv_roc_auc_se",
        "fold0_roc_auc",
        "fold1_roc_auc",
        "status",
        "epochs",
        "time_s",
        "error",
    ]
    assert [r["trial_id"] for r in records] == [r.trial_id for r in rows]
    first = records[0]
    assert float(first["optim.lr"]) == pytest.approx(1e-3)
    assert first["optim.name"] == "adam"
    assert float(first["cv_roc_auc"]) == pytest.approx(0.81)
    assert float(first["cv_roc_auc_std"]) == pytest.approx(0.02)
    assert float(first["cv_roc_auc_se"]) == pytest.approx(0.03)
    assert float(first["fold0_roc_auc"]) == pytest.approx(0.80)
    assert float(first["fold1_roc_auc"]) == pytest.approx(0.82)
    assert first["status"] == "completed"
    assert int(first["epochs"]) == 8
    assert float(first["time_s"]) == pytest.approx(12.3)  # rounded to 0.1 s
    assert first["error"] == ""
    stopped = records[1]
    assert (stopped["status"], stopped["optim.name"], int(stopped["epochs"])) == (
        "stopped",
        "sgd",
        2,
    )
    errored = records[3]
    assert errored["status"] == "errored"
    assert errored["error"] == "RuntimeError: boom"
    # No fold scores for the errored trial: its fold columns are padded with NaN.
    assert math.isnan(float(errored["fold0_roc_auc"]))
    assert math.isnan(float(errored["fold1_roc_auc"]))
    assert math.isnan(float(records[4]["cv_roc_auc"]))


def test_trials_csv_fold_columns_follow_the_most_folds(tmp_path):
    path = tmp_path / "trials.csv"
    rows = [row("a", folds=[0.7, 0.8, 0.9]), row("b", "stopped", folds=[0.6])]
    write_trials_csv(path, rows, KEYS)
    header, records = read_csv(path)
    assert [h for h in header if h.startswith("fold")] == [
        "fold0_roc_auc",
        "fold1_roc_auc",
        "fold2_roc_auc",
    ]
    assert [float(records[0][f"fold{k}_roc_auc"]) for k in range(3)] == [0.7, 0.8, 0.9]
    assert float(records[1]["fold0_roc_auc"]) == 0.6
    assert math.isnan(float(records[1]["fold2_roc_auc"]))


def test_trials_csv_quotes_errors_with_commas_and_quotes(tmp_path):
    path = tmp_path / "trials.csv"
    message = 'ValueError: bad value "x", expected 1, 2 or 3'
    write_trials_csv(path, [row("a", "errored", NAN, folds=[], error=message)], KEYS)
    _, records = read_csv(path)
    assert len(records) == 1
    assert records[0]["error"] == message
    assert records[0]["status"] == "errored"


def test_trials_csv_without_trials_is_just_the_header(tmp_path):
    path = tmp_path / "trials.csv"
    write_trials_csv(path, [], KEYS)
    header, records = read_csv(path)
    assert records == []
    assert header == [
        "trial_id",
        "optim.lr",
        "optim.name",
        "cv_roc_auc",
        "cv_roc_auc_std",
        "cv_roc_auc_se",
        "status",
        "epochs",
        "time_s",
        "error",
    ]


# --------------------------------------------------------------------------- counts + table


def test_status_counts():
    assert status_counts(mixed_rows()) == {
        "completed": 3,
        "stopped": 1,
        "diverged": 0,
        "errored": 1,
        "interrupted": 0,
    }
    assert status_counts([]) == {
        "completed": 0,
        "stopped": 0,
        "diverged": 0,
        "errored": 0,
        "interrupted": 0,
    }


def test_format_table_best_completed_first():
    lines = format_table(mixed_rows(), KEYS).splitlines()
    assert len(lines) == 1 + 5
    header = lines[0].split()
    assert header[:2] == ["trial", "status"]
    assert "lr" in header and "name" in header
    assert "optim.lr" not in lines[0]  # leaf names only
    order = [line.split()[0] for line in lines[1:]]
    # Finite completed trials by AUC, then the NaN completed one, then stopped/errored.
    assert order[:3] == ["t_00002", "t_00000", "t_00004"]
    assert set(order[3:]) == {"t_00001", "t_00003"}
    assert "0.8800 ± 0.0300" in lines[1]  # mean ± standard error, not ± std
    assert "SE" in lines[0]
    assert "adamw" in lines[1]
    assert "0.0005" in lines[1]  # lr 5e-4 shown with 3 significant digits


def test_format_table_limit_and_long_ids():
    rows = [row(f"run_trial_{i:05d}", "completed", 0.5 + i / 100) for i in range(12)]
    lines = format_table(rows, KEYS, limit=3).splitlines()
    assert len(lines) == 4
    assert lines[1].split()[0] == "un_trial_00011"  # the last 14 characters of the id
    assert "0.6100" in lines[1]
    assert "0.6000" in lines[2]
    assert "0.5900" in lines[3]


def test_runner_up_is_the_best_other_completed_trial():
    rows = mixed_rows()
    best = best_row(rows)
    assert best is not None
    runner_up = runner_up_row(rows, best)
    assert runner_up is not None and runner_up.trial_id == "t_00000"  # stopped 0.95 never
    assert runner_up_row([best], best) is None


@pytest.mark.parametrize(
    ("runner_up", "expected"),
    [
        # 0.88 ± 1.96*0.01 = [0.8604, 0.8996]; 0.81 ± 0.0196 = [0.7904, 0.8296]: apart
        (row("b", auc=0.81, se=0.01), True),
        # 0.86 ± 0.0196 reaches 0.8796: the intervals overlap
        (row("b", auc=0.86, se=0.01), False),
        (row("b", auc=0.81, se=NAN), None),
        (None, None),
    ],
    ids=["far-apart", "overlapping", "no-se", "no-runner-up"],
)
def test_best_is_separable(runner_up, expected):
    assert best_is_separable(row("a", auc=0.88, se=0.01), runner_up) is expected


# --------------------------------------------------------------------------- best_config.yaml


def test_best_config_round_trips_through_load_config(tmp_path):
    base = load_space(DEMO).base
    params = {
        "optim.lr": np.float64(0.0042),
        "train.batch_size": np.int64(16),
        "optim.name": "sgd",
        "optim.weight_decay": np.float64(3e-5),
        "model.unfreeze": np.int64(4),
    }
    winner = TrialRow(
        trial_id="t_00007",
        params=params,
        status="completed",
        cv_roc_auc=0.9,
        cv_roc_auc_std=0.01,
        fold_aucs=[0.9] * 5,
        fold_epochs=[8] * 5,
        epochs_reported=8,
        time_s=60.0,
    )
    cfg = best_config(base, winner)
    assert cfg == apply_params(base, params)
    path = tmp_path / "best_config.yaml"
    write_best_config(path, cfg)
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.optim.lr == pytest.approx(0.0042)
    assert loaded.optim.name == "sgd"
    assert loaded.optim.weight_decay == pytest.approx(3e-5)
    assert loaded.train.batch_size == 16
    assert loaded.model.unfreeze == 4
    # Unsearched values come from the base.
    assert loaded.data.root == "demo"
    assert loaded.train.epochs == 8
    assert loaded != base
    # A complete, plain config file (no search sections, no Python tags).
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {"data", "model", "optim", "train", "cv", "scaling", "tracking"}


def test_best_config_file_accepts_set_overrides(tmp_path):
    base = load_space(DEMO).base
    cfg = best_config(base, row("t", lr=0.003, name="adamw"))
    path = tmp_path / "best_config.yaml"
    write_best_config(path, cfg)
    loaded = load_config(path, ["train.epochs=2"])
    assert loaded.train.epochs == 2
    assert loaded.optim.lr == pytest.approx(0.003)


# --------------------------------------------------------------------------- collect_rows


@dataclass
class FakeResult:
    """The attributes of a ray.tune.Result that collect_rows reads."""

    metrics: dict[str, Any] | None
    config: dict[str, Any]
    error: BaseException | None = None
    path: str = "/tmp/exp/run_trial_x"


def metrics(trial_id: str, aucs: list[float], complete: bool, iteration: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "trial_id": trial_id,
        "cv_roc_auc": float(np.mean(aucs)),
        "cv_roc_auc_std": float(np.std(aucs)),
        "cv_roc_auc_se": 0.01 * len(aucs),
        "cv_complete": int(complete),
        "training_iteration": iteration,
        "time_total_s": 42.26,
        "epoch": iteration,
        "train_loss": 0.3,
    }
    # Reverse insertion order, so a correct result cannot come from dict order.
    for k in reversed(range(len(aucs))):
        out[f"fold{k}_roc_auc"] = aucs[k]
        out[f"fold{k}_epoch"] = iteration - k % 2
    return out


def fake_grid() -> list[FakeResult]:
    config = {"optim.lr": 0.001, "optim.name": "adam", "train.epochs": 8}
    return [
        FakeResult(metrics("a_00002", [0.7, 0.6], complete=False, iteration=2), dict(config)),
        FakeResult(
            metrics("a_00000", [0.8, 0.9], complete=True, iteration=8),
            {**config, "optim.lr": 0.004, "optim.name": "sgd"},
        ),
        FakeResult(
            {"trial_id": "a_00001", "training_iteration": 1, "time_total_s": 3.0},
            dict(config),
            error=RuntimeError("worker died\nTraceback (most recent call last): ..."),
        ),
        FakeResult(
            metrics("a_00003", [0.9, 0.95], complete=True, iteration=8),
            dict(config),
            error=ValueError("failed after the last report"),
        ),
    ]


def test_collect_rows_status_mapping_and_values():
    rows = {r.trial_id: r for r in collect_rows(fake_grid(), KEYS)}
    assert set(rows) == {"a_00000", "a_00001", "a_00002", "a_00003"}

    done = rows["a_00000"]
    assert done.status == "completed"
    assert done.params == {"optim.lr": 0.004, "optim.name": "sgd"}  # only the space keys
    assert done.cv_roc_auc == pytest.approx(0.85)
    assert done.cv_roc_auc_std == pytest.approx(0.05)
    assert done.cv_roc_auc_se == pytest.approx(0.02)
    assert done.fold_aucs == [0.8, 0.9]
    assert done.fold_epochs == [8, 7]
    assert done.epochs_reported == 8
    assert done.time_s == pytest.approx(42.26)
    assert done.error == ""

    stopped = rows["a_00002"]
    assert stopped.status == "stopped"
    assert stopped.fold_aucs == [0.7, 0.6]
    assert stopped.epochs_reported == 2

    errored = rows["a_00001"]
    assert errored.status == "errored"
    assert errored.error == "RuntimeError: worker died"  # first line only
    assert math.isnan(errored.cv_roc_auc)
    assert math.isnan(errored.cv_roc_auc_std)
    assert math.isnan(errored.cv_roc_auc_se)
    assert errored.fold_aucs == [] and errored.fold_epochs == []
    assert errored.time_s == 3.0

    # An error wins over cv_complete: the trial did not finish cleanly.
    assert rows["a_00003"].status == "errored"
    assert rows["a_00003"].error == "ValueError: failed after the last report"

    assert best_row(list(rows.values())).trial_id == "a_00000"


def test_a_trial_created_but_never_started_is_no_row():
    """A Ctrl-C between two trials leaves the next one PENDING: Tune's Result for it has no
    config and no metrics (it crashed the interrupted search's bookkeeping: new-user try)."""
    pending = FakeResult(None, None, path="/tmp/exp/run_trial_p_00004")  # type: ignore[arg-type]
    rows = collect_rows([*fake_grid(), pending], KEYS, ended={"a_00000", "a_00001", "a_00003"})
    assert {r.trial_id for r in rows} == {"a_00000", "a_00001", "a_00002", "a_00003"}
    assert status_counts(rows)["interrupted"] == 1  # a_00002, which was training
    # A started trial whose config was lost still gets its row, parameters unknown.
    lost = FakeResult(metrics("a_00005", [0.7], complete=False, iteration=1), None)  # type: ignore[arg-type]
    (row,) = collect_rows([lost], KEYS, ended=set())
    assert row.status == "interrupted" and row.params == dict.fromkeys(KEYS)


def test_a_ctrl_c_marks_unfinished_trials_interrupted_not_stopped():
    # a_00002 was training when the Ctrl-C came: "stopped" would say ASHA stopped it, and a
    # resumed search continues it. Trials that had ended keep their own status.
    rows = {r.trial_id: r for r in collect_rows(fake_grid(), KEYS, ended=set())}
    assert rows["a_00002"].status == "interrupted"
    assert rows["a_00000"].status == "completed"
    assert rows["a_00001"].status == rows["a_00003"].status == "errored"
    assert status_counts(list(rows.values()))["interrupted"] == 1
    assert best_row(list(rows.values())).trial_id == "a_00000"
    # A trial that ended (ASHA stopped it) before the Ctrl-C stays stopped.
    after = collect_rows(fake_grid(), KEYS, ended={"a_00002"})
    assert {r.trial_id: r.status for r in after}["a_00002"] == "stopped"
    # Without a Ctrl-C, an unfinished trial is one that the scheduler stopped.
    assert {r.trial_id: r.status for r in collect_rows(fake_grid(), KEYS)}["a_00002"] == "stopped"


def test_collect_rows_resumed_trial_counts_its_epochs_not_tunes_iterations():
    # A trial resumed after the driver was killed: Tune's iteration count restarted at its
    # checkpoint (epoch 1), the worker reports the true epoch.
    resumed = metrics("r_00000", [0.8, 0.9], complete=True, iteration=3)
    resumed["epoch"] = 4
    error = RuntimeError("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1) died")
    grid = [FakeResult(resumed, {}), FakeResult({"trial_id": "r_00001"}, {}, error=error)]
    done, errored = collect_rows(grid, KEYS)
    assert done.epochs_reported == 4
    assert errored.error == "RuntimeError: ray::ImplicitFunc.train() (pid=1) died"


def test_collect_rows_in_trial_order():
    assert [r.trial_id for r in collect_rows(fake_grid(), KEYS)] == [
        "a_00000",
        "a_00001",
        "a_00002",
        "a_00003",
    ]


def test_collect_rows_in_creation_order_not_id_order():
    # Tune's trial ids are random hex; the folder's counter is the order trials were made in.
    made = ["f3a1c9e2", "0b4e4ca7", "9d2e406d"]
    grid = [
        FakeResult(
            metrics(trial_id, [0.8, 0.9], complete=True, iteration=2),
            {},
            path=f"/runs/exp/run_trial_{trial_id}_{n}_optim_lr=0.0012_2026-11-29_13-36-55",
        )
        for n, trial_id in reversed(list(enumerate(made, start=1)))
    ]
    assert [r.trial_id for r in collect_rows(grid, KEYS)] == made


def test_collect_rows_folds_in_numeric_order():
    aucs = [0.5 + k / 100 for k in range(12)]  # fold10, fold11 must not sort before fold2
    grid = [FakeResult(metrics("b_00000", aucs, complete=True, iteration=12), {})]
    (only,) = collect_rows(grid, KEYS)
    assert only.fold_aucs == aucs
    assert only.fold_epochs == [12 - k % 2 for k in range(12)]
    assert only.params == {"optim.lr": None, "optim.name": None}


def test_collect_rows_without_metrics_names_the_trial_from_its_path():
    grid = [
        FakeResult(
            None,
            {"optim.lr": 0.01, "optim.name": "adam"},
            error=MemoryError(),
            path="/results/exp/run_trial_c_00009",
        )
    ]
    (only,) = collect_rows(grid, KEYS)
    assert only.trial_id == "run_trial_c_00009"
    assert only.status == "errored"
    assert only.error.startswith("out of memory (MemoryError); lower train.batch_size")
    assert only.epochs_reported == 0
    assert math.isnan(only.cv_roc_auc) and math.isnan(only.time_s)
    # A folder named the way Tune names them gives the short id, as the metrics would.
    named = FakeResult(None, {}, error=MemoryError(), path="/r/run_trial_0c9e4f1a_3_x=1_2026")
    assert collect_rows([named], KEYS)[0].trial_id == "0c9e4f1a"


def test_collect_rows_feed_the_csv(tmp_path):
    path = tmp_path / "trials.csv"
    write_trials_csv(path, collect_rows(fake_grid(), KEYS), KEYS)
    header, records = read_csv(path)
    assert "fold1_roc_auc" in header and "fold2_roc_auc" not in header
    by_id = {r["trial_id"]: r for r in records}
    assert by_id["a_00000"]["optim.name"] == "sgd"
    assert float(by_id["a_00000"]["fold1_roc_auc"]) == 0.9
    assert by_id["a_00001"]["error"] == "RuntimeError: worker died"
    assert math.isnan(float(by_id["a_00001"]["fold0_roc_auc"]))
    assert [r["status"] for r in records] == ["completed", "errored", "stopped", "errored"]


# --------------------------------------------------------------------------- CVOptunaSearch


def make_searcher(space: dict[str, Any] | None = None) -> CVOptunaSearch:
    space = space or {
        "optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "optim.name": optuna.distributions.CategoricalDistribution(["adam", "sgd"]),
    }
    return CVOptunaSearch(
        space=space,
        metric="cv_roc_auc",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=0),
    )


def run(
    searcher: CVOptunaSearch, trial_id: str, aucs: list[float], last: dict[str, Any] | None
) -> dict[str, Any]:
    """What Tune's controller does: suggest, one result per epoch, then complete."""
    params = searcher.suggest(trial_id)
    for epoch, auc in enumerate(aucs, start=1):
        searcher.on_trial_result(trial_id, {"cv_roc_auc": auc, "training_iteration": epoch})
    if last is not None:
        searcher.on_trial_complete(trial_id, result=last)
    return params


def states(searcher: CVOptunaSearch) -> list[TrialState]:
    return [t.state for t in searcher._ot_study.trials]


def test_searcher_suggests_from_its_space():
    searcher = make_searcher()
    params = searcher.suggest("t0")
    assert set(params) == {"optim.lr", "optim.name"}
    assert 1e-4 <= params["optim.lr"] <= 1e-2
    assert params["optim.name"] in {"adam", "sgd"}
    assert states(searcher) == [TrialState.RUNNING]


def test_fully_cross_validated_trial_is_complete_with_its_score():
    searcher = make_searcher()
    last = {"cv_roc_auc": 0.83, "cv_complete": 1, "training_iteration": 3}
    run(searcher, "t0", [0.7, 0.8, 0.83], last)
    (trial,) = searcher._ot_study.trials
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(0.83)
    assert trial.intermediate_values == {1: 0.7, 2: 0.8, 3: 0.83}
    assert searcher._ot_study.best_value == pytest.approx(0.83)


@pytest.mark.parametrize(
    "last",
    [
        {"cv_roc_auc": 0.9, "training_iteration": 2},
        {"cv_roc_auc": 0.9, "cv_complete": 0, "training_iteration": 2},
    ],
    ids=["no-cv_complete", "cv_complete-0"],
)
def test_trial_stopped_by_asha_is_pruned_not_complete(last):
    searcher = make_searcher()
    run(searcher, "t0", [0.85, 0.9], last)
    (trial,) = searcher._ot_study.trials
    assert trial.state == TrialState.PRUNED
    # Optuna keeps the last intermediate value for TPE's ranking of pruned trials.
    assert trial.value == pytest.approx(0.9)
    assert trial.intermediate_values == {1: 0.85, 2: 0.9}
    # A pruned trial never becomes the study's best.
    assert not [t for t in searcher._ot_study.trials if t.state == TrialState.COMPLETE]


@pytest.mark.parametrize("score", [NAN, math.inf, None], ids=["nan", "inf", "missing"])
def test_non_finite_or_missing_score_is_pruned_not_complete(score):
    searcher = make_searcher()
    last = {"cv_complete": 1, "training_iteration": 2}
    if score is not None:
        last["cv_roc_auc"] = score
    run(searcher, "t0", [0.6, NAN], last)
    (trial,) = searcher._ot_study.trials
    assert trial.state == TrialState.PRUNED
    assert trial.state != TrialState.COMPLETE
    assert trial.value is None  # the last intermediate value is NaN: nothing to rank by


def test_errored_trial_is_fail():
    searcher = make_searcher()
    run(searcher, "t0", [0.7], last=None)
    searcher.on_trial_complete("t0", error=True)  # how Tune's controller reports an error
    (trial,) = searcher._ot_study.trials
    assert trial.state == TrialState.FAIL
    assert trial.value is None


def test_mixed_outcomes_and_only_complete_trials_can_be_best():
    searcher = make_searcher()
    run(
        searcher, "ok", [0.7, 0.75], {"cv_roc_auc": 0.75, "cv_complete": 1, "training_iteration": 2}
    )
    run(searcher, "asha", [0.95], {"cv_roc_auc": 0.95, "training_iteration": 1})
    run(searcher, "nan", [NAN], {"cv_roc_auc": NAN, "cv_complete": 1, "training_iteration": 1})
    run(searcher, "err", [0.99], last=None)
    searcher.on_trial_complete("err", error=True)
    assert states(searcher) == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.PRUNED,
        TrialState.FAIL,
    ]
    assert searcher._ot_study.best_trial.number == 0
    assert searcher._ot_study.best_value == pytest.approx(0.75)
    # The searcher keeps going after every kind of ending.
    assert set(searcher.suggest("next")) == {"optim.lr", "optim.name"}


def test_searcher_over_the_shipped_space_suggests_valid_trial_configs():
    spec = load_space(DEMO)
    searcher = make_searcher(to_tune_domains(spec.space))
    for i in range(30):
        params = searcher.suggest(f"t{i}")
        assert set(params) == set(spec.space)
        cfg = apply_params(spec.base, params)  # every suggestion is a valid config
        assert 3.0e-4 <= cfg.optim.lr <= 1.0e-2
        assert cfg.train.batch_size in {16, 32}
    resnet = load_space(REPO / "search_spaces" / "resnet.yaml")
    searcher = make_searcher(to_tune_domains(resnet.space))
    unfreeze = {
        apply_params(resnet.base, searcher.suggest(f"t{i}")).model.unfreeze for i in range(40)
    }
    assert unfreeze == set(range(6))  # randint [0, 5]: the upper bound reaches Optuna too


# --------------------------------------------------------------------------- epochs + ASHA


def epochs_space(tmp_path: Path, line: str | None, overrides: tuple[str, ...] = ()):
    space = "  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    if line:
        space += f"  {line}\n"
    path = tmp_path / "space.yaml"
    path.write_text(
        "base:\n  train:\n    epochs: 6\n"
        "search:\n  scheduler:\n    grace_period: 2\n    reduction_factor: 2\n"
        f"space:\n{space}"
    )
    return load_space(path, list(overrides))


def test_max_epochs_is_the_base_epochs_when_not_searched(tmp_path):
    assert max_epochs(epochs_space(tmp_path, None)) == 6
    assert max_epochs(epochs_space(tmp_path, None, ("train.epochs=3",))) == 3
    assert max_epochs(load_space(DEMO)) == 8


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("train.epochs: {randint: [2, 7]}", 7),  # randint high is inclusive
        ("train.epochs: {choice: [3, 9, 5]}", 9),
        ("train.epochs: {quniform: [2, 10, 2]}", 10),
    ],
    ids=["randint", "choice", "quniform"],
)
def test_max_epochs_is_the_space_upper_bound_when_searched(tmp_path, line, expected):
    spec = epochs_space(tmp_path, line)
    assert spec.base.train.epochs == 6
    result = max_epochs(spec)
    assert result == expected
    assert type(result) is int


def test_asha_runs_to_max_epochs_from_the_grace_period(tmp_path):
    sched = build_scheduler(epochs_space(tmp_path, "train.epochs: {randint: [2, 8]}"))
    assert isinstance(sched, ASHAScheduler)
    assert sched._max_t == 8
    assert sched._time_attr == "training_iteration"
    assert sorted(m for m, _ in sched._brackets[0]._rungs) == [2, 4, 8]  # grace 2, factor 2


def test_asha_grace_period_capped_at_max_epochs(tmp_path):
    sched = build_scheduler(epochs_space(tmp_path, None, ("train.epochs=1",)))
    assert isinstance(sched, ASHAScheduler)
    assert sched._max_t == 1
    assert [m for m, _ in sched._brackets[0]._rungs] == [1]  # grace 2 from the file, capped


def test_scheduler_none_is_fifo(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "search:\n  scheduler:\n    type: none\nspace:\n  optim.lr: {uniform: [0.001, 0.01]}\n"
    )
    assert isinstance(build_scheduler(load_space(path)), FIFOScheduler)


def test_diverged_trial_is_its_own_status_with_the_reason_and_never_best():
    diverged = metrics("d_00000", [0.9, float("nan")], complete=True, iteration=3)
    diverged["folds_diverged"] = 1
    grid = [
        FakeResult(diverged, {"optim.lr": 9.0, "optim.name": "sgd"}),
        FakeResult(metrics("d_00001", [0.6, 0.7], complete=True, iteration=8), {}),
    ]
    rows = {r.trial_id: r for r in collect_rows(grid, KEYS)}
    assert rows["d_00000"].status == "diverged"
    assert "NaN/inf by epoch 3 in 1 fold(s)" in rows["d_00000"].error
    assert "optim.lr" in rows["d_00000"].error
    assert best_row(list(rows.values())).trial_id == "d_00001"
    assert status_counts(list(rows.values()))["diverged"] == 1


def test_best_config_stores_the_data_folder_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    base = load_space(DEMO).base.model_copy(
        update={"data": load_space(DEMO).base.data.model_copy(update={"root": "images"})}
    )
    cfg = best_config(base, row("t", lr=0.003, name="adamw"))
    assert cfg.data.root == str(tmp_path / "images")
    assert best_config(load_space(DEMO).base, row("t", lr=0.003, name="adamw")).data.root == "demo"


@pytest.mark.parametrize(
    ("grace", "warmup", "warned"),
    [("1", "1", True), ("2", "1", False), ("2", "2", True), ("1", "0", False), ("6", "6", False)],
)
def test_asha_rungs_within_the_warmup_are_said_once_the_scheduler_is_built(
    tmp_path, caplog, grace, warmup, warned
):
    """A grace period that ends inside the warm-up judges trials on a ramping learning rate
    (the search benchmark's 1 and 1); at the last epoch ASHA stops nothing, so no warning."""
    path = tmp_path / "space.yaml"
    path.write_text(
        f"base:\n  train:\n    epochs: 6\n  optim:\n    warmup_epochs: {warmup}\n"
        f"search:\n  scheduler:\n    grace_period: {grace}\n"
        "space:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    )
    with caplog.at_level("WARNING", logger="distmed.search"):
        build_scheduler(load_space(path))
    said = [r.getMessage() for r in caplog.records if "warm" in r.getMessage()]
    assert bool(said) is warned, said
    if warned:
        assert f"grace_period {grace} is within optim.warmup_epochs {warmup}" in said[0]
        assert f"grace_period to {int(warmup) + 1} or more" in said[0]


@pytest.mark.parametrize(
    ("epochs", "grace", "scheduler", "advice"),
    [
        ("6", "6", "asha", "set grace_period to at most 5, or set search.scheduler.type: none"),
        ("1", "2", "asha", "epochs; set search.scheduler.type: none"),
        ("6", "5", "asha", None),
        ("2", "2", "none", None),  # no ASHA: nothing to stop
    ],
)
def test_a_grace_period_not_under_the_epochs_is_said_by_the_dry_run(
    tmp_path, caplog, epochs, grace, scheduler, advice
):
    """ASHA's first rung at (or past) the last epoch stops no trial: the search would run
    every trial in full while the space file says it stops the poor ones early."""
    from distmed.tune import main

    path = tmp_path / "space.yaml"
    path.write_text(
        f"base:\n  model: {{weights: none}}\n  train:\n    epochs: {epochs}\n"
        f"search:\n  scheduler:\n    type: {scheduler}\n    grace_period: {grace}\n"
        "space:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    )
    with caplog.at_level("WARNING", logger="distmed.search"):
        assert main(["--space", str(path), "--dry-run"]) == 0
    said = [r.getMessage() for r in caplog.records if "stop no trial" in r.getMessage()]
    if advice is None:
        assert said == []
    else:
        [message] = said
        assert f"grace_period {grace} is not under train.epochs {epochs}" in message
        assert advice in message


def test_a_searched_warmup_counts_at_its_longest(tmp_path):
    from distmed.search import warn_of_rungs_in_warmup

    path = tmp_path / "space.yaml"
    path.write_text(
        "base:\n  train:\n    epochs: 6\n"
        "search:\n  scheduler:\n    grace_period: 2\n"
        "space:\n  optim.warmup_epochs: {choice: [0, 2]}\n"
    )
    assert "within optim.warmup_epochs 2" in warn_of_rungs_in_warmup(load_space(path))
