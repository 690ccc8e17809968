"""MLflow and TensorBoard tracking of a search, against a real `mlflow server` on localhost
(SQLite backend, local artefact store) that the test starts; read back with MlflowClient."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_image_folder

from distmed import tune
from distmed.errors import UserError
from distmed.tracking import check_mlflow_uri

FAKE_TOKEN = "mlflow-token-0123456789abcdef-DISTMEDFAKE"
EPOCHS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` with a SQLite backend and a local artefact folder; yields its URI."""
    pytest.importorskip("mlflow", reason="pip install mlflow (in .[dev])")
    port = _free_port()
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
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
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


def test_mlflow_uri_with_credentials_is_refused_without_repeating_them():
    with pytest.raises(UserError) as caught:
        check_mlflow_uri("https://alice:s3cret@mlflow.lab")
    assert "s3cret" not in str(caught.value) and "MLFLOW_TRACKING_TOKEN" in str(caught.value)
    check_mlflow_uri("http://127.0.0.1:5000")  # no credentials: fine


@pytest.mark.ray
def test_search_logs_trials_best_model_and_report_to_mlflow_and_tensorboard(
    ray_session, mlflow_server, tmp_path: Path, monkeypatch, capsys
):
    """One trial, 2 epochs: its MLflow run has the sampled parameters, both epochs' CV
    ROC-AUC and the final score; a `best-of-` run holds best_model.pt and report.html; every
    trial folder has TensorBoard event files and the command is printed; the planted
    tracking token reaches no file (results, MLflow's store, Ray's session logs)."""
    from mlflow.tracking import MlflowClient

    uri, mlflow_folder = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE_TOKEN)
    data = tmp_path / "data"
    for split, count in (("train", 12), ("val", 4), ("test", 8)):
        write_image_folder(data / split, {"neg": count, "pos": count}, size=16, seed=len(split))
    spec = {
        "base": {
            "data": {"root": str(data), "image_size": 16},
            "model": {"weights": "none"},
            "train": {"epochs": EPOCHS, "batch_size": 8, "amp": "off"},
            "cv": {"folds": 2},
            "scaling": {"max_failures": 0},
            "tracking": {"mlflow": {"experiment": "distmed-mlflow-test"}},
        },
        "search": {"num_samples": 1, "seed": 0, "max_concurrent": 1, "scheduler": {"type": "none"}},
        "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
    }
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(spec))
    storage = tmp_path / "runs"
    argv = ["--space", str(space), "--storage", str(storage), "--name", "mlf"]
    assert tune.main([*argv, "--mlflow-uri", uri]) == 0
    printed = capsys.readouterr().out
    out = storage / "mlf"

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("distmed-mlflow-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert all(r.data.tags["distmed.experiment"] == "mlf" for r in runs)  # grouped
    [best] = [r for r in runs if r.data.tags.get("distmed.role") == "best"]
    [trial] = [r for r in runs if r.data.tags.get("distmed.role") != "best"]
    assert trial.info.status == "FINISHED"
    assert "optim.lr" in trial.data.params
    history = client.get_metric_history(trial.info.run_id, "cv_roc_auc")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # one per epoch
    assert trial.data.metrics["final_cv_roc_auc"] == history[-1].value
    assert trial.data.tags["distmed.status"] == "completed"

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
    assert len(trial_folders) == 1
    assert all(list(p.glob("events.out.tfevents.*")) for p in trial_folders)
    assert f"tensorboard --logdir {out}" in printed

    # The token travelled by environment only: no file holds it (results, MLflow's own
    # store, this Ray instance's session folder with its runtime-env agent log).
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    leaked = [
        p
        for root in (out, mlflow_folder, session)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and FAKE_TOKEN.encode() in _bytes(p)
    ]
    assert leaked == []
    assert FAKE_TOKEN not in printed


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a socket or a file removed meanwhile
        return b""
