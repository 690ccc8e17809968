"""The real `python -m distmed.train` CLI: bad input fails in one line before Ray starts."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import write_image_folder

from distmed import tune
from distmed.train import main


def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("error: ")
    return err


def test_missing_data_path(tmp_path: Path, capsys) -> None:
    err = _fail(["--data", str(tmp_path / "nowhere")], capsys)
    assert "nowhere" in err and "no such file" in err


def test_frozen_random_init_stages_are_warned_before_any_work(tmp_path, capsys, caplog) -> None:
    argv = ["--data", str(tmp_path / "nowhere"), "--set", "model.weights=none"]
    with caplog.at_level("WARNING", logger="distmed.model"):
        _fail([*argv, "--set", "model.unfreeze=2"], capsys)  # the data error comes after it
        _fail(argv, capsys)  # the default unfreeze trains every stage
    [record] = [r for r in caplog.records if r.name == "distmed.model"]
    assert "model.unfreeze=2 freezes layer2, layer1, stem at random init" in record.getMessage()


def test_empty_class_folder(tmp_path: Path, capsys) -> None:
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    (root / "c").mkdir()
    err = _fail(["--data", str(root)], capsys)
    assert str(root / "c") in err and "no images" in err


def test_single_class(tmp_path: Path, capsys) -> None:
    root = write_image_folder(tmp_path / "data", {"only": 6})
    assert "only one class" in _fail(["--data", str(root)], capsys)


def test_unknown_config_key(tmp_path: Path, capsys) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    err = _fail(["--config", str(config)], capsys)
    assert "train.learning_rate" in err and "unknown key" in err and str(config) in err


def test_bad_override_value(capsys) -> None:
    err = _fail(["--set", "optim.lr=-1", "--data", "demo"], capsys)
    assert "optim.lr" in err


def test_corrupt_image(tmp_path: Path, capsys) -> None:
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = _fail(["--data", str(root), "--set", "cv.folds=2", "--set", "model.weights=none"], capsys)
    assert "b/broken.png" in err and "unreadable" in err


def test_class_with_fewer_images_than_folds(tmp_path: Path, capsys) -> None:
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 3})
    err = _fail(["--data", str(root), "--set", "cv.folds=5", "--set", "model.weights=none"], capsys)
    assert "'b'" in err and "cv.folds=5" in err


def test_debug_shows_traceback(tmp_path: Path) -> None:
    from distmed.errors import UserError

    with pytest.raises(UserError):
        main(["--data", str(tmp_path / "nowhere"), "--debug"])


def test_more_workers_than_cpus_is_refused(ray_session, tmp_path: Path, capsys) -> None:
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    argv = ["--data", str(root), "--workers", "3", "--set", "cv.folds=2"]
    argv += ["--set", "train.batch_size=4"]
    err = _fail([*argv, "--set", "model.weights=none", "--set", "data.image_size=16"], capsys)
    assert "scaling.num_workers=3" in err and "lower --workers" in err


def test_refused_cluster_address_fails_at_once(tmp_path: Path, capsys) -> None:
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    argv = ["--data", str(root), "--set", "cv.folds=2", "--set", "model.weights=none"]
    argv += ["--set", "train.batch_size=4"]
    err = _fail([*argv, "--address", "127.0.0.1:1"], capsys)
    assert "127.0.0.1:1" in err and "Connection refused" in err and "ray start" in err


def test_silent_cluster_address_fails_within_seconds(tmp_path: Path, capsys, monkeypatch) -> None:
    # A port that accepts connections and never answers: a firewall, a proxy, a wrong service.
    monkeypatch.setenv("DISTMED_RAY_CONNECT_TIMEOUT_S", "6")
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    argv = ["--data", str(root), "--set", "cv.folds=2", "--set", "model.weights=none"]
    argv += ["--set", "train.batch_size=4"]
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        err = _fail([*argv, "--address", address], capsys)
    assert time.monotonic() - started < 30
    assert address in err and "did not answer as a Ray cluster within 6 s" in err


def test_malformed_cluster_address(tmp_path: Path, capsys) -> None:
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    argv = ["--data", str(root), "--set", "cv.folds=2", "--set", "model.weights=none"]
    argv += ["--set", "train.batch_size=4"]
    assert "expected auto, HOST:PORT" in _fail([*argv, "--address", "headnode"], capsys)


# --------------------------------------------------------------------------- the bad-input table
# Each case: what the user gives -> the words the one-line error must contain. docs/reliability.md
# lists the same cases.


def _npz(path: Path, drop: str | None = None, short_labels: bool = False) -> Path:
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.zeros((6, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(6) % 2).reshape(6, 1)
    if short_labels:
        arrays["val_labels"] = arrays["val_labels"][:4]
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return path


def _split_with_extra_class(root: Path) -> Path:
    write_image_folder(root / "train", {"a": 4, "b": 4})
    write_image_folder(root / "test", {"a": 2, "b": 2, "c": 2})
    return root


def _file_not_folder(root: Path) -> Path:
    write_image_folder(root, {"a": 2, "b": 2})
    return root / "a" / "p00_img00.png"


BAD_DATA = {
    "file-not-folder": (_file_not_folder, [], ["must be a MedMNIST .npz", "give a folder"]),
    "classes-differ": (_split_with_extra_class, [], ["test/", "differ from train/"]),
    "npz-missing-key": (
        lambda p: _npz(p.with_suffix(".npz"), drop="val_labels"),
        [],
        ["val_labels"],
    ),
    "npz-lengths": (
        lambda p: _npz(p.with_suffix(".npz"), short_labels=True),
        [],
        ["val_images has 6 rows but val_labels 4"],
    ),
    "batch-too-large": (
        lambda p: write_image_folder(p, {"a": 6, "b": 6}),
        ["--set", "cv.folds=2", "--set", "train.batch_size=64"],
        ["train.batch_size=64", "smallest fold", "lower train.batch_size"],
    ),
    "wrong-type": (
        lambda p: write_image_folder(p, {"a": 6, "b": 6}),
        ["--set", "train.epochs=many"],
        ["train.epochs", "'many'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_input_is_one_line_naming_the_problem(case: str, tmp_path: Path, capsys) -> None:
    build, extra, words = BAD_DATA[case]
    data = build(tmp_path / "data")
    err = _fail(["--data", str(data), "--set", "model.weights=none", *extra], capsys)
    for word in words:
        assert word in err, err


def test_bad_search_space_through_the_tune_cli(tmp_path: Path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  optim.lr: {loguniform: [0, 0.1]}\n")
    assert tune.main(["--space", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(space) in err and "space.optim.lr" in err


def test_ray_address_from_the_environment_is_checked_too(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    # `ray job submit` sets RAY_ADDRESS for the driver; a dead one must not hang either.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    root = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    argv = ["--data", str(root), "--set", "cv.folds=2", "--set", "model.weights=none"]
    err = _fail([*argv, "--set", "train.batch_size=4"], capsys)
    assert "127.0.0.1:1" in err and "Connection refused" in err


def test_alias_bomb_config_fails_at_once_through_both_clis(tmp_path: Path, capsys) -> None:
    # Issue 24 item 5: nine lists of nine aliases grew distmed.train past 3 GB.
    from test_config import alias_bomb

    config = tmp_path / "bomb.yaml"
    config.write_text(alias_bomb())
    started = time.perf_counter()
    err = _fail(["--config", str(config)], capsys)
    assert str(config) in err and "expands to more than" in err
    space = tmp_path / "space.yaml"
    space.write_text(alias_bomb().replace("data:\n  root:", "base:\n  data:\n    root:"))
    assert tune.main(["--space", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(space) in err and "expands to more than" in err
    assert time.perf_counter() - started < 2.0


def test_tune_names_a_bad_set_item_not_the_shipped_space(capsys) -> None:
    code = tune.main(["--space", "demo", "--dry-run", "--set", "cv.folds=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --set cv.folds=1: cv.folds: ") and "demo.yaml" not in err


def test_ctrl_c_in_the_fit_says_which_epoch_is_saved_and_how_to_resume(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Ray Train's own SIGINT handler ended `distmed.train` silently with status 1 (a new
    user's try); now Ctrl-C is a KeyboardInterrupt naming the registered epoch, exit 130."""
    import json

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from distmed import cv, pipeline, resources
    from distmed.artifacts import CHECKPOINT_SNAPSHOT

    root = write_image_folder(tmp_path / "data", {"a": 8, "b": 8})
    ray_handler = DataParallelTrainer.__dict__["_register_sigint_handler"]
    monkeypatch.setattr(pipeline, "connect", lambda data, *a, **k: data)
    layout = SimpleNamespace(num_workers=1, cpus_per_worker=1, use_gpu=False)
    monkeypatch.setattr(resources, "plan_workers", lambda *a, **k: layout)
    seen = {}

    def interrupted_fit(cfg, plan, layout, storage, run_name, *args, **kwargs):
        seen["handler"] = DataParallelTrainer.__dict__["_register_sigint_handler"]
        run = Path(storage) / run_name
        run.mkdir(parents=True)
        latest = {"checkpoint_dir_name": "checkpoint_b", "metrics": {"epoch": 3}}
        snapshot = {"checkpoint_results": [latest], "latest_checkpoint_result": latest}
        (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps(snapshot))
        raise KeyboardInterrupt

    monkeypatch.setattr(cv, "cross_validate", interrupted_fit)
    out = tmp_path / "out"
    argv = ["--data", str(root), "--output", str(out), "--set", "cv.folds=2"]
    argv += ["--set", "model.weights=none", "--set", "train.batch_size=4"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert seen["handler"] is not ray_handler  # Ray's handler kept out during the fit
    assert DataParallelTrainer.__dict__["_register_sigint_handler"] is ray_handler  # restored
    assert err.startswith("interrupted: training stopped; epoch 3 is saved in ")
    assert str(out / "ray" / "cv-") in err and "rerun the same command" in err
