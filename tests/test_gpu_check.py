"""`bash dev.sh gpu-check` on CPU: its no-GPU path, and the checks it applies to GPU results.

The GPU stages themselves run only on a CUDA machine; here the entry point must say so in one
line and exit 0, and the verdicts it would give on results files are checked on made-up ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.common import RESULTS
from benchmarks.loops import LoopBudget, measure

REPO = Path(__file__).resolve().parents[1]


def gpu_results() -> set[str]:
    return {p.name for p in RESULTS.glob("gpu-*.json")}


def test_without_cuda_main_says_so_in_one_line_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = gpu_results()
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out == gpu_check.NO_CUDA + "\n"
    assert gpu_results() == before


def test_dev_sh_gpu_check_without_cuda_exits_0_with_the_line_and_no_venv(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    env.pop("DISTMED_PYTHON", None)
    done = subprocess.run(
        ["bash", "dev.sh", "gpu-check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [gpu_check.NO_CUDA]


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit, match="unknown"):
        gpu_check.main(["--stages", "tests,bench"])


def cv_result(**changes) -> dict:
    fold = {"history": [{"epoch": 1, "train_images_per_s": 900.0}]}
    return {"device": "cuda", "precision": "bf16", "folds": [fold, fold], "mean_roc_auc": 0.7}


def test_train_check_accepts_cuda_in_the_expected_precision():
    verdict = gpu_check.check_train(cv_result(), {"wall_s": 30.0}, "bf16")
    assert verdict["ok"] and verdict["problems"] == []
    assert verdict["epoch_images_per_s"] == [900.0, 900.0]


@pytest.mark.parametrize(
    ("changes", "expected", "problem"),
    [
        ({"device": "cpu"}, "bf16", "trained on 'cpu'"),
        ({}, "fp16", "precision 'bf16', expected 'fp16'"),
        ({"folds": []}, "bf16", "0 folds"),
        ({"mean_roc_auc": float("nan")}, "bf16", "not finite"),
    ],
)
def test_train_check_names_what_is_wrong(changes, expected, problem):
    verdict = gpu_check.check_train({**cv_result(), **changes}, {"wall_s": 1.0}, expected)
    assert not verdict["ok"]
    assert any(problem in p for p in verdict["problems"])


def test_train_check_without_a_result_reports_the_process_error():
    verdict = gpu_check.check_train(None, {"error": "exit status 2; log tail:\n..."}, "bf16")
    assert verdict == {"ok": False, "problems": ["exit status 2; log tail:\n..."]}


PLAN = (
    "distmed 0.1.0: 2 trials on demo (400 images, 2 folds), 2 at a time, "
    "1 worker(s) x 8 CPU + 0.5 GPU each -> /tmp/x/gpu-check"
)


def summary(**changes) -> dict:
    base = {
        "num_trials": 2,
        "trials_by_status": {"completed": 2, "stopped": 0, "diverged": 0, "errored": 0},
        "best_config": {"scaling": {"gpus_per_worker": 0.5, "num_workers": 1}},
        "best_cv_roc_auc": 0.6,
        "test_metrics": {"roc_auc": 0.7},
    }
    return {**base, **changes}


def test_tune_check_accepts_two_packed_trials_with_a_test_evaluation():
    verdict = gpu_check.check_tune(summary(), PLAN, {"wall_s": 60.0})
    assert verdict["ok"], verdict["problems"]


@pytest.mark.parametrize(
    ("plan", "changes", "problem"),
    [
        (PLAN.replace("2 at a time", "1 at a time"), {}, "not planned as 2 trials at once"),
        (PLAN.replace(" + 0.5 GPU", ""), {}, "not planned"),
        (PLAN, {"trials_by_status": {"completed": 1, "errored": 1}}, "expected 2 fine"),
        (PLAN, {"best_config": {"scaling": {"gpus_per_worker": 1.0}}}, "not 0.5 GPU"),
        (PLAN, {"test_metrics": None}, "no test_metrics"),
    ],
)
def test_tune_check_names_what_is_wrong(plan, changes, problem):
    result = summary(**changes)
    if changes.get("test_metrics", "") is None:
        del result["test_metrics"]
    verdict = gpu_check.check_tune(result, plan, {"wall_s": 1.0})
    assert not verdict["ok"]
    assert any(problem in p for p in verdict["problems"]), verdict["problems"]


def test_tests_stage_fails_on_a_skip_or_when_nothing_ran(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b">'
        '<skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    tests = gpu_check.read_junit(report)
    assert [(t["name"], t["outcome"]) for t in tests] == [
        ("test_a", "passed"),
        ("test_b", "skipped"),
    ]
    verdict = gpu_check.check_tests(tests, {"error": "exit status 0"})
    assert not verdict["ok"] and verdict["passed"] == 1
    assert verdict["problems"] == ["test_b skipped: needs a CUDA GPU"]
    assert gpu_check.check_tests(tests[:1], {"wall_s": 5.0})["ok"]
    assert not gpu_check.check_tests([], {"error": "timed out"})["ok"]


def test_results_copied_to_out_have_safe_names_and_stay_within_the_limit(tmp_path):
    sources = []
    for name in ("gpu-check.json", "gpu tune (1).json", *(f"gpu-{i}.json" for i in range(8))):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(name)
        sources.append(path)
    copied = gpu_check.copy_out(sources, tmp_path / "out")
    assert [p.name for p in copied][:2] == ["gpu-check.json", "gpu_tune__1_.json"]
    assert len(copied) == 7
    assert (tmp_path / "out" / "gpu_tune__1_.json").read_text() == "gpu tune (1).json"


def test_stage_env_puts_this_checkout_first_and_keeps_the_callers_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = gpu_check.stage_env(tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/tmp/site"]
    assert env["RAY_AUTH_MODE"] == "token"  # the caller's choice wins over the default
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["DISTMED_CACHE"] == str(tmp_path / "cache")


def test_ratios_and_table_from_measured_loops():
    cell = {
        "arch": "resnet18",
        "image_size": 224,
        "batch_size": 64,
        "distmed": {
            "images_per_s": 3000.0,
            "precision": "bf16",
            "channels_last": True,
            "peak_gpu_mib": 2100.0,
        },
        "plain_fp32": {"images_per_s": 1000.0, "peak_gpu_mib": 3000.0},
        "plain_same": {"error": "OutOfMemoryError: ..."},
    }
    cell["ratios"] = gpu_check.gpu_ratios(cell)
    assert cell["ratios"] == {"distmed_over_plain_fp32": 3.0}
    table = gpu_check.format_gpu_table({"cells": [cell]})
    row = table.splitlines()[2]
    assert row.startswith("| resnet18@224/b64 | bf16 + channels_last | 3000.0 | 1000.0 | - |")
    assert "3.00x" in row and "2100 / 3000 / -" in row


def test_measure_waits_for_the_device_before_each_clock_reading():
    events = []
    budget = LoopBudget(repeat_seconds=0.0, cell_seconds=1.0, min_steps=3, max_repeats=2)
    budget = LoopBudget(**{**budget.__dict__, "warmup_steps": 4})
    result = measure(lambda: events.append("step"), 8, budget, sync=lambda: events.append("sync"))
    # 3 untimed warm-up steps, a sync, the timed last warm-up step, a sync; then per repeat
    # 3 steps and a sync.
    head = ["step"] * 3 + ["sync", "step", "sync"]
    assert events[:6] == head
    assert events[6:] == (["step"] * 3 + ["sync"]) * result["repeats"]
    assert result["warmup_steps"] == 4 and result["steps_per_repeat"] == 3


def test_a_broken_stage_is_recorded_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    """The orchestration with the stages stubbed: results per stage, a summary, $OUT copies."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "gpu_info", lambda: {"gpu_name": "Fake GPU"})
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    written = {}

    def write_result(name, payload):
        written[name] = payload
        path = tmp_path / f"{name}.json"
        path.write_text("{}")
        return path

    def broken(work, env):
        raise RuntimeError("no GPU after all")

    def fine(work, env):
        (work / "train.log").write_text("trained\n")
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)  # the checkout
        return {"ok": True, "problems": []}

    monkeypatch.setattr(gpu_check, "write_result", write_result)
    monkeypatch.setattr(gpu_check, "run_tests_stage", broken)
    monkeypatch.setattr(gpu_check, "run_train_stage", fine)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_check.main(["--stages", "tests,train"]) == 1
    assert set(written) == {"gpu-tests", "gpu-train", "gpu-check"}
    stages = written["gpu-check"]["stages"]
    assert stages["tests"]["ok"] is False
    assert stages["tests"]["problems"] == ["RuntimeError: no GPU after all"]
    assert stages["train"]["ok"] is True and written["gpu-check"]["ok"] is False
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["gpu-check-stages.log", "gpu-check.json", "gpu-tests.json", "gpu-train.json"]
    assert "trained" in (tmp_path / "out" / "gpu-check-stages.log").read_text()
    assert "gpu-check FAILED" in capsys.readouterr().out
