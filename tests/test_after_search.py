"""Faults after the search (issue 37 items 8, 9): Ctrl-C, a full disk and a read-only results
folder while the results are written, and a best trial whose checkpoint is gone.

The CLI cases drive the real `distmed.tune.main([...])` with the stages that need Ray or data
(`distmed.pipeline.claim` ... `finalize`) replaced by fakes that write what the real ones
would; the stages under test (`after_search`, `write_report`, `keep_trials_csv`) are real.
Faults are real where the machine allows: torch.save and Python writes to /dev/full fail as
on a full disk. No Ray.
"""

from __future__ import annotations

import errno
import logging
import signal
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distmed import _ray_compat, pipeline, runreport, searchfile, tune
from distmed.results import TrialRow
from distmed.space import load_space
from distmed.summary import RunSummary

real_run_search = pipeline.run_search
SPACE = str(Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml")


def _row(trial_id: str, auc: float, keys: list[str] = ["optim.lr"]) -> TrialRow:  # noqa: B006
    params = {key: 1 for key in keys}
    return TrialRow(trial_id, params, "completed", auc, 0.01, [auc] * 5, [3] * 5, 3, 1.0, 0.01)


@pytest.fixture
def fake_stages(monkeypatch, tmp_path: Path) -> Path:
    """`tune.main` up to the report without Ray or data: a search with one completed trial,
    its summary.json and best_model.pt written as the real stages would. Returns the run's
    results folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(pipeline, "claim", lambda *args: None)
    monkeypatch.setattr(
        pipeline,
        "prepare",
        lambda *args: SimpleNamespace(data=SimpleNamespace(index=None, cache=object())),
    )
    monkeypatch.setattr(pipeline, "connect", lambda data, *args, **kw: data)
    monkeypatch.setattr(searchfile, "record_search", lambda *args: None)  # tune imports it late
    best = _row("aaaa0001", 0.9)

    def run_search(spec, data, ctx, warm=None):
        pipeline.write_trials_csv(ctx.local / "trials.csv", [best], ["optim.lr"])
        return pipeline.SearchOutcome([best], ["optim.lr"], False, best, None)

    def save_summary(summary, ctx, **update):
        (ctx.local / pipeline.SUMMARY_FILE).write_text("{}\n")
        return summary

    def finalize(chosen, outcome, data, ctx, target_sensitivity=None):
        torch.save({"weights": torch.zeros(4)}, ctx.local / pipeline.MODEL_FILE)
        return pipeline.FinalModel(ctx.local / pipeline.MODEL_FILE, 3)

    monkeypatch.setattr(pipeline, "run_search", run_search)
    summary = SimpleNamespace(best_config=object(), interrupted=False)
    monkeypatch.setattr(pipeline, "summarize", lambda *args: summary)
    monkeypatch.setattr(pipeline, "save_summary", save_summary)
    monkeypatch.setattr(pipeline, "finalize", finalize)
    return tmp_path / "runs" / "t1"


def _tune(tmp_path: Path, *extra: str) -> int:
    return tune.main(
        ["--space", SPACE, "--storage", str(tmp_path / "runs"), "--name", "t1", *extra]
    )


def test_ctrl_c_while_the_report_is_written_stops_at_once_and_says_what_is_saved(
    fake_stages: Path, tmp_path: Path, monkeypatch, capsys
):
    reached = []

    def interrupted(run_dir, experiment_uri=None):
        reached.append(run_dir)
        raise KeyboardInterrupt  # as Ctrl-C does, once Ray Train's handler is kept out

    monkeypatch.setattr(runreport, "build_report", interrupted)
    monkeypatch.setattr(pipeline, "publish", lambda ctx: pytest.fail("went on after Ctrl-C"))

    assert _tune(tmp_path) == 130
    err = capsys.readouterr().err
    assert reached
    assert f"saved in {fake_stages}" in err
    assert "trials.csv, summary.json, best_model.pt" in err
    assert f"python -m distmed.report {fake_stages}" in err


def test_ctrl_c_after_a_ray_train_fit_is_not_swallowed():
    # DataParallelTrainer.fit installs this handler ("Gracefully aborting the training
    # run") and never removes it; the refit runs with it kept out.
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    before = signal.getsignal(signal.SIGINT)
    try:
        with _ray_compat.train_keeps_ctrl_c():
            DataParallelTrainer._register_sigint_handler(None, controller=None)
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)


def _torch_save_to_a_full_disk(run_dir, experiment_uri=None):
    torch.save({"figure": torch.zeros(100_000)}, "/dev/full")  # torch's "unexpected pos"


def _write_to_a_full_disk(run_dir, experiment_uri=None):
    with open("/dev/full", "w") as handle:  # OSError errno 28, no file name
        handle.write("x" * 100_000)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("write", [_torch_save_to_a_full_disk, _write_to_a_full_disk])
def test_a_disk_that_fills_while_the_report_is_written_is_one_line_and_exit_2(
    write, fake_stages: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setattr(runreport, "build_report", write)

    assert _tune(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: cannot write the results in {fake_stages}: no space left")
    assert "free space there" in err and f"python -m distmed.report {fake_stages}" in err
    for kept in ("trials.csv", "summary.json", "best_model.pt"):  # written before: kept
        assert (fake_stages / kept).is_file()


def test_a_read_only_results_folder_keeps_trials_csv_elsewhere_and_says_where(
    fake_stages: Path, tmp_path: Path, monkeypatch, capsys
):
    # The real run_search, from the Tuner's result on: Tune's trials as rows -> trials.csv.
    monkeypatch.setattr(pipeline, "run_search", real_run_search)
    monkeypatch.setattr(pipeline, "_fit_tuner", lambda *args: (None, {"algorithm": "tpe"}))
    monkeypatch.setattr(
        pipeline, "collect_rows", lambda grid, keys, **kw: [_row("aaaa0001", 0.9, keys)]
    )
    real_write = pipeline.write_trials_csv

    def read_only_results(path: Path, rows, keys):
        if path.parent == fake_stages:  # chmod does not stop root: the error it would give
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_write(path, rows, keys)

    monkeypatch.setattr(pipeline, "write_trials_csv", read_only_results)
    monkeypatch.setattr(pipeline, "summarize", lambda *a: pytest.fail("went on after the fault"))

    assert _tune(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    kept = tmp_path / "tmp" / pipeline.UNSAVED_FOLDER / "t1" / "trials.csv"
    assert err.startswith(f"error: cannot write the results in {fake_stages}: permission denied")
    assert f"kept instead: {kept}" in err and "chmod -R u+w" in err and "--resume" in err
    assert "aaaa0001" in kept.read_text()  # the trial computed is not lost


def test_a_report_that_fails_for_another_reason_is_still_a_warning(
    fake_stages: Path, tmp_path: Path, monkeypatch, caplog
):
    def broken(run_dir, experiment_uri=None):
        raise ValueError("a figure could not be drawn")

    monkeypatch.setattr(runreport, "build_report", broken)
    monkeypatch.setattr(pipeline, "log_to_mlflow", lambda *args: None)
    monkeypatch.setattr(pipeline, "format_results", lambda *args: "done")

    assert _tune(tmp_path) == 0
    assert "report failed (ValueError" in caplog.text


# --------------------------------------------------------------------------- item 9


def _finalize_without_fold_models(tmp_path: Path, monkeypatch, calibration=None):
    """`pipeline.finalize` with the refit faked, no fold checkpoint left and `calibration`
    as the fitted temperature; returns (FinalModel, save_model's keyword arguments)."""
    saved: dict = {}
    monkeypatch.setattr(pipeline, "read_trial_detail", lambda uri: None)
    monkeypatch.setattr(pipeline, "refit_chosen", lambda *args: {"w": torch.zeros(1)})
    monkeypatch.setattr(pipeline, "final_fold_states", lambda uri, epochs: [])  # deleted
    monkeypatch.setattr(pipeline, "save_model", lambda path, *args, **kw: saved.update(kw))
    monkeypatch.setattr(pipeline, "score_test", lambda *args: {})
    monkeypatch.setattr(pipeline, "delete_checkpoints", lambda uri: None)
    spec = load_space(SPACE, [])
    best = _row("bbbb0002", 0.8)
    outcome = pipeline.SearchOutcome([best], ["optim.lr"], False, best, None)
    ctx = pipeline.RunContext.create("t9", str(tmp_path), True, False, "RESUME")
    data = SimpleNamespace(
        plan=SimpleNamespace(task=SimpleNamespace()),
        index=SimpleNamespace(pool=[0] * 10),
        cache=SimpleNamespace(channels=1),
    )
    monkeypatch.setattr(pipeline, "operating_threshold", lambda *args: None)
    monkeypatch.setattr(pipeline, "fit_oof_temperature", lambda *args: calibration)
    return pipeline.finalize(spec.base, outcome, data, ctx), saved  # type: ignore[arg-type]


def test_a_best_trial_without_its_checkpoint_warns_and_records_the_missing_ensemble(
    tmp_path: Path, monkeypatch, capsys
):
    """The best trial's checkpoint deleted, then --resume: finalize finds no fold models."""
    final, saved = _finalize_without_fold_models(tmp_path, monkeypatch)

    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "trial bbbb0002" in warnings[0] and "--ensemble folds is unavailable" in warnings[0]
    assert saved["folds"] is None
    update = final.summary_update()
    assert "bbbb0002" in update["fold_models_missing"]
    assert "fold_models_missing" in RunSummary.model_fields  # recorded in summary.json
    assert update["calibration_note"] is None


def test_a_temperature_kept_at_one_is_recorded_in_summary_json(tmp_path: Path, monkeypatch):
    """Separable out-of-fold predictions: the temperature stays 1, and summary.json says why."""
    from distmed.calibration import TemperatureFit

    kept = TemperatureFit(
        temperature=1.0, nll_before=0.1, nll_after=0.1, ece_before=0.1, ece_after=0.1,
        num_samples=30, kept_at_one="the out-of-fold predictions are separable",
    )  # fmt: skip
    final, saved = _finalize_without_fold_models(tmp_path, monkeypatch, kept)
    assert saved["calibration"] == kept
    note = final.summary_update()["calibration_note"]
    assert note == "temperature kept at 1 (not fitted): the out-of-fold predictions are separable"
    assert RunSummary.model_fields["calibration_note"].description


def test_a_folder_made_read_only_mid_search_is_one_log_line_not_a_traceback_per_snapshot(
    caplog,
):
    from distmed.failures import one_line_write_failures

    state = logging.getLogger("ray.tune.execution.experiment_state")
    denied = PermissionError(errno.EACCES, "Permission denied", "/runs/t1/experiment_state.json")
    with one_line_write_failures():
        for _ in range(12):  # Tune's snapshot every few seconds, each failing the same way
            try:
                raise denied
            except PermissionError:
                state.error("Saving experiment state to storage failed:", exc_info=True)
        state.error("another error: %s", "kept")
    records = [r for r in caplog.records if r.name == state.name]
    assert len(records) == 2
    assert records[0].exc_info is None and "Traceback" not in caplog.text
    assert "/runs/t1/experiment_state.json: permission denied" in records[0].getMessage()
    assert records[1].getMessage() == "another error: kept"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_failed_write_anywhere_is_one_user_error_line():
    from distmed.failures import user_error_cause

    try:
        torch.save({"weights": torch.zeros(100_000)}, "/dev/full")  # the refit's best_model.pt
    except RuntimeError as exc:
        torch_write = user_error_cause(exc, "/runs/t1")
    assert torch_write is not None
    assert "/runs/t1" in str(torch_write) and "full disk" in str(torch_write)
    denied = PermissionError(errno.EROFS, "Read-only file system", "/runs/t1/summary.json")
    line = str(user_error_cause(denied))
    assert line.startswith("'/runs/t1/summary.json': read-only file system;")
    assert user_error_cause(OSError(errno.EIO, "Input/output error")) is None  # not the user's


def test_a_full_disk_elsewhere_after_the_search_names_that_file_not_the_results(
    fake_stages: Path, tmp_path: Path, monkeypatch, capsys
):
    cache = str(tmp_path / "cache" / "images.npy")

    def cache_disk_full(run_dir, experiment_uri=None):
        raise OSError(errno.ENOSPC, "No space left on device", cache)

    monkeypatch.setattr(runreport, "build_report", cache_disk_full)

    assert _tune(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no space left on the device holding {cache};")
