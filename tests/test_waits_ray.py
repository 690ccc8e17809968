"""Every wait on Ray resources is bounded and ends in one line saying what was waited for.

Run on the test session's real Ray instance: resources are really held (a placement group
left behind, an actor holding the CPUs), and a real Ray Train fit is refused its workers.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import ray
from conftest import write_image_folder
from ray.util.placement_group import placement_group, placement_group_table

from distmed import train
from distmed.artifacts import delete_partial_checkpoints
from distmed.errors import UserError
from distmed.resources import WorkerLayout, wait_for_free_resources

pytestmark = pytest.mark.ray
TWO_CPU_WORKER = WorkerLayout(
    num_workers=1, use_gpu=False, cpus_per_worker=2.0, gpus_per_worker=0.0, threads=2
)


@ray.remote(num_cpus=2)
class CpuHolder:
    """Someone else's work on the cluster: it holds both CPUs until killed."""

    def ready(self) -> bool:
        return True


def _small_run(root: Path, output: Path, *settings: str) -> list[str]:
    """`distmed.train` arguments for a 2-fold, 1-epoch run at 16 px; `settings` override."""
    base = ("cv.folds=2", "model.weights=none", "data.image_size=16", "train.batch_size=4")
    items = [*base, "train.epochs=1", *settings]  # a later --set wins
    return ["--data", str(root), "--output", str(output), *(f for i in items for f in ("--set", i))]


def test_a_placement_group_left_by_a_finished_run_is_removed_before_the_refit(ray_session):
    # What Ray Train's cleaner fails to remove when it cannot find its cluster.
    left = placement_group([{"CPU": 2.0}])
    ray.get(left.ready(), timeout=60)
    started = time.monotonic()
    wait_for_free_resources(TWO_CPU_WORKER, "the refit")
    assert time.monotonic() - started < 10
    assert placement_group_table(left)["state"] == "REMOVED"
    assert ray.available_resources().get("CPU", 0) >= 2


def test_resources_held_by_other_work_are_awaited_within_a_bound(ray_session, monkeypatch):
    monkeypatch.setenv("DISTMED_RESOURCE_WAIT_S", "2")
    holder = CpuHolder.remote()
    ray.get(holder.ready.remote(), timeout=60)
    try:
        started = time.monotonic()
        with pytest.raises(UserError) as info:
            wait_for_free_resources(TWO_CPU_WORKER, "the refit")
        assert time.monotonic() - started < 10
    finally:
        ray.kill(holder)
    message = str(info.value)
    assert "the refit needs 0 of 2 CPU free after waiting 2 s" in message
    assert "--resume" in message and len(message.splitlines()) == 1


def test_workers_that_cannot_start_end_in_one_line_not_endless_retries(
    ray_session, tmp_path: Path, monkeypatch, capsys
):
    """Ray Train retries a worker group that did not start without end by default; here
    the CPUs are held by other work, so each try times out: bounded tries, then one line."""
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")  # forwarded by Ray Train
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    holder = CpuHolder.remote()
    ray.get(holder.ready.remote(), timeout=60)
    try:
        started = time.monotonic()
        code = train.main(_small_run(root, tmp_path / "out"))
        elapsed = time.monotonic() - started
    finally:
        ray.kill(holder)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "could not start 1 worker(s) of 2 CPU each within 3 s, 3 times" in err
    assert len(err.splitlines()[-1]) and err.splitlines()[-1].startswith("error:")
    assert elapsed < 120


def test_a_diverging_run_writes_its_results_and_says_so(ray_session, tmp_path: Path, capsys):
    """SGD at lr 10 with no warm-up: the loss becomes NaN. The run is marked diverged, its
    cv_result.json is written, and the CLI exits 2 with the reason (it used to end in
    KeyError: 'val_num_samples', with no results: the unit test never reached the step
    that turns the workers' histories into results)."""
    root = write_image_folder(tmp_path / "data", {"a": 8, "b": 8})
    out = tmp_path / "out"
    code = train.main(
        _small_run(
            root,
            out,
            "train.epochs=3",
            "train.amp=off",
            "optim.name=sgd",
            "optim.lr=10",
            "optim.warmup_epochs=0",
            "optim.schedule=constant",
        )
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "training diverged (loss NaN/inf)" in err and "KeyError" not in err
    result = json.loads((out / "cv_result.json").read_text())
    assert any(fold["history"][-1].get("diverged") for fold in result["folds"])
    assert all(fold["num_samples"] == 8 for fold in result["folds"])  # each fold's val set


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 3 MB tmpfs: room for the run's small files, none for a checkpoint (root only)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True
    )
    assert mounted.returncode == 0, f"the test needs root to mount a tmpfs: {mounted.stderr!r}"
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_an_output_disk_without_room_for_one_checkpoint_is_refused_before_training(
    ray_session, full_disk: Path, capsys, tmp_path
):
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    started = time.monotonic()
    assert train.main(_small_run(root, full_disk / "out", "scaling.max_failures=0")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the results folder {full_disk / 'out' / 'ray'}: "), err
    # 2 folds of ResNet-18 with AdamW's two moments: 2 x (44.8 + 2 x 44.7) MB.
    assert "MB free on its disk, but one checkpoint of this run needs about 268 MB" in err
    assert time.monotonic() - started < 20  # no Ray Train fit was started


def test_a_full_output_disk_is_one_line_naming_it(
    ray_session, full_disk: Path, capsys, tmp_path, monkeypatch
):
    """A disk that fills up during the run (here: the up-front room check is switched off,
    so the first checkpoint meets the full disk). It used to end in `WorkerGroupError:
    Training failed due to worker errors:` with the cause only in Ray's log."""
    from distmed import cv

    monkeypatch.setattr(cv, "check_free_space", lambda *args: None)
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    code = train.main(_small_run(root, full_disk / "out", "scaling.max_failures=0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("error: no space left on the device holding "), err[-3:]
    assert str(full_disk) in err[-1] and "--output" in err[-1]
    # The failed write left a half-written checkpoint that filled the disk; the next run of
    # the same command removes it before it starts (Ray never registered it).
    [run_dir] = (full_disk / "out" / "ray").glob("cv-*")
    assert list(run_dir.glob("checkpoint_*/state.pt"))
    assert delete_partial_checkpoints(run_dir) and not list(run_dir.glob("checkpoint_*/"))
