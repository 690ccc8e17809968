"""Two Ray nodes on this machine: the real `distmed.tune` CLI joins them with `--address`.

The second node joins the test session's own Ray instance (one cluster per host: a second
cluster confuses Ray Train's cleaner), so the session's other Ray tests are unaffected once
it has left again. Which node every Train worker ran on comes from Ray's state API.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_image_folder

from distmed.worker import load_images

pytestmark = pytest.mark.ray


def _alive_nodes(ray) -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def second_node(ray_session):
    """Join a 1-CPU node to the session's Ray (`ray start --block`); yields the GCS address."""
    ray = ray_session
    address = ray.get_runtime_context().gcs_address
    before = len(_alive_nodes(ray))
    # `ray start` records its cluster here, and a later plain `ray.init()` on this host would
    # try to join that (by then dead) cluster: put the file back as it was afterwards.
    address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    previous = address_file.read_text() if address_file.is_file() else None
    command = [str(Path(sys.executable).with_name("ray")), "start", "--block"]
    command += ["--address", address, "--num-cpus", "1", "--num-gpus", "0"]
    node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(_alive_nodes(ray)) == before + 1, 60, "the second node")
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
        _wait_for(lambda: len(_alive_nodes(ray)) == before, 60, "the second node to leave")


def _space(tmp_path: Path, data: Path) -> Path:
    spec = {
        "base": {
            "data": {"root": str(data), "image_size": 16},
            "model": {"weights": "none"},
            "train": {"epochs": 1, "batch_size": 6, "amp": "off"},
            "cv": {"folds": 2},
            # Three workers of 0.9 CPU: the 2-CPU head holds two, the third must go to the
            # 1-CPU node, so every fit (the trial's and the refit) spans both nodes.
            "scaling": {"num_workers": 3, "cpus_per_worker": 0.9, "max_failures": 0},
        },
        "search": {"num_samples": 1, "seed": 0, "scheduler": {"type": "none"}},
        "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_search_over_two_nodes_with_address(second_node: str, ray_session, tmp_path: Path):
    from ray.util.state import list_actors

    def train_workers() -> dict[str, str]:
        actors = list_actors(
            filters=[("class_name", "=", "RayTrainWorker")],
            limit=10_000,
            raise_on_missing_output=False,
        )
        return {actor.actor_id: actor.node_id for actor in actors}

    earlier = set(train_workers())
    data = write_image_folder(tmp_path / "data", {"neg": 10, "pos": 10}, size=16)
    storage = tmp_path / "shared-storage"
    command = [sys.executable, "-m", "distmed.tune", "--space", str(_space(tmp_path, data))]
    command += ["--address", second_node, "--storage", str(storage), "--name", "two-nodes"]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"search over two nodes: {time.perf_counter() - started:.1f} s")

    placed = {a: n for a, n in train_workers().items() if a not in earlier}
    per_node = Counter(placed.values())
    print("Train workers per node:", dict(per_node))
    alive = {node["NodeID"] for node in _alive_nodes(ray_session)}
    assert len(per_node) == 2 and set(per_node) == alive, per_node
    assert len(placed) == 6  # 3 workers for the trial's fit, 3 for the refit

    out = storage / "two-nodes"
    with (out / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["completed"]
    assert 0.0 <= float(rows[0]["cv_roc_auc"]) <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_by_status"]["completed"] == 1
    assert (out / "best_model.pt").is_file()
    # Every Train run (the trial's and the refit) wrote its results under the shared storage.
    assert [p.name for p in (out / "trials").iterdir() if p.is_dir()] == [
        f"cv-{rows[0]['trial_id']}"
    ]
    assert (out / "refit" / f"refit-{rows[0]['trial_id']}").is_dir()


def test_workers_without_the_cache_file_read_the_shared_copy(ray_session, tmp_path: Path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    ref = ray_session.put(images)
    np.testing.assert_array_equal(load_images(str(tmp_path / "not-on-this-node.npy"), ref), images)
    with pytest.raises(FileNotFoundError, match="not on this node"):
        load_images(str(tmp_path / "not-on-this-node.npy"), None)
    np.save(tmp_path / "here.npy", images + 1)  # the local file wins over the shared copy
    np.testing.assert_array_equal(load_images(str(tmp_path / "here.npy"), ref), images + 1)
