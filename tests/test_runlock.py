"""One run per results folder: a second search with the same --storage and --name (or a
second train with the same --output) is refused naming the holder; a crashed holder's lock
is taken over; another host's is reported. No Ray: the lock is taken before any work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distmed import train, tune
from distmed.errors import UserError
from distmed.runlock import hold_results_folder, lock_paths

REPO = Path(__file__).resolve().parents[1]
SPACE = str(REPO / "search_spaces" / "demo.yaml")
HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from distmed.runlock import hold_results_folder\n"
    "with hold_results_folder(Path(sys.argv[1]), 'test'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`, started as `holder-process ...`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), "holder-process"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


def test_second_search_with_the_same_name_is_refused_naming_the_holder(tmp_path: Path, capsys):
    holder = _holder(tmp_path / "runs" / "same")
    try:
        code = tune.main(["--space", SPACE, "--storage", str(tmp_path / "runs"), "--name", "same"])
    finally:
        _stop(holder)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--name same is in use" in err and f"pid {holder.pid}" in err
    assert socket.gethostname() in err and "holder-process" in err and "started 20" in err
    assert not (tmp_path / "runs" / "same").exists()  # nothing made: the name is not taken


def test_second_train_into_the_same_output_is_refused(tmp_path: Path, capsys):
    output = tmp_path / "out"
    holder = _holder(output)
    try:
        code = train.main(["--config", SPACE, "--output", str(output)])
    finally:
        _stop(holder)
    err = capsys.readouterr().err
    assert code == 2 and "is in use by a running process" in err and f"pid {holder.pid}" in err
    assert not (output / "config.yaml").exists()


def test_a_crashed_holders_lock_is_taken_over_with_a_note(tmp_path: Path, capsys):
    folder = tmp_path / "runs" / "crashed"
    holder = _holder(folder)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: its holder file stays
    holder.wait(timeout=30)
    _, holder_file = lock_paths(folder)
    assert json.loads(holder_file.read_text())["pid"] == holder.pid
    with hold_results_folder(folder, "--name crashed"):
        assert json.loads(holder_file.read_text())["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().err
    assert not holder_file.exists()  # released cleanly: no holder recorded


def test_a_lock_left_on_another_host_is_reported_until_forced(tmp_path: Path, capsys):
    folder = tmp_path / "runs" / "shared"
    _, holder_file = lock_paths(folder)
    holder_file.parent.mkdir(parents=True)
    record = {"host": "node-7", "pid": 4242, "started": "2026-01-01T00:00:00+00:00"}
    holder_file.write_text(json.dumps({**record, "command": "distmed.tune --name shared"}))
    refused = r"another host \(host node-7, pid 4242.*--force-unlock"
    with pytest.raises(UserError, match=refused), hold_results_folder(folder, "--name shared"):
        pass
    assert json.loads(holder_file.read_text())["host"] == "node-7"  # left as it was
    with hold_results_folder(folder, "--name shared", force=True):
        assert json.loads(holder_file.read_text())["host"] == socket.gethostname()
    assert "node-7" in capsys.readouterr().err


def test_the_lock_is_released_for_the_next_run(tmp_path: Path):
    folder = tmp_path / "runs" / "again"
    for _ in range(2):  # the same process, one run after the other
        with hold_results_folder(folder, "--name again"):
            pass


def test_a_place_where_no_lock_can_be_made_is_one_line(tmp_path: Path):
    (tmp_path / "a-file").write_text("not a folder")
    folder = tmp_path / "a-file" / "runs" / "x"
    with (
        pytest.raises(UserError, match="cannot create the lock .*a-file"),
        hold_results_folder(folder, "--name x"),
    ):
        pass
