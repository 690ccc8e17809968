"""The sampler as distmed runs trials, warm start, parameter importance and the Pareto front
(no Ray cluster: Ray's OptunaSearch is driven directly, as Tune's controller drives it)."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import optuna
import pytest
from conftest import write_image_folder

from distmed.data import scan_source
from distmed.errors import UserError
from distmed.importance import MIN_TRIALS, param_importances
from distmed.pareto import FrontPoint, choose_on_front, dominates, pareto_front
from distmed.results import TrialRow
from distmed.search import CVOptunaSearch, build_sampler, resolve_sampler, startup_trials
from distmed.searchfile import record_search
from distmed.space import SearchSettings, load_space, parse_distribution, to_tune_domains
from distmed.warmstart import load_warm_start

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def _row(trial_id: str, params: dict, auc: float, status: str = "completed", se: float = 0.01):
    return TrialRow(trial_id, params, status, auc, 0.02, [auc] * 5, [3] * 5, 3, 10.0, se)


# --------------------------------------------------------------------------- sampler


def test_constant_liar_is_on_when_trials_run_in_parallel():
    settings = SearchSettings(num_samples=24)
    parallel, serial = resolve_sampler(settings, 2), resolve_sampler(settings, 1)
    assert parallel["constant_liar"] is True and serial["constant_liar"] is False
    assert build_sampler(parallel)._constant_liar is True
    assert build_sampler(serial)._constant_liar is False
    forced = SearchSettings.model_validate({"sampler": {"constant_liar": False}})
    assert resolve_sampler(forced, 4)["constant_liar"] is False


def test_start_up_fits_the_budget_and_a_set_value_wins():
    # 10 random start-up trials (Optuna's default) of a 12-trial search is random search.
    assert [startup_trials(n) for n in (6, 12, 24, 40, 200)] == [3, 3, 6, 10, 10]
    resolved = resolve_sampler(SearchSettings(num_samples=12), 2)
    assert resolved["n_startup_trials"] == 3 and resolved["multivariate"] is True
    built = build_sampler(resolved)
    assert built._n_startup_trials == 3 and built._multivariate and built._group
    fixed = SearchSettings.model_validate({"sampler": {"n_startup_trials": 7}})
    assert resolve_sampler(fixed, 2)["n_startup_trials"] == 7
    assert resolve_sampler(SearchSettings(algorithm="random"), 2) == {
        "algorithm": "random",
        "seed": 0,
    }


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("  sampler: {n_startup_trials: 0}\n", "search.sampler.n_startup_trials"),
        ("  sampler: {constant_liar: maybe}\n", "search.sampler.constant_liar"),
        ("  sampler: {multivariate: false}\n", "group: true needs multivariate: true"),
        ("  sampler: {gamma: 0.2}\n", "search.sampler.gamma"),
        ("  objectives: [num_params]\n", "search.objectives"),
        ("  objectives: [cv_roc_auc, num_params]\n", "asha"),
    ],
)
def test_bad_sampler_settings_are_one_line_naming_the_key(tmp_path, search, expected):
    path = tmp_path / "space.yaml"
    path.write_text(
        DEMO.read_text().replace("  max_concurrent: 2\n", "  max_concurrent: 2\n" + search)
    )
    with pytest.raises(UserError) as info:
        load_space(path)
    assert expected in str(info.value) and len(str(info.value).splitlines()) == 1
    assert "Value error" not in str(info.value)  # a validator's sentence, not pydantic's prefix


def test_a_budget_inside_tpes_start_up_is_said_to_be_random_search():
    from distmed.pipeline import startup_note

    spec, _ = _demo()
    for trials, random_only in ((3, True), (4, False), (12, False)):
        search = spec.search.model_copy(update={"num_samples": trials})
        note = startup_note(resolve_sampler(search, 1), trials)
        assert (note is not None and "TPE guides none" in note) == random_only
    random = spec.search.model_copy(update={"algorithm": "random", "num_samples": 2})
    assert startup_note(resolve_sampler(random, 1), 2) is None


# --------------------------------------------------------------------------- warm start


def _earlier_search(root: Path, spec, index, rows: list[dict]) -> Path:
    run = root / "earlier"
    record_search(str(run), spec, index)
    keys = list(spec.space)
    with (run / "trials.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", *keys, "cv_roc_auc", "cv_roc_auc_std", "status"])
        for r in rows:
            writer.writerow([r["id"], *(r["params"][k] for k in keys), r["auc"], 0.01, r["status"]])
    return run


def _demo():
    """The demo space with an integer dimension added (`model.unfreeze` 3..5, as in a
    transfer-learning space): the demo itself trains from random init and searches none."""
    spec = load_space(DEMO)
    unfreeze = parse_distribution(DEMO, "model.unfreeze", {"randint": [3, 5]})
    spec = spec.model_copy(update={"space": {**spec.space, "model.unfreeze": unfreeze}})
    return spec, scan_source(spec.base.data)


def _params(lr: float, unfreeze: int = 4) -> dict:
    return {
        "optim.lr": lr,
        "train.batch_size": 32,
        "optim.name": "adamw",
        "optim.weight_decay": 1e-4,
        "model.unfreeze": unfreeze,
    }


def test_warm_start_trials_are_in_the_study_before_the_first_new_trial(tmp_path):
    spec, index = _demo()
    rows = [
        {"id": "a", "params": _params(1e-3), "auc": 0.81, "status": "completed"},
        {"id": "b", "params": _params(5e-3), "auc": 0.74, "status": "completed"},
        {"id": "c", "params": _params(2e-3), "auc": 0.90, "status": "stopped"},  # no result
        {"id": "d", "params": _params(5e-2), "auc": 0.70, "status": "completed"},  # lr > range
        {"id": "e", "params": _params(1e-3, unfreeze=2), "auc": 0.6, "status": "completed"},
    ]
    warm = load_warm_start(str(_earlier_search(tmp_path, spec, index, rows)), spec, index)
    assert len(warm.params) == 2 and warm.skipped == 2
    assert warm.record()["trials_used"] == 2

    # As Tune drives the searcher: the space arrives, then the first trial is sampled.
    searcher = CVOptunaSearch(
        sampler=build_sampler(resolve_sampler(spec.search, 2)), warm=(warm.params, warm.values)
    )
    searcher.set_search_properties("cv_roc_auc", "max", to_tune_domains(spec.space))
    before = searcher._ot_study.trials
    assert [t.value for t in before] == [0.81, 0.74]
    assert before[0].params == _params(1e-3)  # typed back: ints, floats and choices
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in before)
    first = searcher.suggest("trial-1")
    assert set(first) == set(spec.space)
    assert len(searcher._ot_study.trials) == 3  # the new trial after the warm ones


def test_warm_start_from_other_images_or_no_search_is_refused_in_one_line(tmp_path):
    spec, index = _demo()
    run = _earlier_search(tmp_path, spec, index, [])
    other_root = write_image_folder(tmp_path / "other", {"a": 6, "b": 6})
    other = load_space(DEMO, [f"data.root={other_root}", "data.positive_class=b"])
    with pytest.raises(UserError, match="ran on other images") as info:
        load_warm_start(str(run), other, scan_source(other.base.data))
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(UserError, match="no search_space.json and trials.csv"):
        load_warm_start(str(tmp_path / "nothing"), spec, index)


def test_warm_start_names_fixed_settings_that_changed_and_warns_when_nothing_fits(tmp_path):
    """A longer or differently folded search may warm-start from a shorter one, but its
    scores are on another scale: the changed fixed settings are named (seeds and searched
    keys are not changes), and a warm start with no usable trial says it starts cold."""
    spec, index = _demo()
    rows = [{"id": "a", "params": _params(1e-3), "auc": 0.81, "status": "completed"}]
    run = str(_earlier_search(tmp_path, spec, index, rows))
    same = load_warm_start(run, spec, index)
    assert same.changed == () and same.warnings() == []

    changes = ["train.epochs=7", "cv.folds=3", "train.seed=5", "cv.seed=9"]
    longer = load_space(DEMO, changes)
    # the base's lr differs too, but lr is searched: no trial ran with the base value
    base = longer.base.model_dump(mode="json")
    base["optim"]["lr"] = 0.5
    longer = longer.model_copy(
        update={"space": spec.space, "base": type(longer.base).model_validate(base)}
    )
    warm = load_warm_start(run, longer, index)
    assert len(warm.params) == 1  # still used
    assert [c.split()[0] for c in warm.changed] == ["cv.folds", "train.epochs"]
    assert f"train.epochs {spec.base.train.epochs} -> 7" in warm.changed
    assert warm.record()["settings_changed"] == list(warm.changed)
    (line,) = warm.warnings()
    assert "other fixed settings" in line and "cv.folds" in line

    narrower = spec.space | {
        "optim.lr": parse_distribution(DEMO, "optim.lr", {"uniform": [0.1, 0.2]})
    }
    cold = load_warm_start(run, spec.model_copy(update={"space": narrower}), index)
    assert cold.params == [] and cold.skipped == 1
    assert any("starts cold" in w for w in cold.warnings())


def test_dry_run_shows_what_the_warm_start_would_feed_the_sampler(tmp_path, capsys):
    import yaml

    from distmed.pipeline import dry_run

    spec, index = _demo()
    rows = [{"id": "a", "params": _params(1e-3), "auc": 0.81, "status": "completed"}]
    run = str(_earlier_search(tmp_path, spec, index, rows))
    shown = yaml.safe_load(dry_run(spec, run, None))["warm start"]
    assert shown["trials_used"] == 1 and shown["skipped"] == 0 and shown["settings_changed"] == []
    assert "warning" not in capsys.readouterr().err


# --------------------------------------------------------------------------- importance


def test_importance_ranks_the_one_parameter_the_score_depends_on_first():
    spec, _ = _demo()
    rng = random.Random(0)
    rows = []
    for i in range(30):
        lr = math.exp(rng.uniform(math.log(3e-4), math.log(1e-2)))
        params = {
            "optim.lr": lr,
            "train.batch_size": rng.choice([16, 32]),
            "optim.name": rng.choice(["adam", "adamw", "sgd"]),
            "optim.weight_decay": math.exp(rng.uniform(math.log(1e-6), math.log(1e-2))),
            "model.unfreeze": rng.randint(3, 5),
        }
        rows.append(_row(str(i), params, 0.9 - 0.1 * (math.log10(lr) + 2.75) ** 2))
    found = param_importances(rows, spec.space, seed=0)
    ranked = list(found["importances"])
    assert ranked[0] == "optim.lr" and found["importances"]["optim.lr"] > 0.5
    assert found["num_trials"] == 30
    assert math.isclose(sum(found["importances"].values()), 1.0, rel_tol=1e-6)


def test_no_importance_from_too_few_completed_trials():
    spec, _ = _demo()
    rows = [_row(str(i), _params(1e-3 + i * 1e-4), 0.8 + i / 100) for i in range(MIN_TRIALS - 1)]
    rows.append(_row("x", _params(2e-3), 0.99, status="stopped"))
    found = param_importances(rows, spec.space)
    assert found["importances"] == {} and f"only {MIN_TRIALS - 1} completed" in found["reason"]


# --------------------------------------------------------------------------- two objectives


def test_the_front_holds_exactly_the_undominated_completed_trials():
    rng = random.Random(1)
    rows = [_row(str(i), {}, rng.uniform(0.6, 0.95)) for i in range(40)]
    rows.append(_row("stopped", {}, 0.999, status="stopped"))  # not a result
    sizes = {r.trial_id: rng.choice([11_000_000, 2_800_000, 700_000, 170_000]) for r in rows}
    front = pareto_front(rows, sizes)
    ids = {p.trial_id for p in front}
    assert "stopped" not in ids
    points = [
        FrontPoint(r.trial_id, r.cv_roc_auc, r.cv_roc_auc_se, sizes[r.trial_id]) for r in rows[:40]
    ]
    for p in points:  # on the front, or dominated by a point on it
        assert (p.trial_id in ids) != any(dominates(q, p) for q in front)
    assert all(not dominates(a, b) for a in front for b in front)
    assert [p.cv_roc_auc for p in front] == sorted((p.cv_roc_auc for p in front), reverse=True)


def test_the_refit_point_is_the_smallest_model_within_one_se_of_the_best():
    front = [
        FrontPoint("big", 0.90, 0.02, 11_000_000),
        FrontPoint("mid", 0.885, 0.03, 2_800_000),  # within 0.02 of 0.90
        FrontPoint("small", 0.85, 0.01, 170_000),  # not within
    ]
    assert choose_on_front(front).trial_id == "mid"
    no_se = [FrontPoint("big", 0.90, math.nan, 11_000_000), front[1]]
    assert choose_on_front(no_se).trial_id == "big"
    assert choose_on_front([]) is None


def test_two_objective_warm_start_scores_the_model_size(tmp_path):
    spec, index = _demo()
    rows = [{"id": "a", "params": _params(1e-3), "auc": 0.81, "status": "completed"}]
    run = _earlier_search(tmp_path, spec, index, rows)
    warm = load_warm_start(str(run), spec, index, model_size=lambda p: 1000 * p["model.unfreeze"])
    assert warm.values == [[0.81, 4000.0]]
    json.dumps(warm.record())  # summary.json keeps it


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_the_cli_refuses_a_warm_start_from_other_images_before_ray(
    tmp_path, capsys, monkeypatch, dry_run
):
    """--dry-run checks --warm-start too (a new user's dry run printed the config and the
    real run then stopped); on the same images it prints the resolved search."""
    from distmed import pipeline, tune

    def settings(root: Path) -> list[str]:
        return ["--set", f"data.root={root}", "--set", "cv.folds=2"]

    first = write_image_folder(tmp_path / "a", {"neg": 36, "lesion": 36})
    spec = load_space(DEMO, [f"data.root={first}", "cv.folds=2"])
    earlier = _earlier_search(tmp_path, spec, scan_source(spec.base.data), [])
    other = write_image_folder(tmp_path / "b", {"neg": 36, "lesion": 36}, size=20)
    monkeypatch.setattr(pipeline, "connect", lambda *a, **k: pytest.fail("Ray started"))
    argv = ["--space", str(DEMO), "--storage", str(tmp_path / "runs"), *settings(other)]
    assert tune.main([*argv, *dry_run, "--warm-start", str(earlier)]) == 2
    err = capsys.readouterr().err
    assert "ran on other images" in err and len(err.strip().splitlines()) == 1
    if dry_run:
        same = ["--space", str(DEMO), *settings(first), *dry_run, "--warm-start", str(earlier)]
        assert tune.main(same) == 0
        assert "sampler (resolved)" in capsys.readouterr().out


def test_a_dry_run_checks_a_local_weights_file(tmp_path, capsys):
    from distmed import tune

    missing = tmp_path / "resnet18-local.pt"
    argv = ["--space", str(DEMO), "--dry-run", "--set", f"model.weights={missing}"]
    assert tune.main(argv) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1


def test_two_objective_searcher_takes_warm_trials_and_prunes_unfinished_ones():
    from ray.tune.search.optuna import OptunaSearch

    spec, _ = _demo()
    searcher = CVOptunaSearch(
        space=OptunaSearch.convert_search_space(to_tune_domains(spec.space)),
        metric=["cv_roc_auc", "num_params"],
        mode=["max", "min"],
        sampler=build_sampler(resolve_sampler(spec.search, 2)),
        warm=([_params(1e-3)], [[0.8, 11_000_000.0]]),
    )
    study = searcher._ot_study
    assert [t.values for t in study.trials] == [[0.8, 11_000_000.0]]  # before any new trial
    for trial_id in ("stopped", "done"):
        searcher.suggest(trial_id)
    searcher.on_trial_complete("stopped", {"cv_roc_auc": 0.9, "num_params": 5, "cv_complete": 0})
    searcher.on_trial_complete("done", {"cv_roc_auc": 0.7, "num_params": 9, "cv_complete": 1})
    states = [t.state for t in study.trials]
    assert states[1:] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert study.trials[2].values == [0.7, 9.0]
