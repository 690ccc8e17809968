"""Result files are written atomically: a process SIGKILLed mid-write never leaves a torn file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distmed.artifacts import atomic_path, write_json_atomic, write_text_atomic

# Rewrites the three kinds of result file (JSON, CSV text, a torch checkpoint) in a loop,
# each version internally consistent and large enough that a write takes a while.
WRITER = """
import sys
from pathlib import Path
import torch
from distmed.artifacts import atomic_path, write_json_atomic, write_text_atomic
out = Path(sys.argv[1])
version = 0
while True:
    version += 1
    write_json_atomic(out / "summary.json", {"version": version, "values": [version] * 200_000})
    write_text_atomic(out / "trials.csv", "".join(f"{version},row{i}\\n" for i in range(50_000)))
    with atomic_path(out / "best_model.pt") as tmp:
        torch.save({"version": version, "weights": torch.full((300_000,), version)}, tmp)
    (out / "progress").write_text(str(version))
"""


def _check_complete(folder: Path) -> int:
    """Every file present parses and holds one version throughout; returns the JSON's."""
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["values"]) == {summary["version"]}
    rows = (folder / "trials.csv").read_text().splitlines()
    assert len(rows) == 50_000 and len({r.split(",")[0] for r in rows}) == 1
    model = torch.load(folder / "best_model.pt", weights_only=True)
    assert (model["weights"] == model["version"]).all()
    return summary["version"]


@pytest.mark.serial  # kills land after rewrites only while the writer gets a core of its own
def test_sigkill_at_random_moments_never_leaves_a_torn_file(tmp_path: Path):
    rng = np.random.default_rng(0)
    versions = []
    for attempt in range(5):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
        try:
            deadline = time.monotonic() + 60
            while not (tmp_path / "progress").exists():  # at least one full version exists
                assert time.monotonic() < deadline, "the writer never finished a version"
                time.sleep(0.05)
            time.sleep(float(rng.uniform(0.0, 0.8)))
            os.kill(writer.pid, signal.SIGKILL)
        finally:
            writer.kill()
            writer.wait()
        versions.append(_check_complete(tmp_path))
        if attempt % 2:  # some runs start over, so early kills land in first writes too
            for name in ("summary.json", "trials.csv", "best_model.pt", "progress"):
                (tmp_path / name).unlink(missing_ok=True)
    assert max(versions) > 1  # kills landed after rewrites, not only after first writes


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "best_config.yaml"
    write_text_atomic(target, "train:\n  epochs: 3\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("train:\n  ep")
        raise RuntimeError("disk full")
    assert target.read_text() == "train:\n  epochs: 3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_config.yaml"]


def strict_json(text: str):
    """Parse as RFC 8259 JSON: the bare tokens NaN/Infinity (Python's extension) refused."""

    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_with_null_for_nan_inf_and_numpy_values(tmp_path: Path):
    target = tmp_path / "summary.json"
    payload = {
        "auc": float("nan"),
        "loss": float("inf"),
        "low": -np.inf,
        "np_nan": np.float64("nan"),
        "np_float": np.float32(0.5),
        "np_int": np.int64(3),
        "np_bool": np.bool_(True),
        "array": np.array([1.0, np.nan]),
        "nested": [{"se": float("nan")}, (1, float("-inf"))],
        "path": tmp_path,
    }
    write_json_atomic(target, payload)
    loaded = strict_json(target.read_text())
    assert loaded == {
        "auc": None,
        "loss": None,
        "low": None,
        "np_nan": None,
        "np_float": 0.5,
        "np_int": 3,
        "np_bool": True,
        "array": [1.0, None],
        "nested": [{"se": None}, [1, None]],
        "path": str(tmp_path),
    }


def test_json_writer_raises_on_a_non_finite_number_the_conversion_missed(monkeypatch):
    import distmed.artifacts

    monkeypatch.setattr(distmed.artifacts, "json_safe", lambda value: value)  # a regression
    with pytest.raises(ValueError):
        distmed.artifacts.json_text({"auc": float("nan")})


def test_every_json_file_goes_through_the_one_writer():
    """No module but `distmed.artifacts` encodes JSON for a file: `json.dump` nowhere, and
    `json.dumps` only where it feeds a hash (a run name, the images' digest), never a file."""
    root = Path(__file__).resolve().parents[1] / "distmed"
    hashing = {"searchfile.py": 1, "train.py": 1}  # json.dumps -> hashlib, not a file
    for path in root.rglob("*.py"):
        if path.name == "artifacts.py" and path.parent == root:
            continue
        text = path.read_text()
        assert "json.dump(" not in text, path
        assert "allow_nan=True" not in text, path
        assert "model_dump_json" not in text, path
        assert text.count("json.dumps(") == hashing.get(path.name, 0), path


def test_only_checkpoints_ray_registered_survive_the_next_run(tmp_path: Path):
    from distmed.artifacts import CHECKPOINT_SNAPSHOT, delete_partial_checkpoints

    run = tmp_path / "cv-abc"
    for name in ("checkpoint_1", "checkpoint_2", "checkpoint_3"):
        (run / name).mkdir(parents=True)
        (run / name / "state.pt").write_bytes(b"x" * 10)
    listed = {"checkpoint_dir_name": "checkpoint_2"}
    snapshot = {"checkpoint_results": [listed], "latest_checkpoint_result": listed}
    (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps(snapshot))
    assert delete_partial_checkpoints(run) == ["checkpoint_1", "checkpoint_3"]
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_2"]
    (run / CHECKPOINT_SNAPSHOT).unlink()  # a run that never registered one: all are partial
    assert delete_partial_checkpoints(run) == ["checkpoint_2"]
    assert delete_partial_checkpoints(tmp_path / "nowhere") == []


def test_a_finished_run_whose_checkpoints_went_is_removed_an_unfinished_one_kept(tmp_path: Path):
    """Ray Train would resume a run folder by its name and fail on the checkpoints its
    snapshot lists but `delete_checkpoints` removed (a refit redone after best_model.pt was
    deleted); a run with a checkpoint is one to resume and stays."""
    from distmed.artifacts import (
        CHECKPOINT_SNAPSHOT,
        delete_checkpoints,
        remove_run_without_checkpoints,
    )

    run = tmp_path / "refit" / "refit-abc"
    (run / "checkpoint_2026").mkdir(parents=True)
    (run / "checkpoint_2026" / "state.pt").write_bytes(b"x" * 10)
    listed = {"checkpoint_dir_name": "checkpoint_2026"}
    snapshot = {"checkpoint_results": [listed], "latest_checkpoint_result": listed}
    (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps(snapshot))
    assert remove_run_without_checkpoints(str(run)) is False  # an interrupted refit: resumed
    assert (run / "checkpoint_2026" / "state.pt").is_file()
    delete_checkpoints(str(run))  # what a finished refit leaves
    assert remove_run_without_checkpoints(str(run)) is True
    assert not run.exists() and (tmp_path / "refit").is_dir()
    assert remove_run_without_checkpoints(str(run)) is False  # nothing there: nothing to do


def test_registered_checkpoints_name_the_latest_epoch_and_survive_a_bad_snapshot(tmp_path):
    from distmed.artifacts import CHECKPOINT_SNAPSHOT, registered_checkpoints
    from distmed.cv import interrupted_fit_text

    run = tmp_path / "cv-abc"
    assert registered_checkpoints(run) == (set(), None)
    assert "starts again from epoch 1" in interrupted_fit_text(tmp_path, "cv-abc")
    run.mkdir()
    older = {"checkpoint_dir_name": "checkpoint_1", "metrics": {"epoch": 1}}
    latest = {"checkpoint_dir_name": "checkpoint_2", "metrics": {"epoch": 2}}
    snapshot = {"checkpoint_results": [older, latest], "latest_checkpoint_result": latest}
    (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps(snapshot))
    assert registered_checkpoints(run) == ({"checkpoint_1", "checkpoint_2"}, {"epoch": 2})
    assert "epoch 2 is saved in" in interrupted_fit_text(tmp_path, "cv-abc")
    (run / CHECKPOINT_SNAPSHOT).write_text("[1, 2")  # torn write: nothing registered
    assert registered_checkpoints(run) == (set(), None)
    (run / CHECKPOINT_SNAPSHOT).write_text("[1, 2]")  # valid JSON, not Ray's shape
    assert registered_checkpoints(run) == (set(), None)
