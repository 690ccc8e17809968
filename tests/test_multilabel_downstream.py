"""A multi-label model downstream of training (#32): predict, evaluate (findings matched by
name), export, the report and the model card on a small saved model built here. No Ray."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from distmed import evaluate, export, modelcard, plots, predict, runreport
from distmed.calibration import FindingTemperatures, TemperatureFit
from distmed.config import ExperimentConfig
from distmed.data import to_model_input
from distmed.inference import TEST_PREDICTIONS, decode_file, evaluate_test, load_inference_model
from distmed.model import build_model
from distmed.results import TrialRow, write_trial_detail, write_trials_csv
from distmed.savedmodel import FindingThresholds, FoldModels, SavedModel, save_model
from distmed.summary import DataSummary, RunSummary
from distmed.task import MultilabelTask

SIZE = 16
FINDINGS = ("Atelectasis", "Cardiomegaly", "Edema", "Effusion")
TASK = MultilabelTask(
    FINDINGS,
    uncertain=("ignore", "ignore", "ones", "zeros"),
    missing=("ignore", "ignore", "zeros", "ignore"),
    scored=("Atelectasis", "Edema", "Effusion"),  # Cardiomegaly too rare in the CV pool
)
TEMPERATURES = (2.0, None, 0.5, 1.5)
THRESHOLDS = [0.4, 0.5, 0.6, 0.45]


@pytest.fixture(autouse=True)
def placeholder_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures are drawn but written as a placeholder PNG: rendering them at 300 dpi with
    SVG and PDF copies takes most of these tests' time on 2 cores, and none looks at them."""

    def placeholder(fig, path: Path, tight: bool = True) -> Path:
        plots.plt.close(fig)
        path.write_bytes(b"\x89PNG placeholder")
        return path

    monkeypatch.setattr(plots, "save", placeholder)


def _fit(t: float) -> TemperatureFit:
    return TemperatureFit(
        temperature=t, nll_before=0.6, nll_after=0.5, ece_before=0.2, ece_after=0.1,
        num_samples=40,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-finding ResNet-18 at 16 px (random init, 2 fold models), a temperature per
    finding (one not fitted) and a threshold per finding, saved as the search saves it."""
    path = tmp_path_factory.mktemp("run") / "best_model.pt"
    cfg = ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": SIZE}, "model": {"weights": "none"}}
    )
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append(build_model(cfg.model, len(FINDINGS)).state_dict())
    save_model(
        path,
        states[0],
        cfg,
        TASK,
        1,
        "refit-t1",
        folds=FoldModels(trial="t1", num_models=2, stop_epochs=[2, 2]),
        fold_states=states[1:],
        calibration=FindingTemperatures(findings=[_fit(t) if t else None for t in TEMPERATURES]),
        threshold=FindingThresholds(
            values=THRESHOLDS, method="youden", chosen_on="out-of-fold predictions of t1",
            num_samples=[40] * 4, validation_sensitivity=[0.8] * 4,
            validation_specificity=[0.7] * 4,
        ),
    )  # fmt: skip
    return path


def _reference(model_file: Path, paths: list[Path], ensemble: str) -> np.ndarray:
    """(N, L) probabilities computed here from the saved networks: sigmoid(logits / T_l),
    averaged over the fold models for the ensemble."""
    saved, state, folds = SavedModel.load_all(model_file)
    options = saved.preprocessing.decode_settings()
    images = np.stack([decode_file(p, options) for p in paths])
    inputs = to_model_input(torch.from_numpy(images))
    temperatures = torch.tensor([t or 1.0 for t in TEMPERATURES])
    probs = []
    for weights in [state] if ensemble == "refit" else folds:
        net = build_model(saved.config.model, len(FINDINGS)).eval()
        net.load_state_dict(weights)
        with torch.no_grad():
            probs.append(torch.sigmoid(net(inputs) / temperatures))
    return torch.stack(probs).mean(0).numpy().astype(np.float64)


def _site(root: Path, n: int = 30, seed: int = 0) -> tuple[Path, list[Path], dict[str, list]]:
    """Another site's images and a sheet naming its findings in another order, one of them
    renamed ("Pleural Effusion"), one missing (Cardiomegaly), an extra column (`site`);
    cells 1/0/-1/blank."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        paths.append(root / "img" / f"x{i:02d}.png")
        Image.fromarray(pixels, mode="L").save(paths[-1])
    cells = {
        name: list(rng.choice(["1", "0", "-1", ""], n, p=[0.35, 0.4, 0.15, 0.1]))
        for name in ("Edema", "Pleural Effusion", "Atelectasis")
    }
    for column in cells.values():  # both classes in each column, whatever the draw
        column[:2] = ["1", "0"]
    sheet = root / "site_b.csv"
    with sheet.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "Edema", "site", "Pleural Effusion", "Atelectasis"])
        for i, p in enumerate(paths):
            row = [cells["Edema"][i], "B", cells["Pleural Effusion"][i], cells["Atelectasis"][i]]
            writer.writerow([f"img/{p.name}", *row])
    return sheet, paths, cells


def _targets(cells: list[str], uncertain: str, missing: str) -> np.ndarray:
    """The model's policy applied by hand: NaN where ignored."""
    value = {"1": 1.0, "0": 0.0}
    out = []
    for c in cells:
        if c == "-1":
            out.append({"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain])
        elif c == "":
            out.append({"ignore": np.nan, "zeros": 0.0}[missing])
        else:
            out.append(value[c])
    return np.array(out)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("ensemble", ["refit", "folds"])
def test_predict_and_export_agree_with_the_sigmoid_of_each_finding(
    model_file: Path, tmp_path: Path, ensemble: str
):
    _, paths, _ = _site(tmp_path / "site")
    expected = _reference(model_file, paths, ensemble)
    out = tmp_path / "preds.csv"
    argv = ["--model", str(model_file), *map(str, paths), "--output", str(out)]
    assert predict.main([*argv, "--ensemble", ensemble]) == 0
    rows = _read_csv(out)
    got = np.array([[float(r[f"prob_{f}"]) for f in FINDINGS] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    for row, probs in zip(rows, got, strict=True):
        present = [f for f, p, t in zip(FINDINGS, probs, THRESHOLDS, strict=True) if p >= t]
        assert [row[f"label_{f}"] for f in FINDINGS] == [str(int(f in present)) for f in FINDINGS]
        assert row["predicted_findings"] == "|".join(present)

    fmt = "onnx" if ensemble == "folds" else "torchscript"  # the ensemble's logit graph in ONNX
    target = tmp_path / f"model.{fmt}"
    argv = ["--model", str(model_file), "--format", fmt, "--output", str(target)]
    assert export.main([*argv, "--ensemble", ensemble]) == 0
    model, saved = load_inference_model(model_file, ensemble)
    images = np.stack([decode_file(p, saved.preprocessing.decode_settings()) for p in paths])
    inputs = to_model_input(torch.from_numpy(images))
    if fmt == "torchscript":
        logits = torch.jit.load(str(target))(inputs).detach()
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {"image": inputs.numpy()})[0])
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), expected, atol=1e-6, rtol=0)
    sidecar = json.loads(export.sidecar_path(target).read_text())
    assert sidecar["output"]["shape"] == ["batch", 4]
    assert sidecar["output"]["apply"].startswith("sigmoid")
    assert sidecar["output"]["temperature"] == [2.0, 1.0, 0.5, 1.5]
    assert sidecar["multilabel"]["thresholds"] == THRESHOLDS
    assert sidecar["multilabel"]["uncertain"] == list(TASK.uncertain)


def test_predict_gradcam_for_a_chosen_finding_and_a_wrong_name(model_file, tmp_path, capsys):
    _, paths, _ = _site(tmp_path / "site", n=2)
    cams = tmp_path / "cams"
    argv = ["--model", str(model_file), *map(str, paths), "--output", str(tmp_path / "p.csv")]
    assert predict.main([*argv, "--gradcam", str(cams), "--finding", "Edema"]) == 0
    assert len(list(cams.glob("*.png"))) == 2
    assert predict.main([*argv, "--finding", "Nodule"]) == 2
    err = capsys.readouterr().err
    assert "--finding 'Nodule': not a finding" in err and "Edema" in err
    assert "did you mean" not in err  # nothing close to Nodule
    assert predict.main([*argv, "--finding", "edma"]) == 2
    assert capsys.readouterr().err.strip().endswith("did you mean 'Edema'?")


def test_evaluate_matches_findings_by_name_and_scores_each(model_file, tmp_path, capsys):
    sheet, paths, cells = _site(tmp_path / "site")
    out = tmp_path / "eval"
    argv = ["--model", str(model_file), "--data", str(sheet), "--output", str(out)]
    argv += ["--class-map", "Pleural Effusion=Effusion", "--bootstrap", "50"]
    assert evaluate.main(argv) == 0
    err = capsys.readouterr().err
    assert "no column for the model's finding(s) Cardiomegaly" in err
    assert "column(s) site are not findings of the model: ignored" in err
    record = json.loads((out / "evaluation.json").read_text())
    assert record["class_names"] == ["Atelectasis", "Edema", "Effusion"]  # the model's order
    assert record["missing_findings"] == ["Cardiomegaly"]
    assert record["ignored_columns"] == ["site"]
    assert record["threshold"] == [THRESHOLDS[0], THRESHOLDS[2], THRESHOLDS[3]]

    probs = _reference(model_file, paths, "refit")
    metrics = record["at_threshold"]["metrics"]
    aucs = []
    for column, name, data_name in ((0, "Atelectasis", "Atelectasis"), (2, "Edema", "Edema"),
                                    (3, "Effusion", "Pleural Effusion")):  # fmt: skip
        truth = _targets(cells[data_name], TASK.uncertain[column], TASK.missing[column])
        known = ~np.isnan(truth)
        auc = roc_auc_score(truth[known], probs[known, column])
        said = probs[known, column] >= THRESHOLDS[column]
        sensitivity = (said & (truth[known] == 1)).sum() / (truth[known] == 1).sum()
        assert metrics[f"roc_auc/{name}"] == pytest.approx(auc, abs=1e-9), name
        assert metrics[f"sensitivity/{name}"] == pytest.approx(sensitivity), name
        assert record["known_per_finding"][name] == known.sum()
        low, high = record["at_threshold"]["ci95"][f"roc_auc/{name}"]
        assert low <= high
        aucs.append(auc)
    assert metrics["roc_auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
    page = (out / "evaluation.html").read_text()
    assert "mean over scored findings" in page and "Pleural Effusion → Effusion" in page


def test_evaluate_names_an_unknown_map_key_and_a_sheet_without_findings(
    model_file, tmp_path, capsys
):
    sheet, _, _ = _site(tmp_path / "site")
    argv = ["--model", str(model_file), "--data", str(sheet), "--output", str(tmp_path / "e")]
    assert evaluate.main([*argv, "--class-map", "Oedema=Edema"]) == 2
    assert "no finding 'Oedema'" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("path,Nodule\nimg/x00.png,1\n")
    argv = ["--model", str(model_file), "--data", str(other), "--output", str(tmp_path / "f")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column is a finding of the model" in err[0]


def _history(aucs: list[float]) -> list[dict[str, float]]:
    record = {"epoch": 1, "train_loss": 0.6, "val_loss": 0.6, "val_roc_auc": float(np.mean(aucs))}
    record |= {f"val_roc_auc/{f}": a for f, a in zip(FINDINGS, aucs, strict=True)}
    return [record]


def test_report_and_card_show_the_findings(model_file: Path, tmp_path: Path):
    """A run folder as the search leaves it for a multi-label model: the report's search
    section lists each finding's CV AUC and why Cardiomegaly is not scored; its test section
    has the per-finding table (AUC, prevalence, threshold, sensitivity/specificity, CIs)."""
    run = tmp_path / "exp"
    (run / "trials" / "cv-t1").mkdir(parents=True)
    run.joinpath("best_model.pt").write_bytes(model_file.read_bytes())
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (40, 1, SIZE, SIZE), dtype=np.uint8)
    np.save(tmp_path / "test.npy", images)
    raw = rng.choice([1.0, 0.0, -1.0, np.nan], (40, 4), p=[0.4, 0.4, 0.1, 0.1])
    raw[:2, 1] = [1.0, 0.0]
    raw[2:, 1] = np.nan  # Cardiomegaly: one positive, one negative known
    targets = TASK.targets(raw)
    model, _ = load_inference_model(run / "best_model.pt")
    test_metrics = evaluate_test(
        model, tmp_path / "test.npy", targets, TASK, save_to=run / TEST_PREDICTIONS
    )
    fold_aucs = [[0.7, 0.5, 0.8, 0.6], [0.9, np.nan, 0.7, 0.8]]
    detail = [
        {"history": _history(a), "val_indices": [k], "val_labels": [[1, 0, None, 1]],
         "val_probs": [[0.6, 0.4, 0.5, 0.7]]}
        for k, a in enumerate(fold_aucs)
    ]  # fmt: skip
    write_trial_detail(str(run / "trials" / "cv-t1"), detail)
    row = TrialRow("t1", {}, "completed", 0.75, 0.05, [0.7, 0.8], [1, 1], 1, 3.0)
    write_trials_csv(run / "trials.csv", [row], [])
    RunSummary(
        name="exp", num_trials=1, trials_by_status={"completed": 1},
        data=DataSummary(name="chest", classes=list(FINDINGS), num_images=80),
        best_trial="t1", best_cv_roc_auc=0.75, best_cv_roc_auc_std=0.05,
        best_fold_roc_auc=[0.7, 0.8], refit_epochs=1,
        test_metrics=test_metrics,
    ).save(run / "summary.json")  # fmt: skip

    page = runreport.build_report(run, resamples=50).read_text()
    shown = dict(re.findall(r"data-key='([^']+)' data-value='([^']+)'", page))
    assert float(shown["cv_roc_auc/Atelectasis"]) == pytest.approx(0.8)
    assert float(shown["cv_roc_auc/Cardiomegaly"]) == pytest.approx(0.5)  # the defined fold
    assert "no: fewer than cv.folds=5 positive or negative images" in page
    probs = np.load(run / TEST_PREDICTIONS)["probs"]
    for j, name in enumerate(FINDINGS):
        known = ~np.isnan(targets[:, j])
        truth = targets[known, j] == 1
        assert float(shown[f"test_at_threshold.prevalence/{name}"]) == pytest.approx(truth.mean())
        assert float(shown[f"test_at_threshold.threshold/{name}"]) == THRESHOLDS[j]
        said = probs[known, j] >= THRESHOLDS[j]
        specificity = (~said & ~truth).sum() / (~truth).sum()
        assert float(shown[f"test_at_threshold.specificity/{name}"]) == pytest.approx(specificity)
        auc = roc_auc_score(truth, probs[known, j])
        assert float(shown[f"test_at_threshold.roc_auc/{name}"]) == pytest.approx(auc)
    scored = [roc_auc_score(targets[~np.isnan(targets[:, j]), j] == 1,
                            probs[~np.isnan(targets[:, j]), j]) for j in (0, 2, 3)]  # fmt: skip
    assert float(shown["test_at_threshold.roc_auc"]) == pytest.approx(np.mean(scored))
    assert "ones / zeros" in page and "zeros / ignore" in page  # Edema's, Effusion's policies
    for figure in ("roc.png", "pr.png", "calib.png", "gradcam.png"):
        assert (run / "report" / figure).is_file(), figure
    assert "temperature/Atelectasis" in shown and float(shown["temperature/Atelectasis"]) == 2.0

    card = modelcard.model_card(run / "best_model.pt", SavedModel.load(run / "best_model.pt"))
    assert "roc_auc/Edema" in card and "0.6000" in card and "ones / zeros" in card


def test_the_page_shows_a_bar_and_a_decision_per_finding_as_predict_does(model_file, tmp_path):
    from distmed import app

    _, paths, _ = _site(tmp_path / "site", n=3)
    out = tmp_path / "p.csv"
    assert predict.main(["--model", str(model_file), *map(str, paths), "--output", str(out)]) == 0
    rows = _read_csv(out)
    model, saved = load_inference_model(model_file)
    predictor = app.Predictor(model, saved, None)
    page = app.render_results(predictor, predictor.predict(paths, FINDINGS.index("Edema")), "Edema")
    results = page.split("<div class='distmed-result'")[1:]
    assert len(results) == 3
    for row, html_part in zip(rows, results, strict=True):
        for name in FINDINGS:
            cell = re.search(
                rf"data-class='{name}'>.*?class='value'>([\d.]+)</td>.*?"
                rf"class='decision'>(\w+)</td>",
                html_part,
            )
            assert cell is not None, name
            assert float(cell[1]) == pytest.approx(float(row[f"prob_{name}"]), abs=5.1e-5)
            assert cell[2] == ("present" if row[f"label_{name}"] == "1" else "absent")
        assert "class='cam-finding'>Edema<" in html_part and "img class='gradcam'" in html_part


def test_a_multilabel_source_is_described_in_summary_json(tmp_path: Path):
    """What the search writes about its data (`describe_index`) validates as the summary's
    `DataSummary` for several findings per image (it once stopped the search at its end)."""
    from distmed.config import DataConfig
    from distmed.data import describe_index, scan_source

    sheet, _, _ = _site(tmp_path / "site", n=6)
    index = scan_source(DataConfig(root=str(sheet), label_columns=["Atelectasis", "Edema"]))
    data = DataSummary.model_validate(describe_index(index))
    assert data.multilabel and data.classes == ["Atelectasis", "Edema"]
