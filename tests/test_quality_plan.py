"""benchmarks/quality.py's plan: fixed and validated without running anything (no Ray)."""

from __future__ import annotations

import pytest

from benchmarks import quality
from distmed.errors import UserError


def test_the_plan_validates_every_space_and_ablation_config(capsys, tmp_path):
    assert quality.main(["--plan", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    trials = quality.SEARCH_SETTINGS["pneumoniamnist"]["search"]["num_samples"]
    assert f"search pneumoniamnist: {trials} trials" in out and "ablation on breastmnist" in out
    assert not any(tmp_path.iterdir())  # --plan writes nothing
    plan = quality.build_plan(quality.parse_args(["--seeds", "0", "1"]))
    runs = plan["ablation"]["runs"]
    assert len(runs) == 2 * len(quality.ABLATION_ROWS)
    # same seeds for every element: only the element's own keys differ from the baseline
    base = set(runs["baseline (recipe off) / seed 1"]["overrides"])
    ema = set(runs["EMA 0.9 / seed 1"]["overrides"])
    assert ema - base == {"train.ema_decay=0.9"} and base <= ema


def test_a_broken_ablation_row_is_refused_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setitem(quality.ABLATION_ROWS, "bad", ["train.mixup_alpha=-1"])
    with pytest.raises(UserError, match="mixup_alpha"):
        quality.main(["--plan", "--workdir", str(tmp_path)])


def test_a_part_run_alone_continues_the_results_written_under_the_same_plan(monkeypatch, tmp_path):
    """`--only ablation` after the searches keeps their results and the plan as written
    before they ran; under another plan it starts a new results file."""
    import json

    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    plan = quality.build_plan(quality.parse_args([]))
    assert quality.continued_payload(plan) is None  # nothing written yet
    earlier = {**plan, "written_utc": "2026-12-05T16:45:17+00:00", "commit": "abc"}
    written = {"plan": earlier, "searches": {"breastmnist": {"best_cv_roc_auc": 0.86}}}
    (tmp_path / f"{quality.RESULT_NAME}.json").write_text(json.dumps(written))
    assert quality.continued_payload(plan) == written
    other = quality.build_plan(quality.parse_args(["--seeds", "0", "1"]))
    assert quality.continued_payload(other) is None


def test_round_two_is_its_own_plan_with_its_own_results_file(capsys, monkeypatch, tmp_path):
    """`--round 2` validates its spaces, drops the keys it names from the search, runs no
    ablation, records why it differs, and continues only a results file of its own."""
    import json

    assert quality.main(["--plan", "--round", "2", "--workdir", str(tmp_path)]) == 0
    assert "no ablation in this round" in capsys.readouterr().out
    plan = quality.build_plan(quality.parse_args(["--round", "2"]))
    assert plan["round"] == 2 and "were read before this plan" in plan["why"]
    assert plan["ablation"]["runs"] == {}
    for search in plan["searches"].values():
        space = search["space"]
        assert space["base"]["model"] == {**space["base"]["model"], "stem": "small"}
        assert not {"model.arch", "train.loss", "train.mixup_alpha"} & set(space["space"])
        assert "optim.lr" in space["space"] and search["trials"] == 6
    breast = plan["searches"]["breastmnist"]["space"]
    assert breast["base"]["train"]["epochs"] == 30
    assert breast["space"]["train.batch_size"] == {"choice": [16, 32]}  # replaced, not merged
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    first = quality.build_plan(quality.parse_args([]))
    (tmp_path / f"{quality.RESULT_NAME}.json").write_text(json.dumps({"plan": first}))
    assert quality.continued_payload(plan) is None  # round 1's file is not round 2's
    (tmp_path / "quality-r2.json").write_text(json.dumps({"plan": plan, "searches": {}}))
    assert quality.continued_payload(plan) == {"plan": plan, "searches": {}}
    # a corrected time estimate is not a new plan; a changed budget is
    monkeypatch.setitem(quality.ROUND2_MINUTES_PER_TRIAL, "breastmnist", 40.0)
    round_two = quality.parse_args(["--round", "2"])
    re_estimated = quality.build_plan(round_two)
    minutes = [p["searches"]["breastmnist"]["estimated_min"] for p in (plan, re_estimated)]
    assert minutes[0] != minutes[1]
    assert quality.continued_payload(re_estimated) == {"plan": plan, "searches": {}}
    monkeypatch.setitem(quality.ROUND2_SETTINGS["breastmnist"]["search"], "num_samples", 7)
    assert quality.continued_payload(quality.build_plan(round_two)) is None


def test_a_plan_written_in_another_checkout_is_continued(monkeypatch, tmp_path):
    """The space file's folder (a worktree, a clone) is not part of the plan: a part run from
    another checkout continues the results file; another space file is another plan."""
    import json

    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    plan = quality.build_plan(quality.parse_args(["--round", "2"]))
    assert not plan["ablation"]["config"].startswith("/")  # named from the repository's root
    elsewhere = {
        **plan,
        "ablation": {
            **plan["ablation"],
            "config": "/work/q-tree/search_spaces/backbones.yaml (its base)",
        },
    }
    written = {"plan": elsewhere, "searches": {}}
    (tmp_path / "quality-r2.json").write_text(json.dumps(written))
    assert quality.continued_payload(plan) == written
    moved = {**plan["ablation"], "config": "/work/q-tree/search_spaces/medmnist28.yaml (its base)"}
    (tmp_path / "quality-r2.json").write_text(json.dumps({"plan": {**plan, "ablation": moved}}))
    assert quality.continued_payload(plan) is None  # another space file is another plan


def test_a_plan_whose_data_lay_in_another_shared_folder_is_continued(monkeypatch, tmp_path):
    """The folder the shared data lay in on the host that wrote the plan is not part of the
    plan; another data file is."""
    import json

    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    plan = quality.build_plan(quality.parse_args(["--round", "2"]))

    def with_data(path: str) -> dict:
        searches = {d: {**part, "data": path.format(d=d)} for d, part in plan["searches"].items()}
        return {"plan": {**plan, "searches": searches}, "searches": {}}

    written = with_data("/mnt/elsewhere/shared/data/{d}.npz")
    (tmp_path / "quality-r2.json").write_text(json.dumps(written))
    assert quality.continued_payload(plan) == written
    (tmp_path / "quality-r2.json").write_text(json.dumps(with_data("/mnt/x/{d}_224.npz")))
    assert quality.continued_payload(plan) is None


def test_the_commit_record_ignores_rewritten_results_but_not_code(monkeypatch, tmp_path):
    """`dirty` says whether the code differs from HEAD; a results file rewritten between a
    benchmark's parts is output, not code."""
    import subprocess

    from benchmarks import common

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "r.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.setattr(common, "RESULTS", results)
    assert common.git_commit()[1] is False
    (results / "r.json").write_text('{"searches": {}}')
    assert common.git_commit()[1] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.git_commit()[1] is True
