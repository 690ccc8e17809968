"""`--storage s3://` against a real S3 protocol server: moto in server mode on 127.0.0.1.

Nothing is mocked inside distmed, Ray or pyarrow: the endpoint is overridden the way a user
points them at MinIO or Ceph (AWS_ENDPOINT_URL, honoured by pyarrow's S3 filesystem, which
Ray Train and Tune use for every storage path). The search runs as its own process with its
own Ray instance, so the endpoint and credentials reach every Ray process by inheritance,
never through a Ray runtime environment. It is SIGKILLed mid-search, resumed, and every
result file is then read back from the bucket.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import write_image_folder
from test_concurrent_ray import SEARCH_TIMEOUT_S, Search

pytestmark = pytest.mark.ray
BUCKET = "distmed-test"
# moto accepts any credentials; this one is planted to check that none reaches the bucket.
FAKE_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYs3secretDISTMED"
EPOCHS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path: Path):
    """A moto S3 server on 127.0.0.1 with an empty bucket; yields the environment that
    points AWS clients (boto3, pyarrow, so Ray) at it."""
    pytest.importorskip("moto.server", reason="pip install 'moto[server]' (in .[dev])")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    log = (tmp_path / "moto.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "distmed-test",
        "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS_SECRET,
        region_name=env["AWS_DEFAULT_REGION"],
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"moto server did not start: {(tmp_path / 'moto.log').read_text()}")
            time.sleep(0.3)
    try:
        yield client, env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def ray_tmp():
    # Ray's socket paths must stay short: a folder right under /tmp, not pytest's tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="dms3", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _space(path: Path, data: Path) -> Path:
    spec = {
        "base": {
            "data": {"root": str(data), "image_size": 16},
            "model": {"weights": "none"},
            "train": {"epochs": EPOCHS, "batch_size": 8, "amp": "off"},
            "cv": {"folds": 2},
            "scaling": {"max_failures": 0},
        },
        "search": {
            "num_samples": 2,
            "seed": 0,
            "max_concurrent": 1,
            "scheduler": {"type": "none"},
        },
        "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _objects(client, prefix: str) -> dict[str, int]:
    """Every object under `prefix` in the bucket: key -> size in bytes."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return found


def _read(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_search_on_s3_killed_and_resumed_keeps_every_result_in_the_bucket(
    s3_server, ray_tmp: Path, tmp_path: Path
):
    """Trial 1 completes; the driver is SIGKILLed once trial 2 has checkpointed epoch 1 to
    the bucket; `--resume` keeps trial 1, continues trial 2 from that checkpoint (it trains
    epoch 2 only), refits and writes every result file to the bucket, where the report
    read the trials' histories. No checkpoint stays behind; the secret is in no object."""
    client, aws_env = s3_server
    name = f"s3-{uuid.uuid4().hex[:8]}"  # the local staging folder is under the shared /tmp
    data = tmp_path / "data"
    for split, count in (("train", 12), ("val", 4), ("test", 8)):
        write_image_folder(data / split, {"neg": count, "pos": count}, size=16, seed=len(split))
    space = _space(tmp_path / "space.yaml", data)
    env = {**os.environ, **aws_env, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)  # its own Ray instance, which inherits the S3 settings
    storage = f"s3://{BUCKET}/exp"
    argv = [sys.executable, "-m", "distmed.tune", "--space", str(space)]
    argv += ["--storage", storage, "--name", name]
    prefix = f"exp/{name}/"
    try:
        first = Search(argv, env, tmp_path)
        done = first.wait_for(r"trial \w+ completed", SEARCH_TIMEOUT_S)
        completed = re.search(r"trial (\w+) completed", done)[1]
        line = first.wait_for(rf"trial (?!{completed})\w+ epoch 1:", SEARCH_TIMEOUT_S)
        killed = re.search(r"trial (\w+) epoch", line)[1]
        # Its epoch-1 checkpoint is in the bucket once Ray Train has reported it.
        assert any(
            re.match(rf"{prefix}trials/cv-{killed}/checkpoint_[^/]+/state.pt$", k)
            for k in _objects(client, prefix)
        ), sorted(_objects(client, prefix))
        first.proc.send_signal(signal.SIGKILL)
        first.finish(60)
        assert f"trial {killed} completed" not in first.output()

        resumed = Search([*argv, "--resume"], env, tmp_path)
        assert resumed.finish(SEARCH_TIMEOUT_S) == 0, resumed.output()[-3000:]
        out = resumed.output()
        assert "Traceback" not in out, out[-3000:]
        # Trial 1 is not run again; trial 2 trains epoch 2 only (epoch 1 from the bucket).
        assert f"trial {completed} epoch" not in out
        epochs = [int(m[1]) for m in re.finditer(rf"trial {killed} epoch (\d+):", out)]
        assert epochs == [2], out[-3000:]
        assert "report: " in out and "best configuration" in out

        objects = _objects(client, prefix)
        for result in (
            "trials.csv",
            "summary.json",
            "best_config.yaml",
            "best_model.pt",
            "test_predictions.npz",
            "report.html",
        ):
            assert objects.get(prefix + result, 0) > 0, (result, sorted(objects))
        figures = {k.rsplit("/", 1)[1] for k in objects if k.startswith(prefix + "report/")}
        assert {"roc.png", "training_curves.png", "search_progress.png"} <= figures
        rows = list(csv.DictReader(io.StringIO(_read(client, prefix + "trials.csv").decode())))
        assert sorted(r["trial_id"] for r in rows) == sorted([completed, killed])
        assert [r["status"] for r in rows] == ["completed", "completed"]
        summary = json.loads(_read(client, prefix + "summary.json"))
        assert summary["trials_by_status"]["completed"] == 2 and "test_metrics" in summary
        for trial in (completed, killed):
            detail = json.loads(_read(client, f"{prefix}trials/cv-{trial}/cv_detail.json"))
            assert [len(f["history"]) for f in detail["folds"]] == [EPOCHS, EPOCHS]
        # Tune's own search state, what --resume read.
        assert any(re.match(rf"{prefix}experiment_state-.*\.json$", k) for k in objects)
        assert prefix + "tuner.pkl" in objects
        # Finished trials and the refit keep no checkpoint in the bucket.
        # (Ray's `checkpoint_manager_snapshot.json` files are run metadata, not checkpoints.)
        assert [k for k in objects if re.search(r"/checkpoint_[^/]+/", k)] == []
        # The credentials travelled by environment only: no object holds the secret.
        leaked = [k for k in objects if FAKE_AWS_SECRET.encode() in _read(client, k)]
        assert leaked == []
        assert FAKE_AWS_SECRET not in first.output() + out
    finally:
        shutil.rmtree(Path(tempfile.gettempdir()) / "distmed-results" / name, ignore_errors=True)
