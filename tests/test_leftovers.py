"""What a run leaves behind on the machine: the staging copy of results bound for a URI,
the Ray session folder of distmed's own local instance, a half-written demo folder.

(The session folders of real CLI searches: tests/test_concurrent_ray.py.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from distmed import artifacts, demo, resources
from distmed.errors import UserError
from distmed.nested import NESTED_FILE


@pytest.fixture
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """$TMPDIR in tmp_path; the exit hooks `results_folder` registers, recorded (run by
    the test, not at the end of the test session)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    hooks: list[tuple] = []
    monkeypatch.setattr(artifacts.atexit, "register", lambda *call: hooks.append(call))
    return hooks


def _digest(destination: str) -> str:
    return hashlib.sha256(destination.encode()).hexdigest()[:10]


def test_two_buckets_never_share_a_staging_copy():
    """One --name in two buckets (or paths): two copies, so two locks (distmed.runlock)."""
    one = artifacts.staging_folder("s3://bucket-a/exp", "n1")
    other = artifacts.staging_folder("s3://bucket-b/exp", "n1")
    assert one != other and one.parent == other.parent
    assert one == artifacts.staging_folder("s3://bucket-a/exp/", "n1")  # a trailing / is the same


def _run_exit_hooks(hooks: list[tuple]) -> None:
    for function, *args in hooks:
        function(*args)


def test_the_staging_copy_is_removed_at_exit_once_uploaded(tmp_path, staging, capsys):
    bucket = tmp_path / "bucket"
    (bucket / "exp").mkdir(parents=True)  # pyarrow's local filesystem makes no parents
    local = artifacts.results_folder(f"file://{bucket}", "exp")
    assert local == tmp_path / "tmp" / "distmed-results" / f"exp-{_digest(f'file://{bucket}/exp')}"
    (local / "trials.csv").write_text("trial_id\nt1\n")
    artifacts.publish_results(local, f"file://{bucket}", "exp")
    assert (bucket / "exp" / "trials.csv").read_text() == "trial_id\nt1\n"

    _run_exit_hooks(staging)
    assert not local.exists()
    out = capsys.readouterr()
    assert (
        out.err == ""
        and out.out == f"results uploaded to file://{bucket}/exp (local staging copy removed)\n"
    )


def test_a_staging_copy_with_files_not_uploaded_is_kept_and_said_where(tmp_path, staging, capsys):
    storage = f"file://{tmp_path / 'bucket'}"
    (tmp_path / "bucket" / "exp").mkdir(parents=True)
    local = artifacts.results_folder(storage, "exp")
    (local / "trials.csv").write_text("trial_id\nt1\n")
    artifacts.publish_results(local, storage, "exp")
    (local / "summary.json").write_text("{}")  # written after the last upload (then a crash)

    _run_exit_hooks(staging)
    assert (local / "summary.json").is_file()
    assert f"they are kept in {local}" in capsys.readouterr().err


def test_a_failed_upload_keeps_the_staging_copy_and_names_it(tmp_path, staging, capsys):
    (tmp_path / "not-a-folder").write_text("")
    storage = f"file://{tmp_path / 'not-a-folder'}"  # no bucket can be written there
    local = artifacts.results_folder(storage, "exp")
    (local / "best_model.pt").write_bytes(b"weights")
    with pytest.raises(UserError, match=f"could not upload the results to {storage}/exp") as exc:
        artifacts.publish_results(local, storage, "exp")
    assert f"they are kept in {local}" in str(exc.value)

    _run_exit_hooks(staging)
    assert (local / "best_model.pt").read_bytes() == b"weights"
    assert capsys.readouterr().err == ""  # the error said it once already


def test_a_removed_staging_copy_gets_back_what_resume_reads_from_the_bucket(tmp_path, staging):
    """A nested search interrupted (and uploaded) then `--resume`d: the progress file comes
    back; files that are not ours to restore stay in the bucket only."""
    bucket = tmp_path / "bucket"
    (bucket / "exp").mkdir(parents=True)
    (bucket / "exp" / NESTED_FILE).write_text('{"folds": ["done"]}')
    (bucket / "exp" / "best_model.pt").write_bytes(b"\x80refit weights")  # a finished refit
    (bucket / "exp" / "tuner.pkl").write_bytes(b"Tune's own state")
    local = artifacts.results_folder(f"file://{bucket}", "exp")
    assert sorted(p.name for p in local.iterdir()) == sorted(["best_model.pt", NESTED_FILE])
    assert (local / NESTED_FILE).read_text() == '{"folds": ["done"]}'
    assert (local / "best_model.pt").read_bytes() == b"\x80refit weights"
    _run_exit_hooks(staging)  # e.g. the resumed search was refused: nothing new to keep
    assert not local.exists()


def test_a_staging_copy_never_written_is_removed(tmp_path, staging):
    local = artifacts.results_folder(f"file://{tmp_path / 'bucket'}", "exp")
    _run_exit_hooks(staging)  # e.g. the search was refused before any result
    assert not local.exists()


def test_a_local_storage_is_the_results_folder_itself_and_stays(tmp_path, staging):
    local = artifacts.results_folder(str(tmp_path / "runs"), "exp")
    assert local == tmp_path / "runs" / "exp" and local.is_dir()
    assert staging == []


# --------------------------------------------------------------------------- Ray session


def _session(ray_tmp: Path, name: str) -> Path:
    folder = ray_tmp / name
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "raylet.out").write_text("log")
    return folder


def test_only_our_own_ray_session_folder_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(resources.ray, "is_initialized", lambda: False)  # already stopped
    ours = _session(tmp_path, "session_2026-12-05_04-00-00_000001_111")
    other = _session(tmp_path, "session_2026-12-05_04-10-00_000001_222")  # another cluster
    os.symlink(other, tmp_path / "session_latest")

    resources.stop_local_ray(ours)
    assert not ours.exists()
    assert other.is_dir() and (tmp_path / "session_latest").resolve() == other

    os.unlink(tmp_path / "session_latest")
    os.symlink(ours, tmp_path / "session_latest")
    ours = _session(tmp_path, ours.name)
    metrics = tmp_path / "prom_metrics_service_discovery.json"
    os.symlink(ours / "metrics.json", metrics)
    resources.stop_local_ray(ours)
    assert not ours.exists()
    assert [p.name for p in tmp_path.iterdir()] == [other.name]  # no link into ours left


def test_the_session_folder_is_kept_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(resources.ray, "is_initialized", lambda: False)
    monkeypatch.setenv(resources.KEEP_SESSION_ENV, "1")
    ours = _session(tmp_path, "session_2026-12-05_04-00-00_000001_111")
    resources.stop_local_ray(ours)
    assert (ours / "logs" / "raylet.out").is_file()


# --------------------------------------------------------------------------- demo folder


def _tiny_demo(folder: Path) -> None:
    (folder / "train" / "normal").mkdir(parents=True)
    (folder / "train" / "normal" / "p000_k0.png").write_bytes(b"png")


def test_no_demo_draft_stays_when_another_process_finished_first(tmp_path, monkeypatch):
    def other_process_wins(folder: Path) -> None:
        _tiny_demo(tmp_path / "demo-v2")  # the other writer renames its copy in place...
        _tiny_demo(folder)  # ...while ours is still being written

    monkeypatch.setattr(demo, "write_demo_images", other_process_wins)
    assert demo.ensure_demo_folder(tmp_path) == tmp_path / "demo-v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-v2"]


def test_no_demo_draft_stays_after_a_failed_write(tmp_path, monkeypatch):
    def disk_full(folder: Path) -> None:
        _tiny_demo(folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "write_demo_images", disk_full)
    with pytest.raises(OSError):
        demo.ensure_demo_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_demo_draft_is_removed_a_running_ones_kept(tmp_path, monkeypatch):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    dead = tmp_path / f"{demo.DRAFT_PREFIX}{ended.stdout.strip()}"
    running = tmp_path / f"{demo.DRAFT_PREFIX}{os.getppid()}"
    for draft in (dead, running):
        _tiny_demo(draft)
    monkeypatch.setattr(demo, "write_demo_images", _tiny_demo)

    demo.ensure_demo_folder(tmp_path)
    assert not dead.exists() and running.is_dir()
    assert (tmp_path / "demo-v2" / "train" / "normal" / "p000_k0.png").is_file()


def test_the_demo_folder_holds_only_images_and_an_old_marker_is_not_reported(tmp_path):
    """No marker among the images (a scan listed it as "skipped: not an image file"); a
    folder an earlier version wrote, with a DONE marker inside, is reused and its marker is
    not reported as an input."""
    from distmed.config import DataConfig
    from distmed.data import scan_source

    folder = demo.ensure_demo_folder(tmp_path)
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} == {".png"}
    cfg = DataConfig(root="demo", cache_dir=str(tmp_path))
    assert scan_source(cfg).ignored == {}
    (folder / "DONE").write_text("synthetic demo data written by distmed.demo\n")
    assert demo.ensure_demo_folder(tmp_path) == folder  # reused as it is
    index = scan_source(cfg)
    assert index.ignored == {} and len(index.pool.labels) == 400
