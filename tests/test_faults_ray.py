"""Injected faults on a two-node Ray cluster, through the real `distmed.tune` CLI.

One search carries every Ray-level fault (each Ray fit costs ~15-20 s of start-up on 2
cores): a SIGKILLed search driver (`--resume` continues the trial from its checkpoint), and a
trial whose Train worker is SIGKILLed once (the retried fit resumes from its epoch checkpoint)
and then again, past its retries (errored, the search goes on). Every trial runs the same
configuration with the same seeds, so the first, undisturbed trial is the clean run the resumed
one must equal. Both the search and its `--resume` run as `python -m distmed.tune` processes
whose output the test follows.

The search joins the test session's Ray instance with `--address`, and a second Ray node
(`ray start --block`) joins it first: every fit has two workers that only fit one per node,
so every fit, resumed ones and the refit included, spans both nodes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_image_folder
from torch.utils.data import DataLoader

from distmed.config import ExperimentConfig
from distmed.data import CachedImageDataset, build_cache, scan_source
from distmed.inference import build_network
from distmed.loop import Runtime, predict
from distmed.savedmodel import SavedModel
from distmed.task import task_for

pytestmark = pytest.mark.ray
EPOCHS = 4


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def _alive_nodes(ray) -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


@contextlib.contextmanager
def _joined_node(ray, cpus: int, object_store_bytes: int | None = None) -> Iterator[str]:
    """Join a node of `cpus` CPUs to the session's Ray (`ray start --block`) while inside;
    yields the GCS address."""
    address = ray.get_runtime_context().gcs_address
    before = len(_alive_nodes(ray))
    # `ray start` records its cluster here, and a later plain `ray.init()` on this host would
    # try to join that (by then dead) cluster: put the file back as it was afterwards.
    address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    previous = address_file.read_text() if address_file.is_file() else None
    command = [str(Path(sys.executable).with_name("ray")), "start", "--block"]
    command += ["--address", address, "--num-cpus", str(cpus), "--num-gpus", "0"]
    if object_store_bytes is not None:
        command += ["--object-store-memory", str(object_store_bytes)]
    node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(_alive_nodes(ray)) == before + 1, "the joining node", 60)
        yield address
    finally:
        # SIGINT: `ray start --block` exits through its clean-up, which stops the node's
        # processes gracefully, so the head marks the node dead at once.
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)
        _wait_for(lambda: len(_alive_nodes(ray)) == before, "the joined node to leave", 60)


@pytest.fixture(scope="module")
def second_node(ray_session):
    """Join a 2-CPU node to the session's Ray (`ray start --block`); yields the GCS address."""
    with _joined_node(ray_session, 2) as address:
        yield address


def _train_workers(alive_only: bool = True) -> dict[str, tuple[int, str]]:
    """Ray Train worker actors: actor id -> (process id, node id)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")]
    if alive_only:
        filters.append(("state", "=", "ALIVE"))
    actors = list_actors(filters=filters, limit=10_000, raise_on_missing_output=False)
    return {a.actor_id: (a.pid, a.node_id) for a in actors}


def _kill_a_worker() -> dict[str, tuple[int, str]]:
    """SIGKILL one worker of the running 2-worker fit; returns that fit's workers."""
    group = _wait_for(lambda: (w := _train_workers()) and len(w) == 2 and w, "2 live workers")
    os.kill(next(iter(group.values()))[0], signal.SIGKILL)
    return group


def _await_replacements(group: dict[str, tuple[int, str]]) -> None:
    _wait_for(
        lambda: len([a for a in _train_workers() if a not in group]) == 2,
        "Ray Train to start a replacement worker group",
    )


def test_search_on_two_nodes_survives_killed_workers_and_a_killed_driver(
    second_node: str, ray_session, tmp_path: Path
):
    """T1 runs clean. The driver is SIGKILLed during T2: --resume keeps T1, continues T2
    from its checkpoint (it equals T1). T3's worker is killed once: the retried fit resumes
    from its epoch-1 checkpoint; killed again, past `max_failures: 1`, T3 errors and the
    search goes on and refits. `trials.csv` has each trial once."""
    # 33 images: a fold of 17 validation images, which 2 workers split 9 + 9 (one padded).
    data = write_image_folder(tmp_path / "data", {"neg": 16, "pos": 17}, size=32)
    space = _search_space(tmp_path, data)
    storage = tmp_path / "shared-storage"
    argv = ["--space", str(space), "--storage", str(storage), "--name", "exp"]
    argv += ["--address", second_node]
    earlier = set(_train_workers(alive_only=False))
    lines: list[str] = []
    with _driver(argv) as driver:
        clean = _read_until(driver, lines, r"trial (\S+) completed: CV ROC-AUC (\S+)")[1]
        resumed = _read_until(driver, lines, r"trial (\S+) epoch 1:")[1]
        _read_until(driver, lines, rf"trial {resumed} epoch 2:")  # checkpoints of 1 and 2
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)

    started, resumed_from = time.monotonic(), len(lines)
    with _driver([*argv, "--resume"]) as driver:
        continued = _read_until(driver, lines, rf"trial {resumed} epoch (\d+):")[1]
        assert continued in ("2", "3"), f"resumed at epoch {continued}, not from its checkpoint"
        _read_until(driver, lines, rf"trial {resumed} completed")
        print(f"resume continued the killed trial to its end in {time.monotonic() - started:.1f} s")
        errored = _read_until(driver, lines, r"trial (\S+) epoch 1:")[1]
        _await_replacements(_kill_a_worker())
        # The retry resumes from the epoch-1 checkpoint: its first report is epoch 2. Once it
        # trains (a death while a group starts is retried apart, not counted), it dies too:
        # past max_failures, the trial errors.
        retry_from = len(lines)
        after_retry = _read_until(driver, lines, rf"trial {errored} epoch (\d+):")
        assert after_retry[1] == "2", "".join(lines[retry_from:])
        _kill_a_worker()
        _read_until(driver, lines, rf"trial {errored} errored")
        lines += driver.stdout.readlines()
        assert driver.wait(timeout=120) == 0, "".join(lines[-40:])
    assert len({clean, resumed, errored}) == 3
    assert not [line for line in lines[resumed_from:] if f"trial {clean} epoch" in line]
    assert "2 completed, 0 stopped early, 0 diverged, 1 errored" in "".join(lines[-40:])

    out = storage / "exp"
    rows = {r["trial_id"]: r for r in _read_csv(out / "trials.csv")}
    assert sorted(rows) == sorted([clean, resumed, errored])  # each trial once
    statuses = {t: rows[t]["status"] for t in (clean, resumed, errored)}
    assert statuses == {clean: "completed", resumed: "completed", errored: "errored"}
    assert rows[errored]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_by_status"]["errored"] == 1
    assert summary["trials_by_status"]["completed"] == 2
    assert (out / "best_model.pt").is_file()

    # The resumed trial is the clean run: same fold AUCs and per-epoch losses.
    assert int(rows[resumed]["epochs"]) == EPOCHS
    for name in ("fold0_roc_auc", "fold1_roc_auc"):
        assert float(rows[resumed][name]) == pytest.approx(float(rows[clean][name]), abs=1e-6)
    reference = _fold_histories(out, clean)
    for ours, theirs in zip(_fold_histories(out, resumed), reference, strict=True):
        assert [e["train_loss"] for e in ours] == pytest.approx(
            [e["train_loss"] for e in theirs], rel=1e-4
        )

    # Every fit ran one worker per node: T1, T2 twice, T3 twice, the refit.
    placed = Counter(
        n for a, (_, n) in _train_workers(alive_only=False).items() if a not in earlier
    )
    alive = {node["NodeID"] for node in _alive_nodes(ray_session)}
    assert set(placed) == alive and list(placed.values()) == [6, 6], placed
    assert (out / "refit" / f"refit-{summary['best_trial']}").is_dir()
    _check_validation_is_exact_despite_padding(out, summary)


def _check_validation_is_exact_despite_padding(out: Path, summary: dict) -> None:
    """The best trial's saved out-of-fold scores are one per validation image, in order, each
    what its fold model (kept in best_model.pt) gives in one process: the padded duplicate
    DistributedSampler adds for the second worker is dropped, not scored twice."""
    cfg = ExperimentConfig.model_validate(summary["best_config"])
    index = scan_source(cfg.data)
    images = np.load(build_cache(index, cfg.data).pool_path)
    _, _, fold_states = SavedModel.load_all(out / "best_model.pt")
    detail_file = out / "trials" / f"cv-{summary['best_trial']}" / "cv_detail.json"
    folds = json.loads(detail_file.read_text())["folds"]
    assert sorted(len(f["val_indices"]) for f in folds) == [16, 17]
    for fold, state in zip(folds, fold_states, strict=True):
        model = build_network(cfg.model, 2, state)
        dataset = CachedImageDataset(images, index.pool.labels, np.asarray(fold["val_indices"]))
        loader = DataLoader(dataset, batch_size=5)
        task = task_for(index.class_names, cfg.data.positive_class)
        indices, labels, probs = predict(model, loader, Runtime(torch.device("cpu")), task)
        assert indices.tolist() == fold["val_indices"]
        assert labels.tolist() == fold["val_labels"]
        np.testing.assert_allclose(probs, np.asarray(fold["val_probs"]), atol=1e-5)


@contextlib.contextmanager
def _driver(argv: list[str]) -> Iterator[subprocess.Popen]:
    """`python -m distmed.tune ARGV` with its output on a pipe; killed on the way out."""
    driver = subprocess.Popen(
        [sys.executable, "-m", "distmed.tune", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield driver
    finally:
        driver.kill()
        driver.wait(timeout=30)
        driver.stdout.close()


def _search_space(tmp_path: Path, data: Path) -> Path:
    spec = {
        "base": {
            "data": {"root": str(data), "image_size": 32},
            "model": {"weights": "none"},
            "train": {"epochs": EPOCHS, "batch_size": 8, "amp": "off", "seed": 3},
            "cv": {"folds": 2},
            # Two workers of 1.2 CPUs: one per 2-CPU node, so every fit spans both nodes.
            "scaling": {"num_workers": 2, "cpus_per_worker": 1.2, "max_failures": 1},
        },
        # One configuration: every trial is the same run, so the first one is the reference.
        "search": {"num_samples": 3, "max_concurrent": 1, "seed": 0, "scheduler": {"type": "none"}},
        "space": {"optim.lr": {"choice": [0.003]}},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _fold_histories(out: Path, trial: str) -> list[list[dict]]:
    detail = json.loads((out / "trials" / f"cv-{trial}" / "cv_detail.json").read_text())
    return [fold["history"] for fold in detail["folds"]]


def _read_until(process: subprocess.Popen, lines: list[str], pattern: str) -> re.Match:
    """Read the driver's output until a line matches; fail with what it printed."""
    for line in process.stdout:
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    pytest.fail(f"driver ended before printing {pattern!r}:\n{''.join(lines[-40:])}")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_streamed_cv_and_search_on_three_nodes_match_the_cached_run(
    second_node: str, ray_session, tmp_path: Path
):
    """`data.loader: stream` on three nodes (a third, with a small object store, joins for
    this test): the same folds as the cached run, the same pixels through Ray Data (bit for
    bit), each validation image scored once, and a CV ROC-AUC within noise of the cached
    run's; the images are read through a URI (file://), as from a bucket. Then a streamed
    search (`distmed.tune`, 2 trials side by side): its trials, its refit and its test split
    all run from the stream; the test split is scored once per image, in the cache's order,
    with the probabilities the saved model gives the cached test images."""
    from distmed import tune
    from distmed.cv import cross_validate, prepare_data
    from distmed.data.stream import stream_batches
    from distmed.inference import load_inference_model, predict_cached
    from distmed.resources import WorkerLayout

    data = tmp_path / "data"
    write_image_folder(data / "train", {"neg": 16, "pos": 17}, size=32)
    write_image_folder(data / "test", {"neg": 4, "pos": 4}, size=32, seed=5)
    settings = {
        "model": {"weights": "none"},
        "cv": {"folds": 2},
        "train": {"batch_size": 8, "epochs": 3, "amp": "off"},
    }
    cached_cfg = ExperimentConfig.model_validate(
        {**settings, "data": {"root": str(data), "image_size": 32}}
    )
    stream_cfg = ExperimentConfig.model_validate(
        {**settings, "data": {"root": f"file://{data}", "image_size": 32, "loader": "stream"}}
    )
    layout = WorkerLayout(2, False, cpus_per_worker=1, gpus_per_worker=0, threads=1)
    with _joined_node(ray_session, 2, object_store_bytes=100 * 1024**2):
        assert len(_alive_nodes(ray_session)) == 3
        cached = prepare_data(cached_cfg, scan_source(cached_cfg.data))
        streamed = prepare_data(stream_cfg, scan_source(stream_cfg.data))
        assert streamed.cache is None and streamed.plan.stream is not None
        assert streamed.plan.folds == cached.plan.folds  # the same fold assignment
        assert streamed.plan.labels == cached.plan.labels
        pixels = np.load(cached.cache.pool_path)
        order = np.arange(len(pixels))[::-1].copy()  # read in a given order, kept
        batches = list(stream_batches(streamed.plan.stream, order, batch_size=5))
        images = np.concatenate([b[0].numpy() for b in batches])
        assert np.concatenate([b[1].numpy() for b in batches]).tolist() == order.tolist()
        np.testing.assert_array_equal(images[:, :1], pixels[order])  # grey: channel 0 ...
        np.testing.assert_array_equal(images[:, 1:], np.repeat(pixels[order], 2, axis=1))
        results = {
            name: cross_validate(cfg, prep.plan, layout, tmp_path / "ray", f"loader-{name}")
            for name, cfg, prep in (
                ("cache", cached_cfg, cached),
                ("stream", stream_cfg, streamed),
            )
        }
        assert tune.main(_streamed_search(tmp_path, f"file://{data}")) == 0
    for name, result in results.items():
        for fold, spec in zip(result.folds, cached.plan.folds, strict=True):
            assert fold.val_indices == sorted(spec["val"]), name  # each image scored once
            assert fold.history[-1]["epoch"] == 3, name
    cache_auc, stream_auc = results["cache"].mean_roc_auc, results["stream"].mean_roc_auc
    print(f"CV ROC-AUC cached {cache_auc:.4f}, streamed {stream_auc:.4f}")
    # 2 folds of 16 images, 6 steps each: the folds' AUCs move by ~0.1 with the batch order.
    assert math.isfinite(stream_auc) and abs(stream_auc - cache_auc) < 0.2

    out = tmp_path / "runs" / "streamed"
    rows = _read_csv(out / "trials.csv")
    assert sorted(r["status"] for r in rows) == ["completed", "completed"]
    model, saved = load_inference_model(out / "best_model.pt")  # the refit model loads
    assert saved.config.data.loader == "stream"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_metrics"]["num_samples"] == 8
    assert (out / "refit" / f"refit-{summary['best_trial']}").is_dir()  # the refit ran
    test = np.load(out / "test_predictions.npz")
    truth, probs = predict_cached(
        model, cached.cache.test_path, streamed.plan.task, torch.device("cpu"),
        cached.index.test.labels,
    )  # fmt: skip
    assert len(test["labels"]) == len(cached.index.test) == 8  # each test image once ...
    assert test["labels"].tolist() == truth.tolist()  # ... in the cache's order
    np.testing.assert_allclose(test["probs"], probs, atol=1e-5)
    assert str(test["images_path"]) == ""  # nothing decoded was kept
    # The pool's file list reached the trials and the refit as one index file in the search's
    # storage (#35: not as a list in the object store), as the CV run's did in its own.
    from distmed.data.streamindex import index_paths

    for storage in (out, tmp_path / "ray"):
        (index,) = (storage / "stream-index").glob("*.arrow")
        pool = [str(p) for p in cached.index.pool.paths]
        listed = index_paths(str(index), np.arange(len(pool)))
        assert [p.removeprefix("file://") for p in listed] == pool, storage  # the search's: URIs


def _streamed_search(tmp_path: Path, root: str) -> list[str]:
    """`distmed.tune` arguments of a tiny streamed search: 2 trials side by side, 1 epoch."""
    spec = {
        "base": {
            # Half a CPU per decoding task, kept free on each of the 3 nodes: with 1 CPU
            # kept on each, only one trial of 2 x 1-CPU workers would fit at a time.
            "data": {"root": root, "image_size": 32, "loader": "stream", "stream_decode_cpus": 0.5},
            "model": {"weights": "none"},
            "train": {"epochs": 1, "batch_size": 8, "amp": "off"},
            "cv": {"folds": 2},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        },
        "search": {"num_samples": 2, "max_concurrent": 2, "seed": 0, "scheduler": {"type": "none"}},
        "space": {"optim.lr": {"choice": [0.003, 0.01]}},
    }
    path = tmp_path / "stream-space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return ["--space", str(path), "--storage", str(tmp_path / "runs"), "--name", "streamed"]
