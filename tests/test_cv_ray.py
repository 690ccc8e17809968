"""End to end through Ray Train on real and demo data: the CLI learns what it should.

(2 DDP workers and exact validation despite DistributedSampler's padding: the 2-node
search in tests/test_faults_ray.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_npz

from distmed.train import main

pytestmark = pytest.mark.ray

TINY = [
    "--set", "model.weights=none",
    "--set", "train.amp=off",
    "--set", "scaling.max_failures=0",
]  # fmt: skip


def test_breastmnist_cross_validation_beats_chance(ray_session, tmp_path: Path):
    out = tmp_path / "breast"
    argv = ["--data", str(shared_npz("breastmnist.npz")), "--output", str(out), *TINY]
    argv += ["--set", "data.image_size=28", "--set", "cv.folds=2", "--set", "train.epochs=4"]
    argv += ["--set", "train.batch_size=32", "--set", "optim.lr=0.002", "--set", "train.amp=auto"]
    assert main(argv) == 0
    result = json.loads((out / "cv_result.json").read_text())
    assert len(result["folds"]) == 2
    assert result["data"]["num_images"] == 546 + 78  # train + val; test held back
    assert len(result["fold_assignment"]) == 546 + 78 and result["world_size"] == 1
    assert (out / "config.yaml").is_file()  # the resolved config, to run again
    assert result["mean_roc_auc"] > 0.65, result["mean_roc_auc"]
    assert result["wall_time_s"] > 0


def test_demo_config_is_learnable_but_not_trivial(ray_session, tmp_path: Path):
    demo = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
    # 2 folds instead of the config's 5 keep the suite fast; the epochs and model are the demo's.
    argv = ["--config", str(demo), "--output", str(tmp_path / "demo"), "--set", "cv.folds=2"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "demo" / "cv_result.json").read_text())
    assert result["data"]["classes"] == ["lesion", "normal"]
    assert 0.6 < result["mean_roc_auc"] < 0.99, result["mean_roc_auc"]


def test_multilabel_folds_train_through_ray_train(ray_session, tmp_path: Path):
    """Several findings per image (#32) through the Train worker: (N, L) targets with NaN
    (ignored uncertain labels) cross into Ray, each fold records every finding's AUC."""
    from test_multilabel_training import FINDINGS, generated_set

    from distmed.config import ExperimentConfig
    from distmed.cv import FoldPlan, cross_validate, fold_specs
    from distmed.resources import plan_workers
    from distmed.task import MultilabelTask

    images, raw = generated_set(112, seed=1)
    np.save(tmp_path / "pool.npy", images)
    task = MultilabelTask(FINDINGS)
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"weights": "none", "unfreeze": 1},
            "optim": {"lr": 0.003},
            "train": {"epochs": 2, "batch_size": 16, "amp": "off", "class_weights": "balanced"},
            "data": {"image_size": 16},
            "cv": {"folds": 2},
            "scaling": {"max_failures": 0},
        }
    )
    plan = FoldPlan(
        images_path=str(tmp_path / "pool.npy"),
        labels=task.targets(raw).tolist(),
        task=task,
        folds=fold_specs(np.arange(112) % 2, 2),
    )
    result = cross_validate(cfg, plan, plan_workers(cfg.scaling), tmp_path / "ray", "ml")
    means = result.mean_metrics()
    aucs = {name: means[f"roc_auc/{name}"] for name in FINDINGS}
    assert all(auc > 0.7 for auc in aucs.values()), aucs
    assert result.mean_roc_auc == pytest.approx(
        np.mean([f.metrics["roc_auc"] for f in result.folds])
    )
    oof_labels = np.concatenate([np.asarray(f.val_labels, dtype=float) for f in result.folds])
    assert np.isnan(oof_labels[:, 3]).sum() == np.isnan(task.targets(raw)[:, 3]).sum()


def test_a_streamed_pass_reads_in_windows_in_order_with_the_decoders_pixels(
    ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """#35: one epoch's rows are read as consecutive windows (one Ray Data dataset each, so
    the object store holds a window's index, not the epoch's), and the batches still come in
    the drawn order, full but the last, with each file's decoded pixels."""
    from conftest import write_image_folder

    from distmed.config import DataConfig
    from distmed.data import scan_source
    from distmed.data import stream as stream_module
    from distmed.data.stream import StreamSpec, decode_batch, epoch_positions, stream_batches

    root = write_image_folder(tmp_path / "d", {"a": 12, "b": 11}, size=20)
    data = DataConfig(root=str(root), image_size=16)
    paths = [str(p) for p in scan_source(data).pool.paths]
    spec = StreamSpec(paths=paths, options=data.decode_settings(), decode_cpus=0.5, window=7)
    built: list[list[int]] = []
    real = stream_module.stream_dataset

    def spy(spec: StreamSpec, positions: np.ndarray, decoder=decode_batch):
        built.append(np.asarray(positions).tolist())
        return real(spec, positions, decoder)

    monkeypatch.setattr(stream_module, "stream_dataset", spy)
    order = epoch_positions(np.arange(23), 5, 1, 0, 1, True)
    batches = list(stream_batches(spec, order, batch_size=3))
    assert [len(w) for w in built] == [6, 6, 6, 5]  # windows of 7 rows cut to whole batches
    assert sum(built, []) == order.tolist()
    assert [len(rows) for _, rows in batches] == [3] * 7 + [2]
    assert np.concatenate([rows.numpy() for _, rows in batches]).tolist() == order.tolist()
    expected = decode_batch(
        {"position": order, "path": np.array([paths[p] for p in order], dtype=object)},
        data.decode_settings().model_dump(mode="json"),
    )["image"]
    assert np.array_equal(np.concatenate([images.numpy() for images, _ in batches]), expected)

    # Published (the file list in an index file), a row is its position only: the decoding
    # task reads its files from the index, and the pixels are the same.
    def tagged(batch, options, index=None):
        keys = ",".join(sorted(batch))
        return {
            **decode_batch(batch, options, index),
            "keys": np.array([keys] * len(batch["position"])),
        }

    published = spec.published(str(tmp_path / "storage"))
    read = [
        rows
        for dataset in stream_module.window_datasets(published, order, 3, decoder=tagged)
        for rows in dataset.iter_batches(batch_size=None, batch_format="numpy")
    ]
    assert {key for rows in read for key in rows["keys"]} == {"position"}
    assert np.array_equal(np.concatenate([rows["image"] for rows in read]), expected)

    # The object refs this reader holds stay bounded however many windows it reads: Ray
    # Data's reference cycles kept every read window's blocks until a full collection
    # (#35's object store growing with the data set; ~2 refs a window were left here).
    monkeypatch.setattr(stream_module, "RELEASE_EVERY_S", 0.0)  # release after every window
    held = ray_session._private.worker.global_worker.core_worker.get_all_reference_counts
    before = len(held())
    narrow = spec.model_copy(update={"window": 3})
    assert len(list(stream_batches(narrow, np.arange(23), batch_size=3))) == 8  # 8 windows
    assert len(held()) - before <= 4, len(held()) - before


def test_a_streamed_file_that_cannot_be_decoded_ends_on_its_one_line(ray_session, tmp_path: Path):
    """#35 (a new user's try): the decoding task's UserError reaches the reader as itself,
    not as Ray Data's 'UDF failed to process a data block', so the CLI says which file."""
    from conftest import write_image_folder

    from distmed.config import DataConfig
    from distmed.data import scan_source
    from distmed.data.stream import StreamSpec, stream_batches
    from distmed.failures import user_error_cause

    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4}, size=20)
    (root / "a" / "broken.png").write_bytes(b"not a png")
    data = DataConfig(root=str(root), image_size=16)
    paths = [str(p) for p in scan_source(data).pool.paths] + [str(root / "a" / "broken.png")]
    spec = StreamSpec(paths=paths, options=data.decode_settings(), decode_cpus=0.5)
    with pytest.raises(Exception) as raised:
        list(stream_batches(spec, np.arange(len(paths)), batch_size=4))
    cause = user_error_cause(raised.value)
    assert cause is not None and "broken.png" in str(cause), repr(raised.value)[:500]
    assert "cannot decode" in str(cause)
