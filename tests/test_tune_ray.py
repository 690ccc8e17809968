"""End to end through Ray Tune: the real `distmed.tune` CLI on tiny images."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, write_image_folder

from distmed import tune
from distmed.config import load_config
from distmed.savedmodel import SavedModel

pytestmark = pytest.mark.ray
FAKE_KEY = "0123456789abcdef0123456789abcdef0123fake"
FAKE_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEYdistmed"
FAKE_TOKEN = "mlflow-token-0123456789abcdef-DISTMEDFAKE"


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` with a SQLite backend and a local artefact folder; yields its URI."""
    pytest.importorskip("mlflow", reason="pip install mlflow (in .[dev])")
    port = free_port()
    folder = tmp_path / "mlflow"
    folder.mkdir()
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Without its job runner (a huey consumer for MLflow's GenAI jobs, ~20 s of CPU
        # polling during the search); tracking runs and metrics need none.
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            pytest.fail("mlflow server did not start:\n" + (folder / "server.log").read_text())
        time.sleep(0.5)
    try:
        yield uri, folder
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _split_folder(root: Path) -> Path:
    for split, count in (("train", 14), ("val", 6), ("test", 8)):
        write_image_folder(root / split, {"neg": count, "pos": count}, size=16, seed=len(split))
    return root


def _space(tmp_path: Path, data: Path, search: dict) -> Path:
    spec = {
        "base": {
            "data": {"root": str(data), "image_size": 16},
            "model": {"weights": "none"},
            "train": {"epochs": 2, "batch_size": 8, "amp": "off"},
            "cv": {"folds": 2},
            "scaling": {"max_failures": 0},
        },
        "search": search,
        "space": {
            "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
            "train.batch_size": {"choice": [4, 8]},
            "optim.name": {"choice": ["adam", "adamw", "sgd"]},
            "optim.weight_decay": {"loguniform": [1.0e-6, 1.0e-2]},
            "model.unfreeze": {"randint": [3, 5]},
        },
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_search_stops_poor_trials_writes_results_and_hides_the_key(
    ray_session, mlflow_server, tmp_path: Path, monkeypatch, capsys
):
    """One search covers it all (each Ray fit costs seconds of start-up on 2 cores): ASHA,
    results files, refit + test split, report, W&B offline, MLflow (a real server) and
    TensorBoard, secrets (also in Ray's session logs), --resume, and --resume after
    best_model.pt was deleted (the refit is redone)."""
    uri, mlflow_folder = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET)
    data = _split_folder(tmp_path / "data")
    search = {
        # Seed 0's first two configs score 1.0 and 0.76 after epoch 1 (mean of both folds'
        # ROC-AUC): the second is below the rung's median (the first), so ASHA stops it.
        "num_samples": 2,
        "seed": 0,
        "max_concurrent": 1,  # sequential: each trial meets the rungs of the ones before
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    }
    space = _space(tmp_path, data, search)
    argv = ["--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "exp"]
    tracking = ["--wandb-project", "distmed-test", "--mlflow-uri", uri]
    tracking += ["--set", "tracking.mlflow.experiment=distmed-mlflow-test"]
    tracking += ["--set", "tracking.mlflow.registered_model=distmed-test-model"]
    model_writes = _watch_model_writes(monkeypatch)
    assert tune.main([*argv, *tracking]) == 0  # 2 epochs: rung 1 decides
    printed = capsys.readouterr().out
    assert "best CV ROC-AUC" in printed and "test split" in printed

    out = tmp_path / "runs" / "exp"
    with (out / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["completed", "stopped"], rows  # in start order
    assert int(rows[1]["epochs"]) == 1  # stopped at rung 1
    assert all(0.0 <= float(r["fold0_roc_auc"]) <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_trials"] == 2
    assert summary["trials_by_status"] == {
        "completed": 1,
        "stopped": 1,
        "diverged": 0,
        "errored": 0,
        "interrupted": 0,
    }
    assert summary["best_cv_roc_auc"] == float(rows[0]["cv_roc_auc"])  # the completed one
    assert 0.0 <= summary["test_metrics"]["roc_auc"] <= 1.0
    assert summary["test_metrics"]["num_samples"] == 16  # the test split, evaluated once

    payload = torch.load(out / "best_model.pt", weights_only=True)
    assert payload["class_names"] == ["neg", "pos"]
    assert payload["preprocessing"]["image_size"] == 16
    # The best trial's fold models (weights only), its stop epochs, and the temperature
    # fitted on its out-of-fold predictions travel in the model file.
    assert payload["fold_models"]["trial"] == summary["best_trial"]
    assert len(payload["fold_states"]) == 2 and "optimizer" not in payload["fold_states"][0]
    assert payload["fold_models"]["stop_epochs"] == [2, 2]
    assert payload["calibration"]["num_samples"] == 40 and payload["calibration"]["temperature"] > 0
    assert summary["test_metrics_folds"]["num_samples"] == 16
    assert "fold ensemble" in printed
    # best_model.pt is written once, complete: weights, fold models, temperature, threshold.
    assert model_writes == [(out / "best_model.pt").resolve()]
    assert payload["threshold"]["method"] == "youden"
    kept = [p for p in (out / "trials").glob("*/checkpoint_*") if p.is_dir()]
    assert kept == [], "finished trials keep no checkpoints"
    _check_report(out, summary)

    # W&B: one offline run per trial (stopped ones too), holding its per-epoch metrics.
    runs = [p for p in out.rglob("offline-run-*") if p.is_dir()]
    assert len(runs) == 2, runs
    for run in runs:
        [log_file] = run.glob("*.wandb")
        assert b"cv_roc_auc" in log_file.read_bytes()
    _check_mlflow_and_tensorboard(uri, out, printed, tmp_path)
    _check_registered_model(uri, out, data / "test", printed, tmp_path)
    # The planted secrets reach no file under the results folder, MLflow's store or this
    # Ray instance's session folder (its runtime-env agent log), nor the console.
    secrets = (FAKE_KEY.encode(), FAKE_AWS_SECRET.encode(), FAKE_TOKEN.encode())
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    files = [
        p
        for root in (out, mlflow_folder, session)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    ]
    assert [p for p in files if any(s in _bytes(p) for s in secrets)] == []
    assert FAKE_KEY not in printed and FAKE_AWS_SECRET not in printed
    assert FAKE_TOKEN not in printed

    # The best config is the complete experiment config that distmed.train --config reads
    # (training from it is covered in test_results; here: the file is the chosen config).
    best = load_config(out / "best_config.yaml")
    assert best.model_dump(mode="json") == summary["best_config"]

    # --resume on the finished search: nothing re-runs, the refit model is reused.
    assert tune.main([*argv, "--resume"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert model_writes == [(out / "best_model.pt").resolve()]  # reused, not written again
    with (out / "trials.csv").open() as handle:
        assert sorted(r["trial_id"] for r in csv.DictReader(handle)) == sorted(
            r["trial_id"] for r in rows
        )

    # best_model.pt deleted, --resume again: the refit is redone from the start (its earlier
    # run folder, whose checkpoint went, used to be resumed by Ray Train: ActorDiedError).
    (out / "best_model.pt").unlink()
    assert tune.main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"refitting trial {summary['best_trial']}" in printed and "test split" in printed
    assert model_writes == [(out / "best_model.pt").resolve()] * 2
    assert SavedModel.load(out / "best_model.pt").source == f"refit-{summary['best_trial']}"


def test_nested_search_scores_each_outer_fold_once(ray_session, tmp_path: Path, capsys):
    """--nested 2 with 2 inner folds: two inner searches, each refit on its outer training
    part and scored on its outer validation part; nested.json holds both and their mean.
    The inner searches have two objectives (the cheap Ray check of that path: both in every
    result, Optuna's multi-objective study, the best taken from the Pareto front)."""
    data = _split_folder(tmp_path / "data")
    search = {
        "num_samples": 1,
        "seed": 0,
        "scheduler": {"type": "none"},
        "objectives": ["cv_roc_auc", "num_params"],
    }
    space = _space(tmp_path, data, search)
    argv = ["--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "nest"]
    argv += ["--nested", "2", "--set", "train.epochs=1"]
    assert tune.main(argv) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "runs" / "nest"
    nested = json.loads((out / "nested.json").read_text())
    assert [f["fold"] for f in nested["folds"]] == [0, 1]
    assert [f["num_val"] for f in nested["folds"]] == [20, 20]  # 40 pool images, halves
    assert all(f["num_train"] == 20 for f in nested["folds"])
    outer = [f["outer_metrics"]["roc_auc"] for f in nested["folds"]]
    assert nested["mean_outer_roc_auc"] == pytest.approx(sum(outer) / 2)
    assert "nested CV estimate" in printed
    assert printed.count("on cv_roc_auc and num_params; no early stopping") == 2
    for k in (0, 1):
        assert (out / f"outer-{k}" / "trials.csv").is_file()
        assert (out / f"outer-{k}" / "best_config.yaml").is_file()
    assert not (out / "best_model.pt").exists()  # nested CV estimates; it keeps no model
    # --resume of a finished nested search skips both outer folds.
    assert tune.main([*argv, "--resume"]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2


def _watch_model_writes(monkeypatch) -> list[Path]:
    """Every path `SavedModel.save` writes in this (the driver) process, in order: the
    one function that writes best_model.pt (the refit and the report run here)."""
    writes: list[Path] = []
    save = SavedModel.save

    def counted(self, path, *args, **kwargs):
        writes.append(Path(path).resolve())
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(SavedModel, "save", counted)
    return writes


def _check_report(out: Path, summary: dict) -> None:
    """The report written at the end of the search: figures, and the summary's numbers."""
    detail = json.loads(
        (out / "trials" / f"cv-{summary['best_trial']}" / "cv_detail.json").read_text()
    )
    for fold in detail["folds"]:
        assert {"train_accuracy", "train_roc_auc", "val_roc_auc"} <= set(fold["history"][-1])
        assert len(fold["val_labels"]) == len(fold["val_probs"])
    positions = sorted(i for fold in detail["folds"] for i in fold["val_indices"])
    assert positions == list(range(40))  # every CV-pool image once, out of fold
    page = (out / "report.html").read_text()
    pngs = sorted((out / "report").glob("*.png"))
    assert {"roc", "gradcam", "training_curves", "search_progress"} <= {p.stem for p in pngs}
    assert all(f"report/{p.name}" in page for p in pngs)
    shown = dict(re.findall(r"data-key='([^']+)' data-value='([^']+)'", page))
    assert float(shown["best_cv_roc_auc"]) == summary["best_cv_roc_auc"]
    for name in ("roc_auc", "accuracy", "sensitivity", "specificity", "f1"):
        assert float(shown[f"test_metrics.{name}"]) == summary["test_metrics"][name], name
    threshold = torch.load(out / "best_model.pt", weights_only=True)["threshold"]
    assert float(shown["threshold"]) == threshold["value"]


def _check_mlflow_and_tensorboard(uri: str, out: Path, printed: str, tmp_path: Path) -> None:
    """Each trial's MLflow run holds its sampled parameters, every epoch's CV ROC-AUC and its
    final score; a `best-of-` run holds best_model.pt and report.html; every trial folder has
    TensorBoard event files and the command is printed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("distmed-mlflow-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert all(r.data.tags["distmed.experiment"] == "exp" for r in runs)  # grouped
    [best] = [r for r in runs if r.data.tags.get("distmed.role") == "best"]
    trials = [r for r in runs if r.data.tags.get("distmed.role") != "best"]
    assert sorted(r.data.tags["distmed.status"] for r in trials) == ["completed", "stopped"]
    [trial] = [r for r in trials if r.data.tags["distmed.status"] == "completed"]
    assert trial.info.status == "FINISHED"
    assert "optim.lr" in trial.data.params
    history = client.get_metric_history(trial.info.run_id, "cv_roc_auc")
    assert sorted(m.step for m in history) == list(range(1, 2 + 1))  # one per epoch
    assert trial.data.metrics["final_cv_roc_auc"] == history[-1].value

    assert best.data.params["optim.lr"] == trial.data.params["optim.lr"]
    assert best.data.metrics["best_cv_roc_auc"] == pytest.approx(history[-1].value)
    assert 0.0 <= best.data.metrics["test_roc_auc"] <= 1.0
    logged = {a.path for a in client.list_artifacts(best.info.run_id)}
    assert {"best_model.pt", "report.html", "summary.json", "report"} <= logged
    figures = {a.path for a in client.list_artifacts(best.info.run_id, "report")}
    assert "report/roc.png" in figures
    stored = client.download_artifacts(best.info.run_id, "best_model.pt", str(tmp_path))
    assert Path(stored).read_bytes() == (out / "best_model.pt").read_bytes()
    assert f"MLflow: best model and report in run {best.info.run_id}" in printed

    # TensorBoard: event files in every trial's folder, and the command to read them.
    trial_folders = [p for p in out.glob("run_trial_*") if p.is_dir()]
    assert len(trial_folders) == 2
    assert all(list(p.glob("events.out.tfevents.*")) for p in trial_folders)
    assert f"tensorboard --logdir {out}" in printed


def _check_registered_model(uri: str, out: Path, test: Path, printed: str, tmp_path: Path) -> None:
    """The best model, registered on the server as a pyfunc model, predicts the test split's
    raw pixels as `distmed predict` predicts its files (its CSV keeps 6 decimals)."""
    import mlflow
    import numpy as np
    from PIL import Image

    from distmed import predict

    assert "MLflow: registered the best model as models:/distmed-test-model/1" in printed
    mlflow.set_tracking_uri(uri)
    # dst_path: MLflow otherwise downloads into a temporary folder it never removes.
    (tmp_path / "downloaded").mkdir()
    loaded = mlflow.pyfunc.load_model(
        "models:/distmed-test-model/1", dst_path=str(tmp_path / "downloaded")
    )
    paths = sorted(test.rglob("*.png"))
    pixels = np.stack([np.asarray(Image.open(p)) for p in paths])[..., None]  # grey: C = 1
    probs = loaded.predict(pixels)
    csv_path = tmp_path / "predictions.csv"
    argv = ["--model", str(out / "best_model.pt"), "--cpu", "--output", str(csv_path)]
    assert predict.main([*argv, *map(str, paths)]) == 0
    with csv_path.open() as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    expected = [[float(rows[str(p)][f"prob_{c}"]) for c in ("neg", "pos")] for p in paths]
    np.testing.assert_allclose(probs, np.array(expected), atol=1e-6)
    assert loaded.metadata.metadata["class_names"] == ["neg", "pos"]


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a socket or a file removed meanwhile
        return b""
