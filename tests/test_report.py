"""Report, predict and export on a finished tiny run built without Ray."""

from __future__ import annotations

import base64
import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from distmed import export, predict, report, runreport
from distmed.config import ExperimentConfig
from distmed.cv import CVResult, FoldResult
from distmed.data import decode_split, scan_folder, to_model_input
from distmed.inference import TEST_PREDICTIONS, evaluate_test, load_model
from distmed.metrics import CI_METRICS, resample_indices
from distmed.model import build_model
from distmed.pipeline import operating_threshold
from distmed.results import (
    TrialRow,
    oof_predictions,
    read_trial_detail,
    write_trial_detail,
    write_trials_csv,
)
from distmed.savedmodel import SavedModel, save_model, save_threshold
from distmed.summary import DataSummary, RunSummary
from distmed.task import BinaryTask, MulticlassTask, task_for

BINARY = BinaryTask(("neg", "pos"))  # class 1 scored, as the binary tests label it

SIZE = 32
CLASSES = ["neg", "pos"]
KEYS = ["optim.lr", "optim.name"]


def _history(rng: np.random.Generator, epochs: int) -> list[dict[str, float]]:
    return [
        {
            "epoch": e + 1,
            "train_loss": 0.7 - 0.05 * e,
            "train_accuracy": 0.5 + 0.05 * e,
            "train_roc_auc": 0.55 + 0.05 * e,
            "val_loss": 0.72 - 0.04 * e + rng.normal(0, 0.01),
            "val_accuracy": 0.5 + 0.04 * e,
            "val_roc_auc": 0.5 + 0.05 * e,
        }
        for e in range(epochs)
    ]


def _fold(rng: np.random.Generator, number: int, n: int) -> FoldResult:
    labels = rng.integers(0, 2, n)
    score = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
    probs = np.stack([1 - score, score], axis=1)
    metrics = BINARY.metrics(labels, probs)
    return FoldResult(
        fold=number,
        stop_epoch=4,
        metrics=metrics,
        history=_history(rng, 4),
        val_indices=list(range(number * n, (number + 1) * n)),
        val_labels=labels.tolist(),
        val_probs=probs.tolist(),
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `distmed.tune` leaves behind, with a random-weight model and a real test split."""
    root = tmp_path_factory.mktemp("run")
    run = root / "exp"
    rng = np.random.default_rng(0)
    cfg = ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": SIZE}, "model": {"weights": "none"}}
    )
    torch.manual_seed(0)
    state = build_model(cfg.model, 2).state_dict()
    (run / "trials" / "cv-t1").mkdir(parents=True)
    save_model(run / "best_model.pt", state, cfg, task_for(CLASSES), 1, "refit-t1")

    test_images = rng.integers(0, 255, (40, 1, SIZE, SIZE), dtype=np.uint8)
    np.save(root / "test.npy", test_images)
    test_labels = np.repeat([0, 1], 20)
    model, _ = load_model(run / "best_model.pt")
    test_metrics = evaluate_test(
        model, root / "test.npy", test_labels, task_for(CLASSES), save_to=run / TEST_PREDICTIONS
    )

    folds = [_fold(rng, k, 30) for k in range(3)]
    result = CVResult(folds=folds, precision="off", device="cpu", world_size=1)
    detail = [
        {"history": f.history, "val_indices": f.val_indices, "val_labels": f.val_labels,
         "val_probs": f.val_probs}
        for f in folds
    ]  # fmt: skip
    write_trial_detail(str(run / "trials" / "cv-t1"), detail)
    # As the search's finalize stage does: the threshold on the out-of-fold predictions,
    # saved with the model before the report reads it.
    oof = oof_predictions(read_trial_detail(str(run / "trials" / "cv-t1")))
    save_threshold(
        run / "best_model.pt", operating_threshold(oof, task_for(CLASSES), "t1", calibration=None)
    )
    rows = [
        TrialRow("t1", {"optim.lr": 1e-3, "optim.name": "adam"}, "completed",
                 result.mean_roc_auc, result.std_roc_auc, result.fold_aucs, [4, 4, 4], 4, 9.0),
        TrialRow("t2", {"optim.lr": 3e-2, "optim.name": "sgd"}, "completed",
                 0.4, 0.1, [0.3, 0.4, 0.5], [4, 4, 4], 4, 8.0),
        TrialRow("t3", {"optim.lr": 1e-4, "optim.name": "adamw"}, "stopped",
                 0.35, 0.05, [0.3, 0.35, 0.4], [2, 2, 2], 2, 4.0),
    ]  # fmt: skip
    write_trials_csv(run / "trials.csv", rows, KEYS)
    summary = RunSummary(
        name="exp",
        num_trials=3,
        trials_by_status={"completed": 2, "stopped": 1, "errored": 0},
        space={k: {} for k in KEYS},
        data=DataSummary(name="tiny", classes=CLASSES, num_images=90),
        best_trial="t1",
        best_cv_roc_auc=result.mean_roc_auc,
        best_cv_roc_auc_std=result.std_roc_auc,
        best_fold_roc_auc=result.fold_aucs,
        best_config=cfg,
        refit_epochs=4,
        test_metrics=test_metrics,
    )
    summary.save(run / "summary.json")
    runreport.build_report(run, resamples=200)
    return run


def test_report_embeds_every_png_and_shows_summary_numbers(finished_run: Path):
    page = (finished_run / runreport.REPORT).read_text()
    pngs = sorted((finished_run / runreport.FIGURES).glob("*.png"))
    expected = {
        "search_progress", "params", "fold_aucs", "training_curves",
        "roc", "confusion", "pr", "calib", "gradcam",
    }  # fmt: skip
    assert {p.stem for p in pngs} == expected
    for png in pngs:
        assert png.stat().st_size > 5000, png  # a drawn figure, not an empty canvas
        assert f"{runreport.FIGURES}/{png.name}" in page
        assert base64.b64encode(png.read_bytes()).decode() in page  # opens offline

    summary = RunSummary.load(finished_run / "summary.json")
    shown = dict(re.findall(r"data-key='([^']+)' data-value='([^']+)'", page))
    flat = {"best_cv_roc_auc": summary.best_cv_roc_auc}
    flat["best_cv_roc_auc_std"] = summary.best_cv_roc_auc_std
    flat.update({f"best_fold_roc_auc.{k}": v for k, v in enumerate(summary.best_fold_roc_auc)})
    assert summary.test_metrics is not None
    flat.update({f"test_metrics.{k}": summary.test_metrics[k] for k in CI_METRICS})
    for key, value in flat.items():
        assert float(shown[key]) == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_report_without_a_test_split_says_so(finished_run: Path, tmp_path: Path):
    # A flat folder (no test split): the refit model exists but no test predictions do.
    run = tmp_path / "exp"
    shutil.copytree(finished_run, run)
    (run / TEST_PREDICTIONS).unlink()
    shutil.rmtree(run / runreport.FIGURES)
    runreport.build_report(run, resamples=50)
    page = (run / runreport.REPORT).read_text()
    assert "no test split" in page
    pngs = {p.stem for p in (run / runreport.FIGURES).glob("*.png")}
    assert pngs == {"search_progress", "params", "fold_aucs", "training_curves"}


def test_threshold_is_chosen_on_validation_and_saved_in_the_model(finished_run: Path):
    threshold = SavedModel.load(finished_run / "best_model.pt").threshold
    assert threshold is not None
    assert threshold.method == "youden" and "trial t1" in threshold.chosen_on
    assert threshold.num_samples == 90  # every out-of-fold prediction, no test image
    assert 0.0 < threshold.value < 1.0
    page = (finished_run / runreport.REPORT).read_text()
    assert f"data-value='{threshold.value!r}'" in page


def test_report_refuses_a_folder_without_results(tmp_path: Path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "summary.json").write_text(json.dumps({"name": "x"}))
    assert report.main([str(tmp_path)]) == 2
    assert "best_model.pt" in capsys.readouterr().err


# --------------------------------------------------------------------------- bootstrap


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    score = 1 / (1 + np.exp(-(2.0 * labels - 1.0 + rng.normal(0, 1.2, n))))
    return labels, np.stack([1 - score, score], axis=1)


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_samples():
    widths = {}
    for n in (60, 1500):
        labels, probs = _scores(n, seed=n)
        point = BINARY.metrics(labels, probs)
        intervals = BINARY.bootstrap(labels, probs, resamples=300, seed=0)
        for name, (low, high) in intervals.items():
            assert low <= point[name] <= high, (n, name, low, point[name], high)
        widths[n] = {name: high - low for name, (low, high) in intervals.items()}
    for name in widths[60]:
        assert widths[1500][name] < widths[60][name] / 2, name  # ~ 1/sqrt(n): 5x narrower


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_vectorised_binary_bootstrap_equals_sklearn_per_resample(threshold):
    labels, probs = _scores(25, seed=2)
    labels[:] = 0
    labels[:3] = 1  # 3 positives in 25: about 4% of resamples hold none (AUC undefined)
    picks = resample_indices(25, 200, seed=5)
    assert (labels[picks].sum(axis=1) == 0).any()
    rows = [
        BINARY.metrics_at(labels[p], probs[p], threshold)
        if threshold is not None
        else BINARY.metrics(labels[p], probs[p])
        for p in picks
    ]
    intervals = BINARY.bootstrap(labels, probs, threshold, resamples=200, seed=5)
    for name in intervals:
        values = np.array([r[name] for r in rows])
        expected = np.nanpercentile(values, [2.5, 97.5])
        assert intervals[name] == pytest.approx(tuple(expected), abs=1e-12), name


def test_bootstrap_is_seeded():
    labels, probs = _scores(80, seed=1)
    assert BINARY.bootstrap(labels, probs, resamples=50, seed=3) == BINARY.bootstrap(
        labels, probs, resamples=50, seed=3
    )


# --------------------------------------------------------------------------- predict


def test_predict_folder_with_an_unreadable_file(finished_run: Path, tmp_path: Path, capsys):
    images = write_image_folder(tmp_path / "images", {"a": 3, "b": 3}, size=20, mode="RGB")
    (images / "a" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "preds.csv"
    argv = ["--model", str(finished_run / "best_model.pt"), str(images), "--output", str(out)]
    code = predict.main([*argv, "--gradcam", str(tmp_path / "cams"), "--batch-size", "4"])
    assert code == predict.EXIT_SOME_UNREADABLE
    assert "broken.png" in capsys.readouterr().err

    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7
    [broken] = [r for r in rows if r["path"].endswith("broken.png")]
    assert broken["error"] and broken["predicted_class"] == ""
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and len(list((tmp_path / "cams").glob("*.png"))) == 6

    # Same probabilities as the training pipeline's decode (the cache) + normalisation.
    model, saved = load_model(finished_run / "best_model.pt")
    assert saved.threshold is not None
    threshold = saved.threshold.value
    index = scan_folder(images, ExperimentConfig().data)
    readable = [p for p in index.pool.paths if p.name != "broken.png"]
    split = type(index.pool)(ids=[p.name for p in readable], labels=np.zeros(6), paths=readable)
    with torch.no_grad():
        decoded, bad = decode_split(split, SIZE)
        assert bad == {}
        batch = to_model_input(torch.from_numpy(decoded))
        expected = torch.softmax(model(batch), dim=1).numpy()
    by_path = {Path(r["path"]).resolve(): r for r in good}
    for path, probs in zip(readable, expected, strict=True):
        row = by_path[path.resolve()]
        assert float(row["prob_pos"]) == pytest.approx(probs[1], abs=1e-5)
        assert row["label_at_threshold"] == ("pos" if probs[1] >= threshold else "neg")


def test_predict_without_a_model_is_one_line(tmp_path: Path, capsys):
    assert predict.main(["--model", str(tmp_path / "no.pt"), str(tmp_path), "--output", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_round_trip(finished_run: Path, tmp_path: Path, fmt: str, caplog):
    output = tmp_path / f"model.{fmt}"
    argv = ["--model", str(finished_run / "best_model.pt"), "--format", fmt]
    caplog.set_level(logging.INFO)  # as the CLI's root logger is
    assert export.main([*argv, "--output", str(output)]) == 0
    # The ONNX exporter's per-pass INFO lines ("Removed 182 unused nodes") are not shown.
    chatter = [r for r in caplog.records if r.name.startswith(export.ONNX_CHATTY_LOGGERS)]
    assert not [r.getMessage() for r in chatter if r.levelno < logging.WARNING]
    sidecar = json.loads(export.sidecar_path(output).read_text())
    assert sidecar["class_names"] == CLASSES and sidecar["positive_class"] == "pos"
    assert sidecar["preprocessing"]["image_size"] == SIZE
    assert sidecar["threshold"]["method"] == "youden"

    model, _ = load_model(finished_run / "best_model.pt")
    inputs = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(inputs).numpy()
    if fmt == "torchscript":
        got = torch.jit.load(str(output))(inputs).detach().numpy()
    else:
        import onnxruntime

        # One self-contained file: it loads copied alone, with no model.onnx.data beside it.
        assert not list(tmp_path.glob("*.data"))
        alone = tmp_path / "copied" / "alone.onnx"
        alone.parent.mkdir()
        alone.write_bytes(output.read_bytes())
        session = onnxruntime.InferenceSession(str(alone), providers=["CPUExecutionProvider"])
        [got] = session.run(None, {"image": inputs.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_quiet_loggers_drop_info_keep_warnings_and_restore_levels(caplog):
    caplog.set_level(logging.INFO)
    child = logging.getLogger("onnxscript.optimizer")
    logging.getLogger("onnxscript").setLevel(logging.NOTSET)
    with export.quiet_loggers(export.ONNX_CHATTY_LOGGERS):
        child.info("Removed 182 unused nodes")
        child.warning("a warning that matters")
    child.info("after the export")
    assert [r.getMessage() for r in caplog.records if r.name == child.name] == [
        "a warning that matters",
        "after the export",
    ]
    assert logging.getLogger("onnxscript").level == logging.NOTSET


def test_export_defaults_its_output_beside_the_model(finished_run: Path, tmp_path: Path):
    model = tmp_path / "run" / "best_model.pt"
    model.parent.mkdir()
    model.write_bytes((finished_run / "best_model.pt").read_bytes())
    assert export.main(["--model", str(model), "--format", "torchscript"]) == 0
    assert (model.parent / "model.torchscript.pt").is_file()
    assert (model.parent / "model.torchscript.pt.json").is_file()


def test_export_refuses_an_unknown_format(finished_run: Path, tmp_path: Path, capsys):
    argv = ["--model", str(finished_run / "best_model.pt"), "--format", "tflite"]
    assert export.main([*argv, "--output", str(tmp_path / "m")]) == 2
    assert "torchscript, onnx" in capsys.readouterr().err


def test_multiclass_test_section_has_per_class_and_macro_curves(tmp_path: Path):
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 30)
    logits = rng.normal(0, 1, (90, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    run = runreport.RunData(
        run_dir=tmp_path,
        summary={},
        trials=[],
        space_keys=[],
        model_path=tmp_path / "unused.pt",
        task=MulticlassTask(("a", "b", "c")),
        detail=None,
        test={"labels": labels, "probs": probs, "images_path": np.asarray("none")},
    )
    html = runreport.test_section(run, tmp_path, None, resamples=50)
    assert "argmax" in html and "at threshold" not in html
    shown = dict(re.findall(r"data-key='([^']+)' data-value='([^']+)'", html))
    macro = MulticlassTask(("a", "b", "c")).metrics(labels, probs)["roc_auc"]
    assert float(shown["test_metrics.roc_auc"]) == pytest.approx(macro)
    assert {p.stem for p in tmp_path.glob("*.png")} == {"roc", "confusion", "pr", "calib"}


def test_gradcam_uses_a_spatially_resolved_stage_at_small_sizes():
    from distmed.gradcam import cam_layer, gradcam_maps

    layers = [cam_layer("resnet18", s) for s in (28, 32, 64, 224)]
    assert layers == ["layer2", "layer2", "layer3", "layer4"]
    torch.manual_seed(0)
    model = build_model(ExperimentConfig().model.model_copy(update={"weights": "none"}), 2)
    images = np.random.default_rng(0).integers(0, 255, (2, 1, 32, 32), dtype=np.uint8)
    maps = gradcam_maps(model, images, [0, 1])
    assert maps.shape == (2, 32, 32)
    assert (maps.reshape(2, -1).std(axis=1) > 0.01).all()  # layer4 (1x1 here) would be flat


def test_gradcam_works_on_a_model_whose_cam_stage_is_frozen():
    from distmed.gradcam import gradcam_maps

    torch.manual_seed(0)
    cfg = ExperimentConfig().model.model_copy(update={"weights": "none", "unfreeze": 1})
    model = build_model(cfg, 2)  # only layer4 and the head train; layer2 (the CAM) is frozen
    assert not any(p.requires_grad for p in model.layer2.parameters())
    images = np.random.default_rng(0).integers(0, 255, (2, 1, 32, 32), dtype=np.uint8)
    maps = gradcam_maps(model, images, [0, 1])
    assert maps.shape == (2, 32, 32) and (maps.reshape(2, -1).std(axis=1) > 0.01).all()


def test_predict_writes_a_timestamped_csv_here_without_output(
    finished_run: Path, tmp_path: Path, monkeypatch
):
    images = write_image_folder(tmp_path / "images", {"a": 1, "b": 1}, size=20, mode="RGB")
    monkeypatch.chdir(tmp_path)
    assert predict.main(["--model", str(finished_run / "best_model.pt"), str(images)]) == 0
    [written] = tmp_path.glob("predictions-*.csv")
    assert len(written.read_text().splitlines()) == 3  # header + 2 images


# --------------------------------------------------------------------------- figures


def test_search_plot_of_one_stopped_trial_has_whole_ticks_no_auc_past_one_no_empty_legend(
    tmp_path: Path, monkeypatch
):
    import matplotlib.pyplot as plt

    from distmed import plots

    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, path, tight=True: drawn.setdefault("fig", fig))
    plots.plot_search_progress([1.0], ["stopped"], tmp_path / "s.png", "trial")
    ax = drawn.pop("fig").axes[0]
    assert [t for t in ax.get_xticks()] == [1]
    assert ax.get_ylim()[1] <= 1.02
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["stopped"]

    plots.plot_params({"train.batch_size": [16, 32, 32]}, [0.7, 0.8, 0.9], 2, tmp_path / "p.png")
    ax = drawn.pop("fig").axes[0]
    assert list(ax.get_xticks()) == [16, 32]
    plt.close("all")


def test_figures_come_at_300_dpi_with_vector_copies(tmp_path: Path):
    from PIL import Image

    from distmed import plots

    path = plots.plot_fold_aucs([0.8, 0.9], tmp_path / "folds.png")
    assert Image.open(path).size[0] == 5 * plots.DPI  # 5 inches wide
    assert (tmp_path / "folds.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "folds.pdf").read_bytes().startswith(b"%PDF")


def test_report_shows_the_sampler_importance_and_pareto_front(finished_run: Path, tmp_path: Path):
    run = tmp_path / "exp"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / runreport.FIGURES)
    summary = RunSummary.load(run / "summary.json")
    front = [
        {"trial_id": "t1", "cv_roc_auc": 0.8, "cv_roc_auc_se": 0.02, "num_params": 1_000_000},
        {"trial_id": "t2", "cv_roc_auc": 0.4, "cv_roc_auc_se": 0.05, "num_params": 20_000},
    ]
    summary.model_copy(
        update={
            "sampler": {"algorithm": "tpe", "n_startup_trials": 3, "constant_liar": True},
            "warm_start": {
                "from": "runs/earlier",
                "trials_used": 5,
                "skipped": 1,
                "settings_changed": ["train.epochs 3 -> 30"],
            },
            "param_importance": {
                "method": "fANOVA (optuna)",
                "num_trials": 12,
                "importances": {"optim.lr": 0.7, "optim.name": 0.3},
            },
            "pareto_front": front,
            "pareto_rule": "the smallest model within one standard error",
        }
    ).save(run / "summary.json")
    runreport.build_report(run, resamples=50)
    page = (run / runreport.REPORT).read_text()
    assert (run / runreport.FIGURES / "pareto_front.png").stat().st_size > 5000
    assert "on 12 completed trials" in page and "optim.lr 70%" in page
    assert "not the task in general" in page
    assert "constant_liar True" in page and "warm-started with 5 completed trial(s)" in page
    assert "other fixed settings: train.epochs 3 -&gt; 30" in page
    assert "t1 (refitted)" in page and "within one standard error" in page
