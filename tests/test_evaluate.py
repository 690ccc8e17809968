"""`distmed.evaluate`: a saved model scored on another site's labelled images, no training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import write_image_folder

from distmed import evaluate, plots
from distmed.config import DataConfig, ExperimentConfig
from distmed.data import scan_source, to_model_input
from distmed.errors import UserError
from distmed.inference import decode_file, load_model
from distmed.model import build_model
from distmed.savedmodel import SavedModel, save_model, save_threshold
from distmed.task import BinaryTask, task_for

BINARY = BinaryTask(("neg", "pos"))  # class 1 scored, as the binary tests label it

SIZE = 28
CLASSES = ["NORMAL", "PNEUMONIA"]
SAVED_THRESHOLD = 0.5


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init resnet18 at 28 px saved as best_model.pt, with a saved threshold."""
    path = tmp_path_factory.mktemp("run") / "best_model.pt"
    cfg = ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": SIZE}, "model": {"weights": "none"}}
    )
    torch.manual_seed(0)
    state = build_model(cfg.model, 2).state_dict()
    save_model(path, state, cfg, task_for(CLASSES), 1, "refit-t1")
    save_threshold(
        path,
        {"value": SAVED_THRESHOLD, "method": "youden", "chosen_on": "out-of-fold predictions",
         "positive_class": "PNEUMONIA", "num_samples": 10},
    )  # fmt: skip
    return path


REAL_SAVE = plots.save


@pytest.fixture(autouse=True)
def figure_titles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Figures are made but not rendered (a placeholder PNG; their titles are kept), unless
    a test looks at them: the four at 300 dpi with SVG and PDF copies take ~3 s on 2 cores."""
    titles: list[str] = []

    def placeholder(fig, path: Path, tight: bool = True) -> Path:
        title = fig._suptitle or fig.axes[0].title  # one panel's title, or the figure's
        titles.append(title.get_text())
        plt.close(fig)
        path.write_bytes(b"\x89PNG placeholder")
        return path

    monkeypatch.setattr(plots, "save", placeholder)
    return titles


def _probs(model_path: Path, images: np.ndarray) -> np.ndarray:
    """Class probabilities of uint8 (N, C, S, S) images from the bare network (the file
    holds no temperature), computed directly."""
    model, _ = load_model(model_path)
    with torch.no_grad():
        return torch.softmax(model(to_model_input(torch.from_numpy(images))), dim=1).numpy()


def _shown(page: str) -> dict[str, str]:
    return dict(re.findall(r"data-key='([^']+)' data-value='([^']+)'", page))


def test_a_folder_scores_exactly_the_metrics_computed_by_hand(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(plots, "save", REAL_SAVE)
    monkeypatch.setattr(plots, "DPI", 30)  # still a PNG; 300 dpi takes seconds here
    site = write_image_folder(tmp_path / "site_b", {"NORMAL": 6, "PNEUMONIA": 5}, size=40)
    options = SavedModel.load(model_file).preprocessing.decode_settings()
    files = [(p, label) for label, c in enumerate(CLASSES) for p in sorted((site / c).iterdir())]
    probs = _probs(model_file, np.stack([decode_file(p, options) for p, _ in files]))
    labels = np.array([label for _, label in files])
    ranked = np.sort(probs[:, 1])
    cut = float(ranked[5] + ranked[6]) / 2  # decisions on both sides, none near the cut

    args = ["--model", str(model_file), "--data", str(site), "--cpu", "--bootstrap", "50"]
    assert evaluate.main([*args, "--threshold", str(cut)]) == 0

    out = model_file.parent / "evaluation-site_b"  # the default: beside the model
    record = json.loads((out / evaluate.EVALUATION_JSON).read_text())
    assert (record["split"], record["num_images"]) == ("all", 11)  # no test split: all
    assert record["images_per_class"] == {"NORMAL": 6, "PNEUMONIA": 5}
    assert record["threshold"] == cut and record["threshold_source"] == "--threshold"
    argmax = record["argmax"]["metrics"]
    assert argmax == pytest.approx(BINARY.metrics(labels, probs), abs=1e-6)
    assert argmax["accuracy"] == pytest.approx((probs.argmax(1) == labels).sum() / 11, abs=1e-6)
    at = BINARY.metrics_at(labels, probs, cut)
    assert record["at_threshold"]["metrics"] == pytest.approx(at, abs=1e-6)
    said = probs[:, 1] >= cut
    assert at["sensitivity"] == said[labels == 1].mean()  # ... and by counting
    for low, high in record["argmax"]["ci95"].values():
        assert low <= high
    assert record["skipped_files"] == {} and record["distmed_version"]
    assert (record["ensemble"], record["temperature"]) == ("refit", None)
    assert record["model"] == str(model_file.resolve()) and record["data"] == str(site)

    page = (out / evaluate.EVALUATION_HTML).read_text()
    shown = _shown(page)
    for name, value in argmax.items():
        if f"argmax.{name}" in shown:
            assert float(shown[f"argmax.{name}"]) == value
    assert (
        float(shown["at_threshold.sensitivity"]) == record["at_threshold"]["metrics"]["sensitivity"]
    )
    for stem in ("roc", "confusion", "pr", "calib"):
        assert f"figures/{stem}.png" in page
        assert all((out / "figures" / f"{stem}.{ext}").is_file() for ext in ("png", "svg", "pdf"))


def test_classes_are_matched_by_name_and_a_mismatch_is_one_line(
    model_file: Path, tmp_path: Path, capsys
):
    # Sorted, the data's first class is the model's second: positions would swap them.
    site = write_image_folder(tmp_path / "site_c", {"a_pneumonia": 3, "b_normal": 5}, size=20)
    (site / "b_normal" / "broken.png").write_bytes(b"not a png")
    base = ["--model", str(model_file), "--data", str(site), "--cpu", "--bootstrap", "20"]
    base += ["--output", str(tmp_path / "out")]

    assert evaluate.main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "a_pneumonia, b_normal" in err and "NORMAL, PNEUMONIA" in err and "--class-map" in err

    assert evaluate.main([*base, "--class-map", "a_pneumonia=PNEUMONIA"]) == 2  # half mapped
    assert "--class-map b_normal=NORMAL" in capsys.readouterr().err  # the suggestion
    extra = write_image_folder(tmp_path / "site_d", {"NORMAL": 2, "PNEUMONIA": 2, "Other": 2})
    assert evaluate.main(["--model", str(model_file), "--data", str(extra)]) == 2
    err = capsys.readouterr().err  # every model class is covered: no merge suggested
    assert "Other unknown to the model" in err and "(such as Other)" in err
    assert "Other=NORMAL" not in err and "Other=PNEUMONIA" not in err
    names = write_image_folder(tmp_path / "site_e", {"healthy": 2, "sick": 2, "Other": 2})
    argv = ["--model", str(model_file), "--data", str(names)]
    assert evaluate.main([*argv, "--class-map", "healthy=NORMAL"]) == 2
    err = capsys.readouterr().err  # 2 data classes left for 1 model class: no pairing guessed
    assert "=PNEUMONIA" not in err.split("e.g.")[-1] and "DATA=MODEL for each" in err
    assert "(PNEUMONIA not yet mapped)" in err and "leave out any folder of no model" in err
    renamed = write_image_folder(tmp_path / "site_f", {"healthy": 2, "sick": 2})
    assert evaluate.main(["--model", str(model_file), "--data", str(renamed)]) == 2
    err = capsys.readouterr().err  # no class in common: no folder to leave out
    assert "(NORMAL, PNEUMONIA not yet mapped)" in err and "such as" not in err

    assert evaluate.main([*base, "--class-map", "nope=NORMAL"]) == 2
    assert "has no class 'nope'" in capsys.readouterr().err

    assert evaluate.main([*base, "--split", "test"]) == 2
    assert "--split all" in capsys.readouterr().err

    assert evaluate.main([*base, "--ensemble", "folds"]) == 2  # never the refit model instead
    assert "holds no fold models" in capsys.readouterr().err

    mapped = [*base, "--class-map", "a_pneumonia=PNEUMONIA", "--class-map", "b_normal=NORMAL"]
    assert evaluate.main(mapped) == 2  # the broken file stops it, as in training
    err = capsys.readouterr().err
    assert "broken.png" in err and "--skip-invalid" in err  # the way on, as evaluate spells it
    assert evaluate.main([*mapped, "--skip-invalid"]) == evaluate.EXIT_SOME_UNREADABLE
    err = capsys.readouterr().err
    assert "unreadable: b_normal/broken.png" in err
    record = json.loads((tmp_path / "out" / evaluate.EVALUATION_JSON).read_text())
    assert record["images_per_class"] == {"NORMAL": 5, "PNEUMONIA": 3}
    assert record["class_map"] == {"a_pneumonia": "PNEUMONIA", "b_normal": "NORMAL"}
    assert list(record["skipped_files"]) == ["b_normal/broken.png"]
    # The model's own threshold when none is given.
    assert (
        record["threshold"] == SAVED_THRESHOLD
        and "saved in the model" in (record["threshold_source"])
    )


def _write_npz(path: Path, test_labels: list[int]) -> np.ndarray:
    """A MedMNIST-layout .npz of 28 px grey images; returns its test images."""
    rng = np.random.default_rng(3)
    arrays = {}
    for split, labels in (("train", [0, 1, 0, 1]), ("val", [0, 1]), ("test", test_labels)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (len(labels), SIZE, SIZE), np.uint8)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8)[:, None]
    np.savez(path, **arrays)
    return arrays["test_images"]


def test_an_npz_test_split_is_scored(model_file: Path, tmp_path: Path):
    test_labels = [0, 1, 1, 0, 1, 0, 0]
    images = _write_npz(tmp_path / "site_d.npz", test_labels)
    args = ["--model", str(model_file), "--data", str(tmp_path / "site_d.npz"), "--cpu"]
    args += ["--bootstrap", "20", "--class-map", "0=NORMAL", "--class-map", "1=PNEUMONIA"]
    assert evaluate.main([*args, "--output", str(tmp_path / "test")]) == 0
    record = json.loads((tmp_path / "test" / evaluate.EVALUATION_JSON).read_text())
    assert (record["split"], record["num_images"]) == ("test", 7)  # default: the test split
    probs = _probs(model_file, images[:, None])
    expected = BINARY.metrics(np.array(test_labels), probs)
    assert record["argmax"]["metrics"] == pytest.approx(expected, abs=1e-6)

    # --split all: the pool (train + val) and the test split, under a cache key of its own.
    source = scan_source(DataConfig(root=str(tmp_path / "site_d.npz"), image_size=SIZE))
    everything = evaluate.scored_index(source, evaluate.choose_split(source, "all"))
    assert len(everything.pool) == 13 and everything.test is None
    assert everything.pool.labels.tolist() == [0, 1, 0, 1, 0, 1, *test_labels]
    test_only = evaluate.scored_index(source, "test")
    assert len({source.fingerprint, everything.fingerprint, test_only.fingerprint}) == 3


def test_a_class_absent_from_the_data_is_stated(
    model_file: Path, tmp_path: Path, capsys, figure_titles: list[str]
):
    _write_npz(tmp_path / "site_e.npz", [0, 0, 0, 0])  # the test split holds no class 1
    args = ["--model", str(model_file), "--data", str(tmp_path / "site_e.npz"), "--cpu"]
    args += ["--bootstrap", "20", "--class-map", "0=NORMAL", "--class-map", "1=PNEUMONIA"]
    assert evaluate.main([*args, "--output", str(tmp_path / "out")]) == 0
    assert "ROC-AUC needs both classes" in capsys.readouterr().err
    record = json.loads((tmp_path / "out" / evaluate.EVALUATION_JSON).read_text())
    assert record["absent_classes"] == ["PNEUMONIA"]
    assert record["argmax"]["metrics"]["roc_auc"] is None  # undefined, not a number
    page = (tmp_path / "out" / evaluate.EVALUATION_HTML).read_text()
    assert "No image of class PNEUMONIA" in page and "figures/roc.png" not in page
    assert figure_titles == ["site_e (test): confusion matrix (threshold 0.5000)"]


def test_the_output_names_the_model_and_warns_on_the_training_data(tmp_path: Path, capsys):
    site = write_image_folder(tmp_path / "site", {"NORMAL": 3, "PNEUMONIA": 3}, size=SIZE)
    cfg = ExperimentConfig.model_validate(
        {"data": {"root": str(site), "image_size": SIZE}, "model": {"weights": "none"}}
    )
    path = tmp_path / "run" / "best_model.pt"
    path.parent.mkdir()
    save_model(path, build_model(cfg.model, 2).state_dict(), cfg, task_for(CLASSES), 1, "refit-t1")
    argv = ["--model", str(path), "--data", str(site), "--bootstrap", "20", "--cpu"]
    assert evaluate.main(argv) == 0
    captured = capsys.readouterr()
    assert "scored by the refit model, no temperature on cpu" in captured.out
    assert evaluate.TRAINING_DATA_NOTE in captured.err  # its own training images
    out = path.parent / "evaluation-site"
    assert json.loads((out / evaluate.EVALUATION_JSON).read_text())["training_data"] is True
    page = (out / evaluate.EVALUATION_HTML).read_text()
    assert "refit model, no temperature" in page and "not an external validation" in page
    # One folder per model: the fold ensemble's results never overwrite the refit's.
    assert evaluate.default_output(path, "site", "folds") == path.parent / "evaluation-site-folds"
    assert not evaluate.is_training_data(str(tmp_path / "elsewhere"), str(site))
    assert evaluate.is_training_data(str(site / "NORMAL"), str(site))  # a part of it
    assert evaluate.is_training_data(str(tmp_path), str(site))  # a folder holding it
    (tmp_path / "link").symlink_to(site)
    assert evaluate.is_training_data(str(tmp_path / "link"), str(site))


def test_a_misspelt_class_map_key_suggests_the_data_class():
    with pytest.raises(UserError, match=r"has no class 'pnemonia'.*did you mean 'pneumonia'\?$"):
        evaluate.class_lookup(
            ["normal", "pneumonia"], ["NORMAL", "PNEUMONIA"], {"pnemonia": "PNEUMONIA"}, "site_b"
        )
    with pytest.raises(UserError, match=r"has no finding 'Efusion'.*did you mean 'Effusion'\?$"):
        evaluate.match_findings(["Effusion", "Mass"], ["Effusion"], {"Efusion": "Effusion"}, "x")
