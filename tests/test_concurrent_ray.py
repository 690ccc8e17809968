"""Searches beside other Ray instances, Ctrl-C, a killed driver, --resume, S3 storage.

Each search runs as its own `python -m distmed.tune` process with its own local Ray
instance, the way two users (or one user twice) run them on one machine; the test session's
Ray instance is a third when other Ray tests have started it. Nothing is mocked: signals
are real, the S3 storage is a real S3 protocol server (moto in server mode on 127.0.0.1,
reached the way users reach MinIO or Ceph: AWS_ENDPOINT_URL, honoured by pyarrow's S3
filesystem, which Ray Train and Tune use for every storage path), and the Ray session
folders are searched for planted secrets. One test runs it all at once: every search
process costs ~30 s of start-up on 2 cores.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import free_port, write_image_folder

from distmed.artifacts import staging_folder

# Its searches start their own Ray instances and never the session's: `bash dev.sh test` runs
# it beside the tests without Ray, not after them with the session's Ray tests.
pytestmark = [pytest.mark.ray, pytest.mark.own_ray]
FAKE_WANDB_KEY = "c0ffee0123456789abcdef0123456789abcdfake"
FAKE_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYsecretDISTMED"  # also moto's key
BUCKET = "distmed-test"
# Generous bounds for 2 loaded cores; a hang (the fault these tests guard) blows through them.
# A search alone: ~60 s; beside the suite's 4 processes one first epoch took 194 s.
SEARCH_TIMEOUT_S = 600
STOP_TIMEOUT_S = 90


def _split_folder(root: Path) -> Path:
    for split, count in (("train", 12), ("val", 4), ("test", 8)):
        write_image_folder(root / split, {"neg": count, "pos": count}, size=16, seed=len(split))
    return root


def _space(path: Path, data: Path, num_samples: int, epochs: int) -> Path:
    spec = {
        "base": {
            "data": {"root": str(data), "image_size": 16},
            "model": {"weights": "none"},
            # SGD: its checkpoints (model + momentum) are a third smaller than Adam's, and
            # every epoch's goes through the S3 server here.
            "optim": {"name": "sgd"},
            "train": {"epochs": epochs, "batch_size": 8, "amp": "off"},
            "cv": {"folds": 2},
            "scaling": {"max_failures": 0},
        },
        "search": {
            "num_samples": num_samples,
            "seed": 0,
            "max_concurrent": 1,
            "scheduler": {"type": "none"},
        },
        "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


class Search:
    """One `python -m distmed.tune` process; its output lines are collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first output line matching `pattern` (earlier lines included)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None
            while seen < len(self.lines):
                if regex.search(self.lines[seen]):
                    return self.lines[seen]
                seen += 1
            if exited and self._new.empty():
                break
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=0.5)
        pytest.fail(f"no line matching {pattern!r} in time:\n" + self.output()[-4000:])

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"still running after {timeout:.0f} s:\n" + self.output()[-4000:])

    def output(self) -> str:
        return "\n".join(self.lines)


def _files_containing(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {s[:6]}..." for s in secrets if s.encode() in data]
    return found


@pytest.fixture
def ray_tmp():
    # Ray's socket paths must stay short: a folder right under /tmp, not pytest's tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="dmray", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def s3_server(tmp_path: Path):
    """A moto S3 server on 127.0.0.1 with an empty bucket; yields the environment that
    points AWS clients (boto3, pyarrow, so Ray) at it."""
    pytest.importorskip("moto.server", reason="pip install 'moto[server]' (in .[dev])")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
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


def _objects(client, prefix: str) -> dict[str, int]:
    """Every object under `prefix` in the bucket: key -> size in bytes."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return found


def _read(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_searches_beside_each_other_survive_ctrl_c_and_resume_on_s3(
    s3_server, tmp_path: Path, ray_tmp: Path
):
    """Two searches at once, each with its own Ray instance (the issue: the refit of each
    hung for good): A, local, finishes with its refit. B stores on S3 and gets a Ctrl-C
    while its second trial trains: it stops within seconds, skips the refit, marks that
    trial `interrupted` in the bucket and prints the --resume command, which continues the
    trial from its checkpoint in the bucket, refits and writes every result file there (the
    report read the trials' histories from there). The W&B key and the AWS secret, set
    before any search starts (so every Ray process inherits them), reach no file under the
    Ray session folders and no object in the bucket. (W&B runs and the key's way through
    Ray: tests/test_tune_ray.py; a SIGKILLed driver and its --resume:
    tests/test_faults_ray.py.)"""
    client, aws_env = s3_server
    data = _split_folder(tmp_path / "data")
    space_a = _space(tmp_path / "a.yaml", data, num_samples=1, epochs=1)
    space_b = _space(tmp_path / "b.yaml", data, num_samples=2, epochs=3)
    env = {
        **os.environ,
        **aws_env,
        "PYTHONUNBUFFERED": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": FAKE_WANDB_KEY,
    }
    env.pop("RAY_ADDRESS", None)  # each search starts its own instance
    name_b = f"s3-{uuid.uuid4().hex[:8]}"  # its local staging folder is under the shared /tmp
    prefix = f"exp/{name_b}/"
    tune = [sys.executable, "-m", "distmed.tune"]
    storage_a = tmp_path / "runs"
    argv_a = [*tune, "--space", str(space_a), "--storage", str(storage_a), "--name", "a"]
    argv_b = [*tune, "--space", str(space_b), "--storage", f"s3://{BUCKET}/exp"]
    argv_b += ["--name", name_b]
    # B keeps its Ray session folders (so the secret check below reads them); A's is removed
    # when its search ends, as every search's is by default.
    env_b = {**env, "DISTMED_KEEP_RAY_SESSION": "1"}
    staging_b = staging_folder(f"s3://{BUCKET}/exp", name_b)
    try:
        b = Search(argv_b, env_b, tmp_path)
        a = Search(argv_a, env, tmp_path)

        b_done, b_interrupted = _second_trial_trains(b)
        b.proc.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        assert b.finish(STOP_TIMEOUT_S) == 130, b.output()[-3000:]
        stop_s = time.monotonic() - interrupted_at
        resume_line = b.wait_for(r"continue it with: ", 1)
        assert "refitting" not in b.output() and "Traceback" not in b.output()
        assert _bucket_statuses(client, prefix) == ["completed", "interrupted"]
        assert json.loads(_read(client, prefix + "summary.json"))["interrupted"] is True
        assert prefix + "best_model.pt" not in _objects(client, prefix)
        assert not staging_b.exists()  # uploaded, so the local staging copy is gone

        # A ran beside B (and beside the test session's instance): it finishes, refit included.
        assert a.finish(SEARCH_TIMEOUT_S) == 0, a.output()[-3000:]
        assert "Traceback" not in a.output()
        assert "test_metrics" in json.loads((storage_a / "a" / "summary.json").read_text())
        assert (storage_a / "a" / "best_model.pt").is_file()

        # B, continued by the command it printed.
        b_resume = shlex.split(resume_line.split("continue it with: ", 1)[1])
        assert b_resume[-1] == "--resume" and name_b in b_resume
        b2 = Search(b_resume, env_b, tmp_path)
        assert b2.finish(SEARCH_TIMEOUT_S) == 0, b2.output()[-3000:]
        out = b2.output()
        assert "Traceback" not in out, out[-3000:]
        assert f"trial {b_done} epoch" not in out  # a finished trial is not run again
        # Never from scratch: from its checkpoint (or, had it just finished, its last report
        # again).
        epochs = [int(m[1]) for m in re.finditer(rf"trial {b_interrupted} epoch (\d+):", out)]
        assert epochs and 1 not in epochs and epochs[-1] == 3, out[-3000:]
        assert "report: " in out and "best configuration" in out
        _check_bucket(client, prefix, [b_done, b_interrupted], epochs=3)
        assert not staging_b.exists()

        # B and B resumed, each its own instance (Ray names a session folder after the pid
        # of the process that started it); A's own folder was removed when it ended.
        sessions = sorted(ray_tmp.glob("ray/session_2*"))
        assert sorted(int(s.name.rsplit("_", 1)[1]) for s in sessions) == sorted(
            [b.proc.pid, b2.proc.pid]
        ), sessions
        assert _files_containing(ray_tmp, [FAKE_WANDB_KEY, FAKE_AWS_SECRET]) == []
        objects = _objects(client, prefix)
        assert [k for k in objects if FAKE_AWS_SECRET.encode() in _read(client, k)] == []
        print(f"B stopped {stop_s:.1f} s after its Ctrl-C")
    finally:
        shutil.rmtree(staging_folder(f"s3://{BUCKET}/exp", name_b), ignore_errors=True)


def _bucket_statuses(client, prefix: str) -> list[str]:
    rows = csv.DictReader(io.StringIO(_read(client, prefix + "trials.csv").decode()))
    return [row["status"] for row in rows]


def _second_trial_trains(search: Search) -> tuple[str, str]:
    """(first trial, second trial) once the first completed and the second reported epoch 1."""
    completed = search.wait_for(r"trial \w+ completed", SEARCH_TIMEOUT_S)
    done = re.search(r"trial (\w+) completed", completed)[1]
    line = search.wait_for(rf"trial (?!{done})\w+ epoch 1:", SEARCH_TIMEOUT_S)
    return done, re.search(r"trial (\w+) epoch", line)[1]


def _check_bucket(client, prefix: str, trials: list[str], epochs: int) -> None:
    """Every result file of a finished search is in the bucket; no checkpoint is left."""
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
    assert sorted(r["trial_id"] for r in rows) == sorted(trials)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    summary = json.loads(_read(client, prefix + "summary.json"))
    assert summary["trials_by_status"]["completed"] == 2 and "test_metrics" in summary
    for trial in trials:
        detail = json.loads(_read(client, f"{prefix}trials/cv-{trial}/cv_detail.json"))
        assert [len(f["history"]) for f in detail["folds"]] == [epochs, epochs]
    # Tune's own search state, what --resume read.
    assert any(re.match(rf"{prefix}experiment_state-.*\.json$", k) for k in objects)
    assert prefix + "tuner.pkl" in objects
    # Finished trials and the refit keep no checkpoint in the bucket.
    # (Ray's `checkpoint_manager_snapshot.json` files are run metadata, not checkpoints.)
    assert [k for k in objects if re.search(r"/checkpoint_[^/]+/", k)] == []
