"""Hostile command lines refused in one short line, exit 2, before any work (issue 37 item
7): every numeric option has a range, every text option a length, every path a name length.

Each case drives the real CLI's `main([...])`; Ray must not start (a refusal that came
after `ray.init` would be too late), so `ray.init` fails the test if called. No Ray.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from distmed import app, evaluate, export, predict, report, train, tune
from distmed.cli import MAX_NAME_BYTES, user_error_cause
from distmed.data import __main__ as data_cli

HUGE = "a" * 130_000  # 130 kB, as in the issue
LONG_PART = "/tmp/" + "b" * (MAX_NAME_BYTES + 1) + "/images"

MODEL = ["--model", "best_model.pt"]
TUNE = ["--space", "space.yaml"]
EVAL = [*MODEL, "--data", "site"]

# (CLI main, arguments, the option the refusal must name)
CASES: list[tuple[str, Callable[..., int], list[str], str]] = [
    # numeric options: absurd, negative, NaN, inf, not a number
    ("evaluate-bootstrap-huge", evaluate.main, [*EVAL, "--bootstrap", "1000000000"], "--bootstrap"),
    ("evaluate-bootstrap-low", evaluate.main, [*EVAL, "--bootstrap", "2"], "--bootstrap"),
    ("evaluate-threshold-nan", evaluate.main, [*EVAL, "--threshold", "nan"], "--threshold"),
    ("report-bootstrap-huge", report.main, ["run", "--bootstrap", "1000000000"], "--bootstrap"),
    ("report-sensitivity-0", report.main, ["run", "--target-sensitivity", "0"], "--target"),
    ("report-sensitivity-2", report.main, ["run", "--target-sensitivity", "2"], "--target"),
    ("predict-batch-huge", predict.main, [*MODEL, "x.png", "--batch-size", "10000000"], "--batch"),
    ("predict-batch-0", predict.main, [*MODEL, "x.png", "--batch-size", "0"], "--batch-size"),
    ("predict-threshold-inf", predict.main, [*MODEL, "x", "--threshold", "inf"], "--threshold"),
    ("app-port", app.main, [*MODEL, "--port", "99999"], "--port"),
    ("tune-samples", tune.main, [*TUNE, "--num-samples", "1000000000"], "--num-samples"),
    ("tune-samples-neg", tune.main, [*TUNE, "--num-samples", "-3"], "--num-samples"),
    ("tune-concurrent", tune.main, [*TUNE, "--max-concurrent", "0"], "--max-concurrent"),
    ("tune-gpus", tune.main, [*TUNE, "--gpus-per-worker", "1e9"], "--gpus-per-worker"),
    ("tune-nested", tune.main, [*TUNE, "--nested", "1000000"], "--nested"),
    ("tune-workers", tune.main, [*TUNE, "--workers", "1000000000"], "--workers"),
    ("train-workers", train.main, ["--workers", "-1"], "--workers"),
    ("train-workers-text", train.main, ["--workers", HUGE], "--workers"),
    # text options: 130 kB values, over-long names
    ("train-data-huge", train.main, ["--data", HUGE], "--data"),
    ("tune-data-huge", tune.main, [*TUNE, "--data", HUGE], "--data"),
    ("tune-name-huge", tune.main, [*TUNE, "--name", HUGE], "--name"),
    ("tune-name-long", tune.main, [*TUNE, "--name", "n" * 300], "--name"),
    ("tune-name-slash", tune.main, [*TUNE, "--name", "../elsewhere"], "--name"),
    ("tune-storage-part", tune.main, [*TUNE, "--storage", LONG_PART], "--storage"),
    ("train-output-part", train.main, ["--output", LONG_PART], "--output"),
    ("train-set-huge", train.main, ["--set", f"data.root={HUGE}"], "--set"),
    ("train-set-key-huge", train.main, ["--set", f"{HUGE}=1"], "--set"),
    ("evaluate-data-part", evaluate.main, [*MODEL, "--data", LONG_PART], "--data"),
    ("evaluate-class-map", evaluate.main, [*EVAL, "--class-map", f"{HUGE}=b"], "--class-map"),
    ("evaluate-split-huge", evaluate.main, [*EVAL, "--split", HUGE], "--split"),
    ("predict-input-huge", predict.main, [*MODEL, HUGE], "inputs"),
    ("predict-output-part", predict.main, [*MODEL, "x", "--output", LONG_PART], "--output"),
    ("export-model-huge", export.main, ["--model", HUGE, "--format", "onnx"], "--model"),
    ("report-run-dir-part", report.main, [LONG_PART], "run_dir"),
    ("data-root-huge", data_cli.main, [HUGE], "root"),
    ("data-json-part", data_cli.main, ["demo", "--json", LONG_PART], "--json"),
]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray started before the command line was checked")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize(
    ("main", "argv", "option"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_hostile_option_is_one_short_line_and_exit_2(main, argv, option, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err[:500]
    line = lines[0]
    assert line.startswith("error: ") and option in line, line
    assert len(line) < 400, line  # the value is quoted cut short, never echoed whole
    assert "Traceback" not in line


def test_a_numeric_refusal_names_the_allowed_range(capsys):
    assert evaluate.main([*EVAL, "--bootstrap", "1000000000"]) == 2
    assert "from 10 to 10000" in capsys.readouterr().err


def test_values_inside_the_ranges_still_parse():
    parsed = tune.build_parser()
    from distmed.cli import parse

    args = parse(
        parsed, [*TUNE, "--num-samples", "20", "--gpus-per-worker", "0.5", "--nested", "3"]
    )
    assert (args.num_samples, args.gpus_per_worker, args.nested) == (20, 0.5, 3)
    args = parse(evaluate.build_parser(), [*EVAL, "--bootstrap", "10000", "--threshold", "1"])
    assert (args.bootstrap, args.threshold) == (10000, 1.0)


def test_a_name_too_long_for_the_file_system_deep_inside_is_one_short_line():
    try:
        try:
            raise OSError(errno.ENAMETOOLONG, "File name too long", "/runs/" + HUGE)
        except OSError as exc:
            raise RuntimeError("a wrapper, as Ray or pyarrow raise") from exc
    except RuntimeError as wrapped:
        cause = user_error_cause(wrapped)
    assert cause is not None
    assert "name too long" in str(cause) and len(str(cause)) < 300


def test_the_default_evaluation_folder_stays_within_name_max(tmp_path):
    from distmed.evaluate import default_output

    name = "d" * MAX_NAME_BYTES  # a data folder named up to the limit
    for ensemble in ("refit", "folds"):
        assert len(default_output(tmp_path / "m.pt", name, ensemble).name) <= MAX_NAME_BYTES
