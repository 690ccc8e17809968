"""Searches beside other Ray instances, Ctrl-C and --resume: real `distmed.tune` processes.

Each search runs as its own process with its own local Ray instance, the way two users (or
one user twice) run them on one machine; the test session's Ray instance is a third when
other Ray tests have started it. Nothing is mocked: signals are real, and so are the Ray
session folders that are searched for planted secrets.
"""

from __future__ import annotations

import contextlib
import csv
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
from pathlib import Path

import pytest
import yaml
from conftest import write_image_folder

pytestmark = pytest.mark.ray
FAKE_WANDB_KEY = "c0ffee0123456789abcdef0123456789abcdfake"
FAKE_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYsecretDISTMED"
# Generous bounds for 2 loaded cores; a hang (the fault these tests guard) blows through them.
SEARCH_TIMEOUT_S = 300
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


def _statuses(folder: Path) -> list[str]:
    with (folder / "trials.csv").open() as handle:
        return [row["status"] for row in csv.DictReader(handle)]


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


def test_two_searches_at_once_finish_and_ctrl_c_stops_one_for_resume(tmp_path: Path, ray_tmp: Path):
    """Two searches, each with its own Ray instance, on one machine (the issue: the refit
    of each hung for good). B is interrupted by Ctrl-C while its second trial trains: it
    stops within seconds, skips the refit, marks that trial `interrupted`, prints the
    --resume command; that command continues the trial from its checkpoint. Secrets set
    before the searches start reach no file under either Ray instance's session folder."""
    data = _split_folder(tmp_path / "data")
    space_a = _space(tmp_path / "a.yaml", data, num_samples=1, epochs=1)
    space_b = _space(tmp_path / "b.yaml", data, num_samples=2, epochs=2)
    storage = tmp_path / "runs"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": FAKE_WANDB_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
    }
    env.pop("RAY_ADDRESS", None)  # each search starts its own instance
    tune = [sys.executable, "-m", "distmed.tune", "--storage", str(storage)]
    b = Search(
        [*tune, "--space", str(space_b), "--name", "b", "--wandb-project", "p"], env, tmp_path
    )
    a = Search([*tune, "--space", str(space_a), "--name", "a"], env, tmp_path)

    # B: once its first trial has completed and the second has reported an epoch, Ctrl-C.
    done = b.wait_for(r"trial \w+ completed", SEARCH_TIMEOUT_S)
    first = re.search(r"trial (\w+) completed", done)[1]
    second = b.wait_for(rf"trial (?!{first})\w+ epoch 1:", SEARCH_TIMEOUT_S)
    b.proc.send_signal(signal.SIGINT)
    interrupted_at = time.monotonic()
    assert b.finish(STOP_TIMEOUT_S) == 130, b.output()[-3000:]
    stop_s = time.monotonic() - interrupted_at
    resume_line = b.wait_for(r"continue it with: ", 1)
    assert "refitting" not in b.output() and "Traceback" not in b.output()
    assert _statuses(storage / "b") == ["completed", "interrupted"]
    assert json.loads((storage / "b" / "summary.json").read_text())["interrupted"] is True
    assert not (storage / "b" / "best_model.pt").exists()

    # A ran beside B (and beside the test session's instance): it finishes, refit included.
    assert a.finish(SEARCH_TIMEOUT_S) == 0, a.output()[-3000:]
    summary_a = json.loads((storage / "a" / "summary.json").read_text())
    assert "test_metrics" in summary_a and (storage / "a" / "best_model.pt").is_file()
    assert "Traceback" not in a.output()

    # The printed command continues B: the interrupted trial resumes after its last epoch.
    trial = re.search(r"trial (\w+) epoch", second)[1]
    resume = shlex.split(resume_line.split("continue it with: ", 1)[1])
    assert resume[-1] == "--resume" and "b" in resume
    resumed = Search(resume, env, tmp_path)
    assert resumed.finish(SEARCH_TIMEOUT_S) == 0, resumed.output()[-3000:]
    epochs = [int(m[1]) for m in re.finditer(rf"trial {trial} epoch (\d+):", resumed.output())]
    assert epochs == [2], resumed.output()[-3000:]  # epoch 1 came from its checkpoint
    assert _statuses(storage / "b") == ["completed", "completed"]
    assert (storage / "b" / "best_model.pt").is_file()

    sessions = list(ray_tmp.glob("ray/session_2*"))
    assert len(sessions) >= 3, sessions  # A, B and B resumed, each its own instance
    assert _files_containing(ray_tmp, [FAKE_WANDB_KEY, FAKE_AWS_SECRET]) == []
    print(f"B stopped {stop_s:.1f} s after its Ctrl-C")
