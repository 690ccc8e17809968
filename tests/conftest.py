"""Shared fixtures: offline, CPU-only, one Ray instance per session, tiny image folders."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Before Ray or distmed start: fast health checks, fail fast on unschedulable workers,
# no preemption watcher, no W&B network, and a decoded-image cache private to this test session.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# No node is ever preempted here, and the watcher is one more actor process (Python + Ray
# imports, ~2.5 s of CPU) for every Ray Train fit on a 2-core machine.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# The suite runs more busy processes than cores (pytest-xdist processes, Ray Train workers with
# a torch thread per CPU Ray gives them, searches in subprocesses). OpenMP's default waits by
# spinning: a torch thread whose peer is descheduled burns its core at every barrier. Measured on
# the 2-core host under load, ResNet-18 training steps at 28 px on 2 threads: 55-77 ms of CPU
# and 280-540 ms of wall per image spinning, 11 and 47 sleeping (1 thread: 9-10 and 35-54).
# Inherited by every process the tests start (Ray's workers too); before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Under pytest-xdist (`bash dev.sh test` runs 4 processes, `test-fast` 2) the cores
# are shared out: processes with a thread per core each would fight over the cores.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _XDIST_WORKERS))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["DISTMED_CACHE"] = str(tmp_path_factory.mktemp("distmed-cache"))


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """distmed.tunestate's records of the searches the tests run, not the user's."""
    os.environ["DISTMED_STATE_DIR"] = str(tmp_path_factory.mktemp("distmed-state"))


@pytest.fixture(autouse=True)
def _default_train_output_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`distmed.train` without --output writes to runs/train-<data>-<time> in the working
    directory; a test's run goes to its own tmp_path instead of the checkout."""
    import distmed.train

    monkeypatch.setattr(
        distmed.train, "_default_output", lambda index: tmp_path / f"runs-train-{index.name}"
    )


# Fixtures that start (or need) the session's Ray instance; a test that uses one, directly
# or through another fixture, is marked `ray` here, so `-m "not ray"` (`bash dev.sh test-fast`)
# never starts Ray even when a test forgets its own marker.
RAY_FIXTURES = frozenset({"ray_session"})


# The files with tests on a session's Ray instance, in two groups. `bash dev.sh test` runs
# pytest-xdist with `--dist loadfile`; `pytest_xdist_make_scheduler` below makes each group ONE
# unit of work (one process, one Ray instance started once: `ray_session` is per process), and
# every other file a unit of its own. Two groups, so the session's Ray tests (they mostly wait
# on Ray) run in two processes beside each other rather than one after another; balance them by
# the `--durations` of a `bash dev.sh test` run (each file's group: `session_ray_unit`).
# (pytest-xdist's `xdist_group` marks do not reach its scheduler under pytest 9.)
SESSION_RAY_GROUPS: dict[str, frozenset[str]] = {
    # CV on BreastMNIST, the demo and multi-label data; the ASHA and nested searches.
    "session-ray-1": frozenset(
        {"test_cv_ray.py", "test_tune_ray.py", "test_train_cli.py", "test_leftovers.py"}
    ),
    # Searches over two and three nodes (killed workers and driver, streamed data); the waits.
    "session-ray-2": frozenset(
        {"test_faults_ray.py", "test_waits_ray.py", "test_multinode_ray.py"}
    ),
}
SESSION_RAY_FILES = frozenset().union(*SESSION_RAY_GROUPS.values())
if sum(map(len, SESSION_RAY_GROUPS.values())) != len(SESSION_RAY_FILES):
    raise pytest.UsageError("tests/conftest.py: a file is in two SESSION_RAY_GROUPS")


def session_ray_unit(nodeid: str) -> str | None:
    """The SESSION_RAY_GROUPS group `nodeid`'s file is in; None for the other files."""
    name = Path(nodeid.split("::", 1)[0]).name
    return next((group for group, files in SESSION_RAY_GROUPS.items() if name in files), None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
            # `own_ray` tests run beside others (pytest-xdist), where no session Ray may start.
            if item.get_closest_marker("own_ray"):
                raise pytest.UsageError(f"{item.nodeid} is marked own_ray but uses {RAY_FIXTURES}")
            if item.path.name not in SESSION_RAY_FILES:
                raise pytest.UsageError(
                    f"{item.nodeid} uses the session's Ray: add {item.path.name} to one group "
                    "of SESSION_RAY_GROUPS in tests/conftest.py (else its process starts a Ray "
                    "instance beside the groups' own)"
                )
    # The session's Ray groups are the longest units and mostly wait on Ray: they start first,
    # the `own_ray` searches second, and the files without Ray fill the cores beside them.
    items.sort(key=_schedule_rank)


def _schedule_rank(item: pytest.Item) -> int:
    if item.path.name in SESSION_RAY_FILES:
        return 0
    return 1 if item.get_closest_marker("own_ray") else 2


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: absent under `-p no:xdist`
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, with each group of SESSION_RAY_GROUPS as one unit (in collection
    order: the order `pytest_collection_modifyitems` gives)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SessionRayScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return session_ray_unit(nodeid) or nodeid.split("::", 1)[0]

    return SessionRayScheduling(config, log)


@pytest.fixture(scope="session")
def ray_session():
    """The test run's own Ray instance, started the way distmed starts one: every process
    of it knows its address, so other Ray instances on this host (a user's, or the searches
    some tests run in subprocesses) never confuse Ray Train or the state API."""
    import ray

    from distmed.resources import start_local_ray

    previous = os.environ.get("RAY_ADDRESS")
    start_local_ray(worker_logs=False, num_cpus=2)
    yield ray
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


def shared_npz(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the real MedMNIST files live in ../shared/data")
    return path


def write_image_folder(
    root: Path,
    counts: dict[str, int],
    size: int = 16,
    mode: str = "L",
    seed: int = 0,
    suffix: str = ".png",
) -> Path:
    """ROOT/<class>/img_XX.png with a class-dependent brightness, so classes are learnable."""
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(sorted(counts.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = 60 + 120 * label
            pixels = np.clip(rng.normal(base, 40, (size, size)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L")
            if mode != "L":
                image = image.convert(mode)
            image.save(folder / f"p{i // 2:02d}_img{i:02d}{suffix}")
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def saved_record(size: int, class_names: list[str], **changes: Any) -> Any:
    """A valid `SavedModel` (a 2-class random-init ResNet-18 at `size` px) with `changes`."""
    from distmed.config import ExperimentConfig
    from distmed.savedmodel import SavedModel, preprocessing_for

    cfg = ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": size}, "model": {"weights": "none"}}
    )
    fields = {
        "config": cfg,
        "class_names": class_names,
        "positive_index": 1,
        "preprocessing": preprocessing_for(size, 1),
        "source": "refit-t1",
    }
    return SavedModel(**(fields | changes))


# --------------------------------------------------------------------------- folds without Ray
# One fold as `distmed.loop` trains it, for the loop's and the recipe's tests (tests/test_loop.py,
# tests/test_recipe.py). Imports stay inside: collecting a test that needs no torch loads none.


def two_class_images(count: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`count` seeded random grey images, uint8 (count, 1, size, size), and their labels
    0, 1, 0, 1, ... (count,) (`count` even)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 1, size, size), dtype=np.uint8)
    return images, np.tile([0, 1], count // 2)


def built_fold(
    cfg: Any, train: range = range(12), val: range = range(12, 16), count: int = 16
) -> Any:
    """Fold 0 of a binary task over `two_class_images(count)`, made by `loop.build_fold` from
    `cfg` on the CPU with batches of 4: images `train` to train on, `val` to validate."""
    import torch

    from distmed.loop import FoldData, Runtime, build_fold
    from distmed.task import BinaryTask

    images, labels = two_class_images(count)
    task = BinaryTask(("negative", "positive"), 1)
    data = FoldData(0, list(train), list(val), images, labels, task)
    return build_fold(data, cfg, Runtime(torch.device("cpu")), batch_size=4)


def assembled_fold(
    task: Any,
    model: Any,
    optimizer: Any,
    loss_fn: Any,
    train_loader: Any,
    val_loader: Any = None,
    index: int = 0,
    accumulate_steps: int = 1,
) -> Any:
    """A `loop.FoldRun` of parts the test chose, at a constant learning rate without loss
    scaling (what `build_fold` would otherwise choose from a config)."""
    import torch

    from distmed.loop import FoldRun

    return FoldRun(
        index=index,
        task=task,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=loss_fn,
        train_loader=train_loader,
        val_loader=val_loader,
        accumulate_steps=accumulate_steps,
    )
