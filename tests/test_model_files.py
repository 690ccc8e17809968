"""Damaged, hostile and old `best_model.pt` / `summary.json` files through the real CLIs.

Issue 24 item 6: a model whose `preprocessing.image_size` was 100000 got `distmed.predict`
killed for memory; truncated, empty or random files ended in IndexError/EOFError/KeyError
with no file named, and torch's own text advised `weights_only=False`. Every case here must
be exit status 2 with one `error:` line naming the file. No Ray.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import saved_record, write_image_folder

from distmed import export, predict, report
from distmed.model import build_model
from distmed.savedmodel import WEIGHTS_KEY, SavedModel, Threshold
from distmed.summary import DataSummary, RunSummary

SIZE = 16
CLASSES = ["neg", "pos"]


def _saved(**changes: Any) -> SavedModel:
    return saved_record(SIZE, CLASSES, **changes)


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "best_model.pt"
    torch.manual_seed(0)
    saved = _saved()
    saved.save(path, build_model(saved.config.model, 2).state_dict())
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("img") / "images", {"a": 2}, size=SIZE)


def _payload(good: Path) -> dict[str, Any]:
    return torch.load(good, weights_only=True)


def _write(path: Path, payload: Any) -> None:
    torch.save(payload, path)


def _huge_image_size(good: Path, path: Path) -> None:
    payload = _payload(good)  # a tampered file: both places that name the size
    payload["preprocessing"]["image_size"] = 100_000
    payload["config"]["data"]["image_size"] = 100_000
    _write(path, payload)


def _missing_config(good: Path, path: Path) -> None:
    payload = _payload(good)
    del payload["config"]
    _write(path, payload)


def _wrong_type(good: Path, path: Path) -> None:
    payload = _payload(good)
    payload["class_names"] = "neg,pos" * 10_000  # a 70 kB string where a list belongs
    _write(path, payload)


def _truncated(good: Path, path: Path) -> None:
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _empty(good: Path, path: Path) -> None:
    path.write_bytes(b"")


def _random(good: Path, path: Path) -> None:
    path.write_bytes(os.urandom(50_000))


class Payload:
    """Stands for what a malicious checkpoint carries instead of plain values."""


def _pickled_object(good: Path, path: Path) -> None:
    payload = _payload(good)
    payload["threshold"] = Payload()
    _write(path, payload)


def _bare_state_dict(good: Path, path: Path) -> None:
    _write(path, _payload(good)[WEIGHTS_KEY])


def _weights_for_other_classes(good: Path, path: Path) -> None:
    payload = _payload(good)
    payload["class_names"] = ["a", "b", "c"]
    payload["positive_index"] = None
    _write(path, payload)


def _newer_format(good: Path, path: Path) -> None:
    payload = _payload(good)
    payload["format"] = 99
    _write(path, payload)


BAD_MODELS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "image-size-100000": (_huge_image_size, "image_size: Input should be less than or equal"),
    "missing-field": (_missing_config, "config: required, missing; not a best_model.pt"),
    "wrong-type": (_wrong_type, "class_names: Input should be a valid list"),
    "truncated": (_truncated, "truncated or corrupt"),
    "empty": (_empty, "empty file"),
    "random-bytes": (_random, "corrupt"),
    "pickled-object": (_pickled_object, "refused as unsafe"),
    "bare-state-dict": (_bare_state_dict, "a bare state dict"),
    "weights-do-not-fit": (_weights_for_other_classes, "weights do not fit a resnet18 with 3"),
    "newer-format": (_newer_format, "newer than this distmed reads"),
}


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, path: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert str(path) in err, err
    assert "weights_only" not in err and "Traceback" not in err, err
    assert len(err) < 400, err  # never the whole rejected value
    return err


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_file_is_one_line_through_predict_and_export(
    case: str, good_model: Path, images: Path, tmp_path: Path, capsys
):
    make, expected = BAD_MODELS[case]
    path = tmp_path / "best_model.pt"
    make(good_model, path)
    started = time.perf_counter()
    code = predict.main(["--model", str(path), str(images), "--output", str(tmp_path / "p.csv")])
    assert expected in _one_line_error(capsys, code, path)
    assert time.perf_counter() - started < 5  # refused on reading, before any image work
    assert not (tmp_path / "p.csv").exists()
    argv = ["--model", str(path), "--format", "torchscript", "--output", str(tmp_path / "m.pt")]
    assert expected in _one_line_error(capsys, export.main(argv), path)


def test_an_old_model_file_without_optional_fields_still_predicts(
    good_model: Path, images: Path, tmp_path: Path, capsys
):
    payload = _payload(good_model)
    for optional in ("format", "distmed_version", "source"):
        del payload[optional]  # no threshold either: written before distmed.report ran
    path = tmp_path / "old.pt"
    _write(path, payload)
    out = tmp_path / "p.csv"
    assert predict.main(["--model", str(path), str(images), "--output", str(out)]) == 0
    assert "holds no operating threshold" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 3


def test_a_threshold_without_validation_rates_loads(good_model: Path, tmp_path: Path):
    # Thresholds saved before the report showed validation sensitivity/specificity.
    payload = _payload(good_model)
    payload["threshold"] = {"value": 0.4, "method": "youden", "chosen_on": "oof",
                            "positive_class": "pos", "num_samples": 16}  # fmt: skip
    path = tmp_path / "best_model.pt"
    _write(path, payload)
    threshold = SavedModel.load(path).threshold
    assert threshold == Threshold(**payload["threshold"])
    assert threshold.validation_sensitivity is None


def test_saved_model_round_trip(good_model: Path):
    saved, state = SavedModel.load_with_weights(good_model)
    assert saved == _saved() and saved.positive_class == "pos" and saved.binary
    assert set(state) == set(build_model(saved.config.model, 2).state_dict())


# --------------------------------------------------------------------------- summary.json


def _run_folder(tmp_path: Path, good_model: Path, summary_text: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_model.pt").write_bytes(good_model.read_bytes())
    (run / "summary.json").write_text(summary_text)
    return run


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "not valid JSON"),
        (json.dumps({"name": "x", "num_trials": 1}), "data: required, missing"),
        (
            json.dumps(
                {
                    "name": "x",
                    "num_trials": -1,
                    "trials_by_status": {},
                    "data": {"name": "d", "classes": [], "num_images": 1},
                }
            ),
            "num_trials: Input should be greater than or equal to 0",
        ),
    ],  # fmt: skip
    ids=["not-json", "missing-field", "out-of-range"],
)
def test_bad_summary_is_one_line_through_report(
    text: str, expected: str, good_model: Path, tmp_path: Path, capsys
):
    run = _run_folder(tmp_path, good_model, text)
    code = report.main([str(run)])
    assert expected in _one_line_error(capsys, code, run / "summary.json")


def _refuse(token: str):
    raise ValueError(f"not JSON: {token}")


def test_summary_round_trip_keeps_nan_and_ints(tmp_path: Path):
    summary = RunSummary(
        name="exp",
        num_trials=2,
        trials_by_status={"completed": 1, "diverged": 1},
        data=DataSummary(name="d", classes=CLASSES, num_images=10),
        best_trial="t1",
        best_fold_roc_auc=[0.5, float("nan")],
        test_metrics={"roc_auc": 0.75, "num_samples": 16},
    )
    summary.save(tmp_path / "summary.json")
    raw = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_refuse)
    assert raw["best_fold_roc_auc"] == [0.5, None]  # strict JSON: null, never NaN
    loaded = RunSummary.load(tmp_path / "summary.json")
    assert loaded.best_fold_roc_auc[0] == 0.5 and math.isnan(loaded.best_fold_roc_auc[1])
    assert loaded.test_metrics == {"roc_auc": 0.75, "num_samples": 16}
    assert isinstance(loaded.test_metrics["num_samples"], int)
    without_nan = {"best_fold_roc_auc": []}  # NaN != NaN; every other field compares
    assert loaded.model_copy(update=without_nan) == summary.model_copy(update=without_nan)
