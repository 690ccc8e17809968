"""What a user sees: console lines (search, refit), figure frames, Grad-CAM notes, report footer.

Everything here runs without Ray: callbacks and stream filters are called directly.
"""

from __future__ import annotations

import io
import os
import queue
import re
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from distmed import plots, predict, runreport, scorecard
from distmed.config import ExperimentConfig
from distmed.fitcallbacks import RefitEpochLines, format_epoch
from distmed.gradcam import FLAT_MAP_NOTE, gradcam_maps, is_flat
from distmed.model import build_model
from distmed.refit import relay_lines
from distmed.savedmodel import save_model
from distmed.search import (
    HIDDEN_STATUS_LINES,
    PRINT_TRIAL_ERRORS,
    DropLines,
    EpochLines,
    hidden_status_lines,
)
from distmed.summary import DataSummary, RunSummary
from distmed.task import task_for

SIZE = 32
CLASSES = ["neg", "pos"]

# --------------------------------------------------------------------------- epoch lines


def test_epoch_line_shows_what_the_report_has():
    search = {"epoch": 3, "cv_roc_auc": 0.81234, "cv_roc_auc_std": 0.021, "train_loss": 0.41}
    assert format_epoch(search) == "epoch 3: CV ROC-AUC 0.8123 ± 0.0210, train loss 0.4100"
    refit = {"epoch": 3, "train_loss": 0.41, "folds_active": 1}  # no validation data
    assert format_epoch(refit, epochs=10, seconds=12.4) == "epoch 3/10: train loss 0.4100, 12 s"


def test_search_epoch_lines_keep_their_prefix_and_add_tune_timing(capsys):
    trial = SimpleNamespace(trial_id="ab12")
    result = {"epoch": 1, "cv_roc_auc": 0.7, "cv_roc_auc_std": 0.05, "train_loss": 0.6}
    EpochLines().on_trial_result(0, [], trial, {**result, "time_this_iter_s": 7.2})
    out = capsys.readouterr().out
    # Ray tests and users' scripts look for "trial ID epoch N:".
    assert out == "  trial ab12 epoch 1: CV ROC-AUC 0.7000 ± 0.0500, train loss 0.6000, 7 s\n"


def test_refit_callback_sends_one_line_per_report_with_the_time_between_them():
    sent: list[str] = []
    times = iter([100.0, 112.0, 120.5])  # construction, first report, second report
    callback = RefitEpochLines(10, sent.append, clock=lambda: next(times))
    rank0 = {"epoch": 1, "train_loss": 0.5, "cv_complete": 0}
    callback.after_report(None, [rank0, {**rank0, "train_loss": 9.0}], checkpoint=None)
    callback.after_report(None, [{**rank0, "epoch": 2, "train_loss": 0.25}], checkpoint=None)
    assert sent == [
        "refit epoch 1/10: train loss 0.5000, 12 s",  # rank 0's report, not rank 1's
        "refit epoch 2/10: train loss 0.2500, 8 s",
    ]


def test_relay_shows_every_line_sent_before_the_block_ends_in_order():
    lines: queue.Queue[str | None] = queue.Queue()
    shown: list[str] = []
    with relay_lines(lines, shown.append):
        sender = threading.Thread(target=lambda: [lines.put(f"line {i}") for i in range(50)])
        sender.start()
        sender.join()
    assert shown == [f"line {i}" for i in range(50)]


# --------------------------------------------------------------------------- Tune's status


def test_tune_status_block_loses_only_the_resource_line(capsys):
    from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter
    from ray.tune.utils.resource_updater import _ResourceUpdater

    reporter = TuneTerminalReporter(AirVerbosity.DEFAULT, num_samples=2, metric="m", mode="max")
    usage = _ResourceUpdater().debug_string({})  # Ray's own text for the line
    assert usage.startswith(HIDDEN_STATUS_LINES)
    with hidden_status_lines():
        reporter.print_heartbeat([], usage, force=True)
    out = capsys.readouterr().out
    assert "Trial status" in out and "Current time" in out and "Trial name" in out
    assert "Logical resource usage" not in out

    with hidden_status_lines(hide=False):  # --verbose
        reporter.print_heartbeat([], usage, force=True)
    assert "Logical resource usage" in capsys.readouterr().out


def test_an_errored_trial_is_not_a_traceback_from_tune_unless_verbose(monkeypatch):
    import inspect

    from ray.tune.execution import tune_controller

    # Ray's own switch, read when its controller starts (inside Tuner.fit).
    assert f'"{PRINT_TRIAL_ERRORS}"' in inspect.getsource(tune_controller.TuneController)
    monkeypatch.setenv(PRINT_TRIAL_ERRORS, "1")
    with hidden_status_lines():
        assert os.environ[PRINT_TRIAL_ERRORS] == "0"
    assert os.environ[PRINT_TRIAL_ERRORS] == "1"  # as it was
    with hidden_status_lines(hide=False):  # --verbose
        assert os.environ[PRINT_TRIAL_ERRORS] == "1"
    monkeypatch.delenv(PRINT_TRIAL_ERRORS)
    with hidden_status_lines():
        pass
    assert PRINT_TRIAL_ERRORS not in os.environ


def test_drop_lines_survives_any_split_of_the_writes():
    text = "a\nLogical resource usage: 0.01/2 CPUs\nLogical is fine\n\nLog\nlast"
    expected = "a\nLogical is fine\n\nLog\nlast"
    for chunk in (1, 2, 5, len(text)):
        out = io.StringIO()
        stream = DropLines(out, HIDDEN_STATUS_LINES)
        for start in range(0, len(text), chunk):
            stream.write(text[start : start + chunk])
        stream.release()
        assert out.getvalue() == expected, chunk


def test_drop_lines_passes_an_unfinished_ordinary_line_at_once():
    out = io.StringIO()
    stream = DropLines(out, HIDDEN_STATUS_LINES)
    stream.write("loading 50%")
    assert out.getvalue() == "loading 50%"  # not held back waiting for its newline
    stream.write("Logical resource usage: ?")  # the rest of that same line
    assert out.getvalue() == "loading 50%Logical resource usage: ?"


# --------------------------------------------------------------------------- figures


@pytest.mark.parametrize("draw", ["plot_roc", "plot_precision_recall"])
def test_rate_curves_at_one_are_drawn_inside_the_frame(draw: str, tmp_path: Path, monkeypatch):
    import matplotlib.pyplot as plt

    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, path, tight=True: drawn.setdefault("fig", fig))
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])  # perfectly separated
    getattr(plots, draw)(labels, probs, task_for(CLASSES), tmp_path / "c.png")
    ax = drawn["fig"].axes[0]
    for low, high in (ax.get_xlim(), ax.get_ylim()):
        assert low < 0 and high > 1
    curve = ax.lines[0].get_xydata()
    assert curve.max() == 1.0 and curve.min() == 0.0  # the curve does touch 0 and 1
    plt.close("all")


# --------------------------------------------------------------------------- Grad-CAM


def _model(flat: bool) -> torch.nn.Module:
    """A random ResNet; `flat`: its head ignores the features, so no gradient reaches them."""
    torch.manual_seed(0)
    model = build_model(ExperimentConfig().model.model_copy(update={"weights": "none"}), 2)
    if flat:
        with torch.no_grad():
            model.fc.weight.zero_()
    return model


def test_is_flat_tells_a_constant_map_from_a_real_one():
    assert is_flat(np.zeros((SIZE, SIZE), np.float32))
    assert is_flat(np.full((SIZE, SIZE), 0.7, np.float32) + 1e-8)
    images = np.random.default_rng(0).integers(0, 255, (2, 1, SIZE, SIZE), dtype=np.uint8)
    real = gradcam_maps(_model(flat=False), images, [0, 1])
    assert not any(is_flat(heat) for heat in real)
    dead = gradcam_maps(_model(flat=True), images, [0, 1])
    assert all(is_flat(heat) for heat in dead)  # what pytorch-grad-cam gives for no gradient


def _saved_model(folder: Path, flat: bool) -> Path:
    cfg = ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": SIZE}, "model": {"weights": "none"}}
    )
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "best_model.pt", _model(flat).state_dict(), cfg, task_for(CLASSES), 1, "t")
    return folder / "best_model.pt"


@pytest.mark.parametrize("flat", [True, False])
def test_predict_names_the_overlays_whose_map_is_flat(flat: bool, tmp_path: Path, capsys):
    images = write_image_folder(tmp_path / "images", {"a": 1, "b": 1}, size=20, mode="RGB")
    model = _saved_model(tmp_path / "run", flat)
    cams = tmp_path / "cams"
    argv = ["--model", str(model), str(images), "--output", str(tmp_path / "p.csv")]
    assert predict.main([*argv, "--gradcam", str(cams)]) == 0
    err = capsys.readouterr().err
    written = sorted(p.name for p in cams.glob("*.png"))
    assert len(written) == 2
    notes = [line for line in err.splitlines() if "flat" in line]
    if flat:
        assert len(notes) == 1 and all(name in notes[0] for name in written)
    else:
        assert notes == []


def _run_data(tmp_path: Path, flat: bool) -> runreport.RunData:
    model_path = _saved_model(tmp_path / "run", flat)
    images = np.random.default_rng(1).integers(0, 255, (8, 1, SIZE, SIZE), dtype=np.uint8)
    np.save(tmp_path / "test.npy", images)
    labels = np.repeat([0, 1], 4)
    probs = np.tile([[0.4, 0.6]], (8, 1))
    summary = RunSummary(
        name="exp",
        num_trials=0,
        trials_by_status={},
        space={},
        data=DataSummary(name="tiny", classes=CLASSES, num_images=8),
    )
    return runreport.RunData(
        run_dir=tmp_path / "run",
        summary=summary,
        trials=[],
        space_keys=[],
        model_path=model_path,
        task=task_for(CLASSES),
        detail=None,
        test={
            "labels": labels,
            "probs": probs,
            "images_path": np.array(str(tmp_path / "test.npy")),
        },
    )


@pytest.mark.parametrize("flat", [True, False])
def test_report_marks_flat_gradcam_tiles_and_says_why(flat: bool, tmp_path: Path, monkeypatch):
    tiles_drawn: list[list[tuple[np.ndarray, str]]] = []
    monkeypatch.setattr(
        plots,
        "plot_gradcam_grid",
        lambda tiles, columns, layer, path: tiles_drawn.append(list(tiles)) or _png(path),
    )
    section = runreport.gradcam_section(_run_data(tmp_path, flat), tmp_path, None)
    [tiles] = tiles_drawn
    marked = [caption for _, caption in tiles if FLAT_MAP_NOTE in caption]
    if flat:
        assert len(marked) == len(tiles) > 0
        assert f"{len(tiles)} of {len(tiles)} maps are flat" in section
    else:
        assert marked == [] and "flat" not in section


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (2, 2)).save(path)
    return path


# --------------------------------------------------------------------------- report footer


def test_report_footer_gives_the_time_in_utc_and_the_run_versions():
    versions = {"distmed": "0.9.1", "python": "3.11.9", "torch": "2.5.1", "ray": "2.60.0"}
    paris = timezone(timedelta(hours=1))
    page = scorecard.render_page(
        "exp", ["<p>x</p>"], versions, datetime(2026, 1, 2, 4, 5, 6, tzinfo=paris)
    )
    footer = page[page.index("<footer>") :]
    assert "2026-01-02T03:05:06+00:00" in footer
    for name, version in versions.items():
        assert f"{name} {version}" in footer


def test_report_footer_defaults_to_now_and_copes_without_versions():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    page = scorecard.render_page("exp", [])
    stamp = re.search(r"generated (\S+) by distmed", page)
    assert stamp is not None
    assert before <= datetime.fromisoformat(stamp[1]) <= datetime.now(timezone.utc)
    assert "search run with" not in page
