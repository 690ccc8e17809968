"""The benchmarks' bookkeeping: what counts as a result, warm-up exclusion, ratios, settings."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from benchmarks import throughput
from benchmarks.common import TRAIN_WORKER, SessionCpu
from benchmarks.medmnist import (
    best_so_far,
    load_run,
    mark_selected_by_cv,
    merged,
    search_stats,
    space_for,
    with_small_stem,
)
from benchmarks.throughput import ratios, summarise_cv_result


def _trial(status: str, auc: float, seconds: float, epochs: int = 3) -> dict:
    return {"status": status, "cv_roc_auc": auc, "time_s": seconds, "epochs": epochs}


def test_best_so_far_counts_completed_trials_only():
    trials = [
        _trial("stopped", 0.99, 10.0, 1),  # a score after 1 epoch is not a result
        _trial("completed", 0.80, 30.0),
        _trial("errored", math.nan, 5.0, 0),
        _trial("completed", 0.85, 30.0),
    ]
    curve = best_so_far(trials)
    assert [p["best"] for p in curve] == [-math.inf, 0.80, 0.80, 0.85]
    assert [p["time_s"] for p in curve] == [10.0, 40.0, 45.0, 75.0]
    stats = search_stats({"trials": trials, "best_cv_roc_auc": 0.85})
    assert stats["fraction_stopped_early"] == 0.25
    assert stats["trials_per_hour"] == pytest.approx(4 / (75 / 3600), abs=0.1)
    assert stats["epochs_trained"] == 7


def test_dataset_settings_merge_into_nested_sections_without_dropping_keys():
    base = {"base": {"train": {"epochs": 3, "batch_size": 64}}, "search": {"seed": 0}}
    out = merged(base, {"base": {"train": {"epochs": 15}}})
    assert out == {"base": {"train": {"epochs": 15, "batch_size": 64}}, "search": {"seed": 0}}
    assert base["base"]["train"]["epochs"] == 3  # the shipped file's values are not mutated


def test_ray_rate_leaves_out_the_first_fold_epoch_and_ratios_use_one_cell():
    history = [
        [{"epoch": 1, "train_images_per_s": 10.0}, {"epoch": 2, "train_images_per_s": 40.0}],
        [{"epoch": 1, "train_images_per_s": 38.0}, {"epoch": 2, "train_images_per_s": 42.0}],
    ]
    result = {
        "folds": [{"history": h} for h in history],
        "precision": "off",
        "channels_last": True,
        "world_size": 1,
        "peak_rss_mib": 900.0,
        "wall_time_s": 60.0,
    }
    summary = summarise_cv_result(result)
    assert summary["images_per_s"] == 40.0  # median of 40, 38, 42: the 10 is warm-up
    assert summary["warmup_epoch_images_per_s"] == [10.0]
    cell = {"ray": summary, "plain": {"images_per_s": 50.0}, "imagefolder": {"images_per_s": 20.0}}
    got = ratios(cell)
    assert got["distmed_over_imagefolder"] == pytest.approx(2.0)
    assert got["ray_overhead"] == pytest.approx(0.2)


def test_rounds_alternate_the_order_and_report_medians(monkeypatch, tmp_path):
    calls = []
    rates = {"plain": iter([50.0, 40.0, 60.0]), "ray": iter([45.0, 30.0, 44.0])}

    def fake_loop(kind, cell, work, budget):
        calls.append(kind)
        return {
            "images_per_s": next(rates[kind]),
            "other_cores": 0.01,
            "steal_cores": 0.0,
            "peak_rss_mib": 100.0,
        }

    def fake_ray(cell, work, steps):
        calls.append(("ray", steps))
        return {
            "images_per_s": next(rates["ray"]),
            "other_cores": 0.0,
            "steal_cores": 0.2,
            "peak_rss_mib": 300.0,
        }

    monkeypatch.setattr(throughput, "run_loop_process", fake_loop)
    monkeypatch.setattr(throughput, "run_ray_cli", fake_ray)
    monkeypatch.setattr(throughput, "ray_steps", lambda cell, plain, budget, source: 7)
    cell = throughput.Cell("resnet18", 64, 32)
    work = SimpleNamespace(source=tmp_path / "unused.npz")
    result = throughput.run_cell(cell, work, throughput.FULL_BUDGET, ["ray", "plain"], rounds=3)
    # Plain first (it sizes the Ray run), then the order flips every round.
    assert calls == ["plain", ("ray", 7), ("ray", 7), "plain", "plain", ("ray", 7)]
    assert result["plain"]["images_per_s"] == 50.0
    assert result["ray"]["images_per_s"] == 44.0
    assert result["ray"]["round_images_per_s"] == [45.0, 30.0, 44.0]
    assert result["ray"]["steal_cores"] == 0.2
    assert result["ratios"]["ray_over_plain"] == pytest.approx(44.0 / 50.0)
    per_round = [r["ray_over_plain"] for r in result["round_ratios"]]
    assert per_round == pytest.approx([0.9, 0.75, 44.0 / 60.0])


def test_background_cpu_counts_only_intervals_where_the_worker_trains():
    session = SessionCpu(leader=1)
    worker = TRAIN_WORKER
    session._add_training(1.0, [(worker, 1.8), ("raylet", 0.05), ("python", 0.1)])
    session._add_training(2.0, [(worker, 0.4), ("raylet", 1.0)])  # start-up: not training
    session._add_training(1.0, [(worker, 1.9), ("raylet", 0.03)])
    summary = session.training_summary()
    assert summary["training_wall_s"] == 2.0
    assert summary["worker_cores"] == pytest.approx(1.85)
    assert summary["others_cores"] == pytest.approx(0.09)
    assert list(summary["busiest_others"]) == ["python", "raylet"]


def test_small_stem_run_fixes_the_best_config_and_changes_only_the_stem():
    spec = {
        "base": {
            "model": {"arch": "resnet18", "stem": "imagenet", "unfreeze": 5},
            "optim": {"name": "adamw", "lr": 1e-3},
            "train": {"batch_size": 32, "epochs": 30},
        },
        "search": {"num_samples": 6, "scheduler": {"type": "asha", "grace_period": 5}},
        "space": {"optim.lr": {"loguniform": [3e-4, 3e-2]}, "train.batch_size": {"choice": [16]}},
    }
    best = {"optim": {"name": "adamw", "lr": 5e-4}, "train": {"batch_size": 16, "epochs": 30}}
    out = with_small_stem(spec, best)
    assert out["base"]["optim"]["lr"] == 5e-4 and out["base"]["train"]["batch_size"] == 16
    assert out["base"]["model"] == {"arch": "resnet18", "stem": "small", "unfreeze": 5}
    assert out["space"] == {"model.stem": {"choice": ["small"]}}
    assert out["search"] == {"num_samples": 1, "scheduler": {"type": "none"}}
    assert spec["base"]["model"]["stem"] == "imagenet"  # the search's own spec is untouched


def test_stem_search_adds_the_stem_to_breastmnists_own_search(tmp_path):
    import yaml

    first = yaml.safe_load(space_for("breastmnist", "tpe_asha", tmp_path).read_text())
    second = yaml.safe_load(space_for("breastmnist", "stem_search", tmp_path).read_text())
    assert second["space"].pop("model.stem") == {"choice": ["imagenet", "small"]}
    assert second == first  # the same data-set settings, epochs, folds, seed and budget
    assert first["base"]["cv"]["folds"] == 3 and first["base"]["train"]["epochs"] == 30

    third = yaml.safe_load(space_for("breastmnist", "long_search", tmp_path).read_text())
    assert "model.unfreeze" not in third["space"] and third["base"]["model"]["unfreeze"] == 5
    assert third["space"]["model.stem"] == {"choice": ["imagenet", "small"]}
    assert third["search"]["num_samples"] == 20

    replicate = yaml.safe_load(space_for("breastmnist", "long_search_seed1", tmp_path).read_text())
    seeds = (replicate["search"], replicate["base"]["cv"], replicate["base"]["train"])
    assert [section.pop("seed") for section in seeds] == [1, 1, 1]
    third["base"]["train"].pop("seed", None)  # unset there: the default 0
    assert [third["search"].pop("seed"), third["base"]["cv"].pop("seed")] == [0, 0]
    assert replicate == third  # every other setting as in the long search


def test_quality_selects_by_cv_not_by_test():
    rows = {
        "breast/a": {"dataset": "breast", "best_cv_roc_auc": 0.88, "test_roc_auc": 0.87},
        "breast/b": {"dataset": "breast", "best_cv_roc_auc": 0.86, "test_roc_auc": 0.93},
        "pneumonia/a": {"dataset": "pneumonia", "best_cv_roc_auc": 0.99, "test_roc_auc": 0.95},
    }
    mark_selected_by_cv(rows)
    assert [key for key, row in rows.items() if row["selected_by_cv"]] == [
        "breast/a",
        "pneumonia/a",
    ]


def test_medmnist_names_the_missing_search_a_later_part_builds_on(tmp_path):
    with pytest.raises(SystemExit, match=r"breastmnist-tpe_asha: no finished breastmnist search"):
        load_run(tmp_path, "breastmnist", "tpe_asha")


def test_paired_auc_difference_is_the_difference_with_an_interval_around_it(tmp_path):
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from benchmarks.evaluation import paired_auc_difference

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    good = np.clip(labels * 0.6 + rng.random(300) * 0.5, 0, 1)  # separates the classes well
    poor = rng.random(300)  # chance
    for name, positive in (("good", good), ("poor", poor)):
        np.savez(tmp_path / f"{name}.npz", labels=labels, probs=np.c_[1 - positive, positive])
    diff = paired_auc_difference(tmp_path / "good.npz", tmp_path / "poor.npz", 1, resamples=200)
    expected = roc_auc_score(labels, good) - roc_auc_score(labels, poor)
    assert diff["value"] == pytest.approx(expected)
    assert 0 < diff["ci95"][0] < expected < diff["ci95"][1]
    same = paired_auc_difference(tmp_path / "good.npz", tmp_path / "good.npz", 1, resamples=50)
    assert same["value"] == 0 and same["ci95"] == [0.0, 0.0]  # paired: no spread
    np.savez(tmp_path / "other.npz", labels=1 - labels, probs=np.c_[1 - good, good])
    with pytest.raises(SystemExit, match="not predictions of the same images"):
        paired_auc_difference(tmp_path / "good.npz", tmp_path / "other.npz", positive=1)


# --------------------------------------------------------------------------- benchmarks/search.py


def _search_args(*extra: str):
    from benchmarks import search

    return search.parse_args(["--workdir", "/tmp/unused", *extra])


def test_search_benchmark_plans_every_method_seed_and_data_set(capsys):
    from benchmarks import search

    assert search.main(["--plan"]) == 0  # prints the plan, runs nothing (no Ray)
    printed = capsys.readouterr().out
    assert "36 searches (6 methods x 3 seed(s) x 2 data set(s)), 24 trials each, 2 at" in printed
    plan = search.search_plan(["breastmnist", "pneumoniamnist"], [0, 1, 2])
    assert len(set(plan)) == 36 and {m for _, m, _ in plan} == set(search.METHODS)
    args = _search_args()
    configured = search.space_spec("breastmnist", "tpe_configured+asha", 1, args)
    assert configured["search"]["algorithm"] == "tpe" and "sampler" not in configured["search"]
    assert configured["search"]["scheduler"]["type"] == "asha"
    assert configured["search"]["num_samples"] == 24 and configured["search"]["seed"] == 1
    assert configured["base"]["cv"]["seed"] == 1 and configured["base"]["train"]["seed"] == 1
    default = search.space_spec("breastmnist", "tpe_default+fifo", 0, args)
    assert default["search"]["sampler"]["n_startup_trials"] == 10
    assert default["search"]["scheduler"]["type"] == "none"
    assert search.space_spec("x", "random+fifo", 0, args)["search"]["algorithm"] == "random"


def test_search_benchmark_spaces_are_valid_distmed_spaces(tmp_path):
    import yaml

    from benchmarks import search
    from distmed.search import resolve_sampler
    from distmed.space import load_space

    args = _search_args()
    for method in search.METHODS:
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(search.space_spec("breastmnist", method, 0, args)))
        spec = load_space(path, ["data.root=x.npz"])
        resolved = resolve_sampler(spec.search, args.concurrent)
        if method.startswith("tpe_configured"):
            assert resolved["n_startup_trials"] == 6 and resolved["constant_liar"] is True
        if method.startswith("tpe_default"):
            assert resolved["n_startup_trials"] == 10 and resolved["constant_liar"] is False


def test_search_benchmark_keeps_searches_recorded_in_an_earlier_session(tmp_path, monkeypatch):
    """A search recorded in the results file (its --workdir gone with an earlier machine) is
    neither run again nor dropped: the next report holds it beside the new ones, each with
    the machine it ran on; a file recorded under other settings is refused."""
    import json

    from benchmarks import search

    args = _search_args("--resume")
    settings = {k: getattr(args, k) for k in search.SHARED_SETTINGS}
    recorded = {"dataset": "breastmnist", "trials": [], "best_cv_roc_auc": 0.7, "seed": 0}
    name = search.run_name("breastmnist", "random+fifo", 0)
    results = tmp_path / "search_methods.json"
    results.write_text(
        json.dumps(
            {"machine": {"cpu_model": "earlier"}, "settings": settings, "runs": {name: recorded}}
        )
    )
    kept = search.recorded_runs(results, args)
    assert kept == {name: {"machine": {"cpu_model": "earlier"}, **recorded}}

    monkeypatch.setattr(search, "RESULTS", tmp_path)
    monkeypatch.setattr(search, "subset_for", lambda dataset, args: tmp_path / f"{dataset}.npz")
    ran, reported = [], []
    monkeypatch.setattr(search, "run_one", lambda data, d, m, s, args: ran.append((d, m, s)))
    monkeypatch.setattr(search, "finished_runs", lambda workdir: {"new": {"seed": 1}})
    monkeypatch.setattr(
        search, "report", lambda runs, args, ran_here=True: reported.append((runs, ran_here))
    )
    argv = ["--workdir", str(tmp_path / "w"), "--resume", "--datasets", "breastmnist"]
    assert search.main([*argv, "--seeds", "0", "--methods", "random+fifo"]) == 0
    # nothing ran here: the report must not record this machine as the file's
    assert ran == [] and reported[-1] == ({**kept, "new": {"seed": 1}}, False)

    other = search.parse_args(["--workdir", "/tmp/unused", "--resume", "--trials", "12"])
    with pytest.raises(SystemExit, match=r"search_methods.json: recorded with .*'trials': 24"):
        search.recorded_runs(results, other)


def test_a_report_with_no_search_run_here_keeps_the_files_machine(tmp_path, monkeypatch):
    """`--report-only` on another machine rewrites the tables, not the file's provenance."""
    import json

    from benchmarks import common, search

    monkeypatch.setattr(search, "RESULTS", tmp_path)
    written = []
    monkeypatch.setattr(common, "write_result", lambda name, payload: written.append(payload))
    monkeypatch.setattr(search, "plot_curves", lambda *a: tmp_path / "x.png")
    monkeypatch.setattr(search, "results_table", lambda *a: "")
    monkeypatch.setattr(search, "cost_table", lambda *a: "")
    monkeypatch.setattr(search, "machine_info", lambda: {"cpu_model": "here"})
    monkeypatch.setattr(search, "machine_line", lambda machine: "")
    (tmp_path / "search_methods.json").write_text(json.dumps({"machine": {"cpu_model": "there"}}))
    runs = {"r": {"dataset": "breastmnist", "seed": 0, "method": "random+fifo"}}
    summary = {"breastmnist": {"target_over_reference_per_seed": {}}}
    monkeypatch.setattr(search, "summarise", lambda *a: summary)
    args = _search_args()
    search.report(runs, args, ran_here=False)
    search.report(runs, args, ran_here=True)
    assert [w["machine"]["cpu_model"] for w in written] == ["there", "here"]


def test_search_benchmark_measures_cost_to_random_searchs_final_best():
    from benchmarks import search

    def run(method, seed, aucs, statuses=None, cpu=(5.0, 5.0, 5.0)):
        statuses = statuses or ["completed"] * len(aucs)
        trials = [
            {
                **_trial(s, a, 10.0, 1 if s == "stopped" else 3),
                "cpu_s": c,
                "first_report_s": 4.0,
                "first_report_cpu_s": 1.0,
            }
            for s, a, c in zip(statuses, aucs, cpu, strict=True)
        ]
        best = max(a for s, a in zip(statuses, aucs, strict=True) if s == "completed")
        return {"trials": trials, "best_cv_roc_auc": best, "method": method, "seed": seed}

    runs = {}
    for seed in (0, 1):
        runs[search.run_name("d", "random+fifo", seed)] = run("random+fifo", seed, [0.7, 0.8, 0.75])
        fast = [0.81, 0.6, 0.6] if seed == 0 else [0.5, 0.99, 0.6]
        runs[search.run_name("d", "tpe_configured+asha", seed)] = run(
            "tpe_configured+asha",
            seed,
            [0.95, *fast[1:]],
            ["stopped", "completed", "completed"],
            cpu=(2.0, 6.0, None),  # the last trial's worker did not report its CPU time
        )
    runs[search.run_name("d", "tpe_default+fifo", 0)] = run("tpe_default+fifo", 0, [0.5, 0.6, 0.7])
    out = search.summarise(runs, ["d"], [0, 1])["d"]
    ref = out["methods"]["random+fifo"]
    assert ref["trial_s_to_reference_best"] == {"median": 20.0, "min": 20.0, "max": 20.0, "n": 2}
    assert ref["epochs_to_reference_best"]["median"] == 6.0  # its best at trial 2: 3 + 3
    assert ref["cpu_s_to_reference_best"]["median"] == 10.0
    assert ref["total_epochs"]["median"] == 9.0
    target = out["methods"]["tpe_configured+asha"]
    # seed 0: the stopped 0.95 is no result and 0.6 < 0.8: never; seed 1: at trial 2, after
    # the stopped trial's 1 epoch and the completed one's 3.
    assert target["trial_s_to_reference_best"] == {"median": 20.0, "min": 20.0, "max": 20.0, "n": 1}
    assert target["epochs_to_reference_best"]["median"] == 4.0
    assert target["cpu_s_to_reference_best"]["median"] == 8.0
    assert target["total_cpu_s"]["n"] == 0  # a trial's CPU time unknown: no total made up
    assert target["where_cost_goes"]["stopped_early"]["median"] == pytest.approx(1 / 3)
    goes = {k: v["median"] for k, v in target["where_cost_goes"].items()}
    assert goes["first_report_share"] == pytest.approx(0.4)  # 4 of each trial's 10 s
    assert goes["first_report_s"] == 4.0 and goes["later_epoch_s"] == 3.0  # (10 - 4) / 2
    assert goes["later_epoch_cpu_s"] == 2.5  # (6 - 1) / 2; the trial without CPU-s left out
    assert goes["trial_s_per_epoch"] == pytest.approx(30 / 7)
    assert out["target_over_reference"] == {
        "epochs": pytest.approx(4 / 6),
        "cpu_s": pytest.approx(0.8),
        "trial_s": 1.0,
    }
    # Per seed: seed 0 never reaches it (inf), seed 1 in 4 of random's 6 epochs.
    per_seed = out["target_over_reference_per_seed"]
    assert per_seed["epochs"]["seeds"] == {"0": math.inf, "1": pytest.approx(4 / 6)}
    assert per_seed["epochs"]["median"] == math.inf  # of two seeds, one missing: no median met
    assert out["methods"]["random+asha"]["seeds"] == 0  # not run: no numbers made up
    table = search.results_table("d", out)
    assert "| 4 (4 - 4) | 8 (8 - 8) | 20 (20 - 20) | 1/2 |" in table
    assert "| not reached | not reached | not reached | 0/1 | 0.7000 (0.7000 - 0.7000) |" in table
    assert "random + ASHA" not in table  # not run: no row
    costs = search.cost_table("d", out)
    row = "| TPE (distmed's sampler) + ASHA | 33% | 7 | 4.3 | 4.0 / 3.0 | 40% | 1.0 / 2.5 |"
    assert row in costs
    assert "random + ASHA" not in costs  # not run


def test_search_benchmark_reads_each_trials_cpu_and_first_report_from_tunes_results(tmp_path):
    import json

    from benchmarks import search

    run_dir = tmp_path / "runs" / "breastmnist-random-fifo-seed2"
    (run_dir / "run_trial_aaaa0001_1_lr=0.01").mkdir(parents=True)
    (run_dir / "run_trial_aaaa0002_2_lr=0.02").mkdir()
    reports = [
        {"epoch": 1, "worker_cpu_s": 11.5, "time_this_iter_s": 9.0},
        {"epoch": 2, "worker_cpu_s": 14.0, "time_this_iter_s": 3.0},
    ]
    (run_dir / "run_trial_aaaa0001_1_lr=0.01" / "result.json").write_text(
        "".join(json.dumps(r) + "\n" for r in reports)
    )
    (run_dir / "run_trial_aaaa0002_2_lr=0.02" / "result.json").write_text(
        json.dumps({"epoch": 1, "time_this_iter_s": 8.0}) + "\n"  # before worker_cpu_s existed
    )
    from benchmarks.medmnist import trial_reports

    first = {"cpu_s": 14.0, "first_report_s": 9.0, "first_report_cpu_s": 11.5}
    assert trial_reports(run_dir, "aaaa0001") == first  # cpu_s at the last report
    unknown = {"cpu_s": None, "first_report_s": None, "first_report_cpu_s": None}
    assert trial_reports(run_dir, "aaaa0002") == {**unknown, "first_report_s": 8.0}
    assert trial_reports(run_dir, "bbbb0003") == unknown
    # The run's name tells its data set, method and seed; other folders are not runs.
    assert search._RUN_NAME.match(run_dir.name).groupdict() == {
        "dataset": "breastmnist",
        "sampler": "random",
        "scheduler": "fifo",
        "seed": "2",
    }
    assert search.finished_runs(tmp_path) == {}  # no summary.json: not finished


def test_search_benchmark_holds_the_ray_lock_while_a_search_runs(tmp_path):
    import fcntl

    from benchmarks.medmnist import held

    lock = tmp_path / "ray.lock"
    with held(lock) as waited:
        assert waited >= 0
        with lock.open("a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `flock -n` would find it
    with lock.open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards
    with held(None) as waited:
        assert waited == 0.0


def test_search_benchmark_counts_an_interrupted_search_as_unfinished(tmp_path):
    from benchmarks import search

    run_dir = tmp_path / "runs" / "breastmnist-random-asha-seed0"
    run_dir.mkdir(parents=True)
    assert not search.finished(run_dir)  # nothing written yet
    (run_dir / "summary.json").write_text('{"name": "x", "interrupted": true}')
    assert not search.finished(run_dir)  # Ctrl-C'd: `--resume` continues it
    assert search.finished_runs(tmp_path) == {}
    (run_dir / "summary.json").write_text('{"name": "x", "interrupted": false}')
    assert search.finished(run_dir)


def test_stream_benchmark_plans_both_sizes_and_starts_nothing_with_plan(capsys, monkeypatch):
    from benchmarks import stream

    monkeypatch.setattr(stream, "measure", lambda *a: pytest.fail("--plan must not measure"))
    assert stream.main(["--plan"]) == 0
    assert "sizes 25,000, 50,000 at 28 px; 3 nodes x 2 CPUs" in capsys.readouterr().out
    assert stream.main(["--plan", "--quick", "--cpus-per-node", "1"]) == 0
    assert "sizes 300 at 28 px; 3 nodes x 1 CPUs" in capsys.readouterr().out


def test_stream_benchmark_images_are_two_seeded_classes(tmp_path):
    from benchmarks.stream import write_images

    root = write_images(tmp_path / "a", 6, 8)
    again = write_images(tmp_path / "b", 6, 8)
    assert sorted(p.name for p in root.iterdir()) == ["neg", "pos"]
    assert len(list((root / "pos").iterdir())) == 3
    first = (root / "neg" / "img000000.png").read_bytes()
    assert first == (again / "neg" / "img000000.png").read_bytes()


def test_whole_epoch_timing_dry_run_on_cpu_splits_data_wait_from_steps(tmp_path, monkeypatch):
    """The CPU dry run of the GPU check's whole-epoch stage (the cache source; the stream's
    reader is the one test_faults_ray.py drives on a cluster)."""
    from benchmarks import epochs

    monkeypatch.setenv("DISTMED_CACHE", str(tmp_path / "cache"))
    argv = ["--device", "cpu", "--images", "24", "--size", "16", "--batch", "8"]
    argv += ["--epochs", "1", "--sources", "cache", "--workdir", str(tmp_path / "w")]
    result = epochs.run(epochs.build_parser().parse_args(argv))
    (epoch,) = result["cache"]
    assert epoch["images"] == 24 and result["device"] == "cpu" and result["cache_build_s"] >= 0
    assert epoch["data_wait_s"] + epoch["step_s"] <= epoch["wall_s"] + 1e-3
    assert epoch["step_s"] > 0 and epoch["images_per_s"] > 0
