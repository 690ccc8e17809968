"""The streamed loader's pieces without Ray: the decoding map function against the cache, the
seeded epoch order, fold routing, and one shared pass training and scoring every fold.
(The streamed run on a multi-node cluster is in `test_faults_ray.py`.)"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image
from test_concurrent_ray import BUCKET, s3_server  # noqa: F401  (a fixture)
from test_gpu_path import fake_cluster  # noqa: F401  (a fixture)

from distmed import sharedpass
from distmed.config import DataConfig, ExperimentConfig, ScalingSection
from distmed.cv import fold_specs, held_out_images, make_folds, prepare_data, trained_channels
from distmed.data import build_cache, load_cached, scan_source
from distmed.data.stream import StreamSpec, decode_batch, decode_reserve, epoch_positions
from distmed.errors import UserError
from distmed.inference import InferenceModel, predict_cached, predict_streamed
from distmed.loop import FoldData, Runtime, build_fold
from distmed.model import build_model
from distmed.resources import concurrency_limit, plan_workers
from distmed.sharedpass import Routes, array_reader, run_shared_epoch
from distmed.task import BinaryTask

CPU = Runtime(torch.device("cpu"))


def _config(root: Path, size: int = 16, **data) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "data": {"root": str(root), "image_size": size, **data},
            "model": {"weights": "none"},
            "cv": {"folds": 3},
            "train": {"batch_size": 4, "epochs": 1, "amp": "off"},
        }
    )


def _streamed(cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    """(the pool decoded by the stream's map function, the cached pool) of one config."""
    index = scan_source(cfg.data)
    cached = load_cached(build_cache(index, cfg.data).pool_path)
    paths = np.array([str(p) for p in index.pool.paths], dtype=object)
    batch = {"position": np.arange(len(paths)), "path": paths}
    out = decode_batch(batch, cfg.data.decode_settings().model_dump(mode="json"))
    assert out["position"].tolist() == list(range(len(paths)))
    return out["image"], np.asarray(cached)


def _colour_folder(root: Path, suffix: str) -> Path:
    """Two classes of noisy RGB files (and one grey file, which a colour cache repeats)."""
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(root / name / f"img{i}{suffix}")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(root / "a" / "g.png")
    return root


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_streamed_colour_image_is_its_cached_twin_bit_for_bit(tmp_path: Path, suffix: str):
    root = _colour_folder(tmp_path / "rgb", suffix)
    streamed, cached = _streamed(_config(root, resize="pad"))
    assert cached.shape == streamed.shape == (9, 3, 16, 16)
    assert streamed.dtype == np.uint8
    np.testing.assert_array_equal(streamed, cached)


def test_a_streamed_grey_image_is_its_one_channel_cached_twin_repeated(tmp_path: Path):
    root = write_image_folder(tmp_path / "grey", {"a": 3, "b": 3}, size=24)
    streamed, cached = _streamed(_config(root))
    assert cached.shape == (6, 1, 16, 16) and streamed.shape == (6, 3, 16, 16)
    for channel in range(3):
        np.testing.assert_array_equal(streamed[:, channel], cached[:, 0])


def test_an_unreadable_file_in_a_stream_is_named(tmp_path: Path):
    root = write_image_folder(tmp_path / "d", {"a": 3, "b": 3}, size=24)
    broken = root / "a" / "broken.png"
    broken.write_bytes(b"not a png")
    batch = {"position": np.array([0]), "path": np.array([str(broken)], dtype=object)}
    options = _config(root).data.decode_settings().model_dump(mode="json")
    with pytest.raises(UserError, match="broken.png"):
        decode_batch(batch, options)


def test_an_object_this_node_cannot_read_is_one_line_naming_it_and_the_credentials(tmp_path):
    """A node without read access to the bucket (a new user's try: every task failed and Ray
    Train restarted the workers until it gave up, exit 1) stops at a UserError naming the
    object, this node and what to give it; here a file:// object gone since the listing."""
    root = write_image_folder(tmp_path / "d", {"a": 3, "b": 3}, size=24)
    gone = f"file://{root / 'a' / 'gone.png'}"
    batch = {"position": np.array([0]), "path": np.array([gone], dtype=object)}
    options = _config(root).data.decode_settings().model_dump(mode="json")
    with pytest.raises(UserError) as caught:
        decode_batch(batch, options)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and f"cannot read {gone} on node " in message
    assert "FileNotFoundError" in message and "credentials" in message


def test_epoch_order_is_seeded_split_evenly_over_ranks_and_validation_keeps_every_image():
    positions = np.arange(3, 26)  # 23 images
    shares = [epoch_positions(positions, 7, 2, rank, 3, True) for rank in range(3)]
    assert [len(s) for s in shares] == [7, 7, 7]  # 23 // 3, all ranks step together
    drawn = np.concatenate(shares)
    assert len(set(drawn.tolist())) == 21 and set(drawn.tolist()) <= set(positions.tolist())
    again = [epoch_positions(positions, 7, 2, rank, 3, True) for rank in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(shares, again, strict=True))
    assert not np.array_equal(shares[0], epoch_positions(positions, 7, 3, 0, 3, True))
    assert not np.array_equal(shares[0], epoch_positions(positions, 8, 2, 0, 3, True))
    val = [epoch_positions(positions, 7, 2, rank, 3, False) for rank in range(3)]
    assert sorted(np.concatenate(val).tolist()) == positions.tolist()


def test_routes_send_each_image_to_the_folds_it_trains_and_the_one_it_validates(tmp_path: Path):
    root = write_image_folder(tmp_path / "d", {"a": 9, "b": 9}, size=16)
    cfg = _config(root)
    index = scan_source(cfg.data)
    task = BinaryTask(tuple(index.class_names), 1)
    specs = fold_specs(make_folds(index.pool, cfg.cv, task), cfg.cv.folds)
    routes = Routes.of([(s["train"], s["val"]) for s in specs], len(index.pool))
    assert routes.val.sum(axis=0).tolist() == [1] * 18  # each image validates one fold
    assert routes.train.sum(axis=0).tolist() == [2] * 18  # and trains the k - 1 = 2 others
    assert not (routes.train & routes.val).any()
    assert routes.pass_batch_size(4) == 6  # a fold's 2/3 share of 6 is 4 images a step
    assert routes.steps_per_epoch(4, world=1) == 3 and routes.steps_per_epoch(4, world=2) == 2


def _position_images(count: int) -> np.ndarray:
    """Images whose every pixel is their own pool position: a batch tells which rows it has."""
    return np.repeat(np.arange(count, dtype=np.uint8), 16 * 16).reshape(count, 1, 16, 16)


def test_one_shared_pass_trains_each_fold_on_its_rows_only_and_scores_each_image_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    root = write_image_folder(tmp_path / "d", {"a": 12, "b": 12}, size=16)
    cfg = _config(root, loader="stream")
    prepared = prepare_data(cfg, scan_source(cfg.data))
    plan = prepared.plan
    assert prepared.cache is None and plan.stream is not None and plan.images_path == ""
    assert held_out_images(prepared) is None  # no test split here
    assert len(plan.stream.paths) == 24
    labels = np.asarray(plan.labels)
    routes = Routes.of([(f["train"], f["val"]) for f in plan.folds], len(labels))
    steps = routes.steps_per_epoch(4, 1)
    folds = [
        build_fold(FoldData(i, f["train"], f["val"], None, labels, plan.task), cfg, CPU, 4,
                   steps_per_epoch=steps)
        for i, f in enumerate(plan.folds)
    ]  # fmt: skip
    assert all(
        f.train_loader is None and f.val_count == len(s["val"])
        for f, s in zip(folds, plan.folds, strict=True)
    )
    seen: dict[int, list[int]] = {f.index: [] for f in folds}
    real_step = sharedpass.train_step

    def spy(fold, images, batch_labels, runtime):
        rows = images[:, 0, 0, 0].tolist()
        seen[fold.index] += rows
        assert batch_labels.tolist() == labels[rows].tolist()
        return real_step(fold, images, batch_labels, runtime)

    monkeypatch.setattr(sharedpass, "train_step", spy)
    read = array_reader(_position_images(24), routes.pass_batch_size(4))
    run_shared_epoch(folds, 0, cfg, CPU, routes, torch.from_numpy(labels), read)
    for fold, spec in zip(folds, plan.folds, strict=True):
        assert set(seen[fold.index]) <= set(spec["train"])  # never a validation image
        assert len(seen[fold.index]) == len(set(seen[fold.index]))  # each at most once
        assert len(seen[fold.index]) >= len(spec["train"]) - 1  # a skipped share at most
        assert fold.val_indices.tolist() == sorted(spec["val"])  # every image scored once
        assert fold.val_labels.tolist() == labels[sorted(spec["val"])].tolist()
        record = fold.history[-1]
        assert record["epoch"] == 1 and record["val_num_samples"] == len(spec["val"])
    assert len(steps_taken := [len(v) for v in seen.values()]) == 3 and min(steps_taken) > 0


def test_a_folder_behind_a_uri_is_listed_not_read_and_streams_like_its_local_twin(tmp_path: Path):
    """A bucket's listing and reads through pyarrow, here with its file:// filesystem (the
    S3 protocol through a moto server is in test_faults_ray.py)."""
    root = write_image_folder(tmp_path / "b" / "train", {"neg": 6, "pos": 6}, size=24)
    write_image_folder(tmp_path / "b" / "test", {"neg": 1, "pos": 1}, size=24)
    (root / "neg" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "stray.png").write_bytes(b"outside the layout")
    uri = f"file://{tmp_path / 'b'}"
    cfg = _config(uri, loader="stream", group_regex=r"(p\d+)_")
    index = scan_source(cfg.data)
    assert index.class_names == ["neg", "pos"] and index.pool.paths is None
    assert len(index.pool) == 12 and len(index.test) == 2
    assert index.pool.ids[0] == "train/neg/p00_img00.png"
    assert all(u.startswith("file://") for u in index.pool.uris)
    assert index.pool.groups.tolist()[:3] == ["p00", "p00", "p01"]
    prepared = prepare_data(cfg, index)
    assert prepared.plan.stream.paths == index.pool.uris
    positions = np.arange(len(index.pool))
    batch = {"position": positions, "path": np.array(index.pool.uris, dtype=object)}
    options = cfg.data.decode_settings().model_dump(mode="json")
    local = {"position": positions, "path": np.array([u[7:] for u in index.pool.uris])}
    np.testing.assert_array_equal(
        decode_batch(batch, options)["image"], decode_batch(local, options)["image"]
    )
    again = scan_source(cfg.data)
    (root / "pos" / "p02_img04.png").write_bytes((root / "pos" / "p00_img00.png").read_bytes())
    assert scan_source(cfg.data).fingerprint != again.fingerprint  # an object changed
    cached = prepare_data(_config(uri, cache_dir=str(tmp_path / "c")), index)  # the cache too
    streamed = decode_batch(local, options)["image"]
    np.testing.assert_array_equal(np.load(cached.cache.pool_path)[:, 0], streamed[:, 0])


def test_images_in_an_s3_bucket_train_every_fold_without_a_local_copy(
    s3_server,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """A real S3 protocol server (moto): the bucket is listed, each file is read by the
    stream's decoding function (here called in-process, as a Ray Data task would call it on
    a node) through pyarrow with the credentials in the environment, and one shared epoch
    trains and scores every fold. No image is ever written below tmp_path."""
    client, env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    local = write_image_folder(tmp_path / "src", {"neg": 6, "pos": 6}, size=20)
    for path in sorted(local.rglob("*.png")):
        client.upload_file(str(path), BUCKET, f"data/{path.relative_to(local)}")
    shutil.rmtree(local)
    cfg = _config(f"s3://{BUCKET}/data", loader="stream")
    index = scan_source(cfg.data)
    assert index.class_names == ["neg", "pos"] and len(index.pool) == 12
    assert index.pool.uris[0] == f"s3://{BUCKET}/data/neg/p00_img00.png"
    plan = prepare_data(cfg, index).plan
    options = cfg.data.decode_settings().model_dump(mode="json")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))  # the node's copy
    (tmp_path / "node-tmp").mkdir()
    stream = plan.stream.published(f"s3://{BUCKET}/runs/r1")  # the file list in the bucket
    assert stream.paths is None and stream.index.startswith(f"s3://{BUCKET}/runs/r1/")

    def read(order: np.ndarray):  # the streamed reader's batches, without Ray Data
        for start in range(0, len(order), 6):
            rows = order[start : start + 6]
            paths = np.array(stream.files(rows), dtype=object)
            out = decode_batch({"position": rows, "path": paths}, options)
            yield torch.from_numpy(out["image"]), torch.from_numpy(out["position"])

    labels = np.asarray(plan.labels)
    routes = Routes.of([(f["train"], f["val"]) for f in plan.folds], len(labels))
    folds = [
        build_fold(FoldData(i, f["train"], f["val"], None, labels, plan.task), cfg, CPU, 4,
                   steps_per_epoch=routes.steps_per_epoch(4, 1))
        for i, f in enumerate(plan.folds)
    ]  # fmt: skip
    run_shared_epoch(folds, 0, cfg, CPU, routes, torch.from_numpy(labels), read)
    for fold, spec in zip(folds, plan.folds, strict=True):
        assert fold.val_indices.tolist() == sorted(spec["val"])
        assert np.isfinite(fold.history[-1]["train_loss"])
    assert not list(tmp_path.rglob("*.png"))  # nothing downloaded to keep
    assert [p.name for p in (tmp_path / "node-tmp" / "distmed-stream-index").iterdir()] == [
        stream.index.rsplit("/", 1)[1]
    ]  # the index, copied once to the node


def test_a_published_stream_sends_the_same_bytes_into_ray_whatever_the_pool_s_size(
    tmp_path: Path,
):
    """#35: the file list goes to an index file in the run's storage; what crosses into Ray
    (the pickled spec) no longer grows with the number of images, and the files read back
    at any positions, in their order, are the scanned ones."""
    options = DataConfig(root=str(tmp_path), image_size=16).decode_settings()
    sizes = {}
    for count in (50, 5000):
        paths = [f"/data/set-{count}/class-{i % 3}/image-{i:06d}.png" for i in range(count)]
        spec = StreamSpec(paths=paths, options=options)
        published = spec.published(str(tmp_path / "storage"))
        assert published.paths is None and published.rows == count == spec.rows
        sizes[count] = len(pickle.dumps(published))
        order = np.random.default_rng(count).permutation(count)[:40]
        assert published.files(order) == [paths[p] for p in order] == spec.files(order)
    assert abs(sizes[5000] - sizes[50]) <= 8, sizes  # the name's count: 2 more digits
    files = sorted((tmp_path / "storage" / "stream-index").iterdir())
    assert len(files) == 2 and all(not f.name.startswith(".") for f in files)


def test_a_stream_index_is_written_once_per_file_list_and_refuses_a_foreign_position(
    tmp_path: Path,
):
    options = DataConfig(root=str(tmp_path), image_size=16).decode_settings()
    spec = StreamSpec(paths=["a.png", "b.png", "c.png"], options=options)
    first = spec.published(str(tmp_path))
    stamp = Path(first.index).stat().st_mtime_ns
    again = spec.published(str(tmp_path))  # a second trial, a resume: the same file, kept
    assert again.index == first.index and Path(first.index).stat().st_mtime_ns == stamp
    other = StreamSpec(paths=["a.png", "c.png", "b.png"], options=options).published(str(tmp_path))
    assert other.index != first.index  # another order is another index
    assert again.published(str(tmp_path / "elsewhere")) == again  # published stays put
    with pytest.raises(IndexError, match="outside the stream index"):
        first.files(np.array([3]))
    with pytest.raises(ValueError, match="either paths or an index"):
        StreamSpec(options=options)
    with pytest.raises(ValueError, match="either paths or an index"):
        StreamSpec(paths=["a.png"], index=first.index, options=options)


def _split_folder(root: Path) -> Path:
    write_image_folder(root / "train", {"neg": 6, "pos": 6}, size=16)
    return write_image_folder(root / "test", {"neg": 3, "pos": 4}, size=16, seed=1).parent


def test_a_streamed_test_split_is_scored_once_per_image_in_the_caches_order(tmp_path: Path):
    """The test split of a streamed search: its files as a stream (no cache is built), each
    image predicted once however the batches arrive, in the cached path's order, with the
    cached path's labels and probabilities; a stream that repeats a row is refused."""
    root = _split_folder(tmp_path / "d")
    streamed = prepare_data(_config(root, loader="stream"), scan_source(_config(root).data))
    cached = prepare_data(_config(root), scan_source(_config(root).data))
    spec = held_out_images(streamed)
    assert isinstance(spec, StreamSpec) and len(spec.paths) == 7
    assert spec.paths == [str(p) for p in cached.index.test.paths]  # the cache's order
    assert trained_channels(streamed) == 3 and trained_channels(cached) == 1
    options = spec.options.model_dump(mode="json")
    rows = decode_batch({"position": np.arange(7), "path": np.array(spec.paths)}, options)
    images = rows["image"]  # the streamed rows, decoded by the Ray Data map function

    def shuffled(order: np.ndarray):  # batches of 3, 1, 3 in a scrambled order
        order = np.asarray(order)[[4, 0, 6, 2, 1, 5, 3]]
        for part in (order[:3], order[3:4], order[4:]):
            yield torch.from_numpy(images[part]), torch.from_numpy(part)

    torch.manual_seed(0)
    model = InferenceModel([build_model(_config(root).model, 2)]).eval()
    labels = streamed.plan.task.targets(streamed.index.test.labels)
    task, device = streamed.plan.task, torch.device("cpu")
    truth, probs = predict_streamed(model, spec, task, device, labels, read=shuffled)
    cache_truth, cache_probs = predict_cached(model, cached.cache.test_path, task, device, labels)
    assert truth.tolist() == cache_truth.tolist() == labels.tolist()
    np.testing.assert_allclose(probs, cache_probs, atol=1e-5)  # grey x 3 = the 1-channel row

    def repeated(order: np.ndarray):
        order = np.asarray(order)
        yield torch.from_numpy(images[order]), torch.from_numpy(order)
        yield torch.from_numpy(images[order[:1]]), torch.from_numpy(order[:1])

    with pytest.raises(RuntimeError, match="8 rows for 7 images"):
        predict_streamed(model, spec, task, device, labels, read=repeated)


def test_a_streamed_refit_trains_one_model_on_every_image_and_validates_none(tmp_path: Path):
    """The refit's plan (one fold, every pool image, no validation images) through the
    shared pass: every image trains it once per epoch, no validation pass runs."""
    root = write_image_folder(tmp_path / "d", {"a": 8, "b": 8}, size=16)
    cfg = _config(root, loader="stream")
    plan = prepare_data(cfg, scan_source(cfg.data)).plan
    everything = sorted(set(plan.folds[0]["train"]) | set(plan.folds[0]["val"]))
    labels = np.asarray(plan.labels)
    routes = Routes.of([(everything, [])], len(labels))
    assert routes.pass_batch_size(4) == 4  # one fold: the pass's batch is the fold's
    fold = build_fold(
        FoldData(0, everything, [], None, labels, plan.task), cfg, CPU, 4,
        steps_per_epoch=routes.steps_per_epoch(4, 1),
    )  # fmt: skip
    read_positions: list[list[int]] = []
    reader = array_reader(_position_images(16), 4)

    def read(order: np.ndarray):
        read_positions.append(np.asarray(order).tolist())
        return reader(order)

    run_shared_epoch([fold], 0, cfg, CPU, routes, torch.from_numpy(labels), read)
    assert len(read_positions) == 1  # the training pass only
    assert sorted(read_positions[0]) == everything == list(range(16))
    record = fold.history[-1]
    assert record["epoch"] == 1 and np.isfinite(record["train_loss"])
    assert not any(key.startswith("val_") for key in record)


def test_a_streamed_run_keeps_one_decoding_task_s_cpus_out_of_the_workers_reach(
    fake_cluster,  # noqa: F811  (the fixture imported above)
):
    """Workers that held every CPU would wait forever for rows no task can decode: a
    streamed run, search or refit leaves `data.stream_decode_cpus` out; the cache nothing."""
    stream = DataConfig(loader="stream", stream_decode_cpus=1.5)
    assert decode_reserve(stream) == 1.5 and decode_reserve(DataConfig()) == 0.0
    fake_cluster([{"CPU": 4}])
    two = ScalingSection(num_workers=2)
    assert plan_workers(two).cpus_per_worker == 2.0
    assert plan_workers(two, reserve_cpus=decode_reserve(stream)).cpus_per_worker == 1.25
    one = ScalingSection(num_workers=1, cpus_per_worker=1)
    assert concurrency_limit(8, 8, one) == 3  # 4 CPUs // 1.01 (a trial's own sliver)
    assert concurrency_limit(8, 8, one, decode_reserve(stream)) == 2  # 2.5 // 1.01


def test_the_report_of_a_streamed_test_split_says_why_it_has_no_gradcam(tmp_path: Path):
    """No decoded copy of a streamed test split is kept (`evaluate_test` saves "" as its
    images): the report says so instead of looking for a cache file."""
    from types import SimpleNamespace

    from distmed import runreport

    run = SimpleNamespace(test={"images_path": np.array("")})
    section = runreport.gradcam_section(run, tmp_path, None)  # type: ignore[arg-type]
    assert "streamed (data.loader: stream)" in section and "Grad-CAM skipped" in section


def test_read_ahead_keeps_the_order_and_raises_the_producers_error_in_its_place():
    from distmed.data.stream import read_ahead

    assert list(read_ahead(iter(range(10)), depth=3)) == list(range(10))

    def failing():
        yield from (1, 2)
        raise UserError("cannot decode x.png")

    seen = []
    with pytest.raises(UserError, match="x.png"):
        for item in read_ahead(failing(), depth=4):
            seen.append(item)
    assert seen == [1, 2]


def test_a_reader_that_stops_early_stops_and_closes_the_source():
    import threading

    from distmed.data.stream import read_ahead

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()  # a Ray Data iteration ends here

    reader = read_ahead(endless(), depth=2)
    assert [next(reader) for _ in range(5)] == [0, 1, 2, 3, 4]
    reader.close()
    assert closed.wait(timeout=5)


@pytest.mark.parametrize(("window", "batch", "rows"), [(2048, 64, 2048), (2048, 48, 2016),
                                                       (100, 256, 256), (7, 3, 6)])  # fmt: skip
def test_a_window_is_whole_batches_and_at_least_one(window: int, batch: int, rows: int):
    from distmed.data.stream import window_rows

    assert window_rows(window, batch) == rows


@pytest.mark.parametrize(
    ("nodes", "trials", "decode"),
    [([2, 2, 2], 3, 1.0), ([2, 2, 2], 2, 1.0), ([4, 2], 3, 0.5), ([8, 8, 8, 8], 4, 1.0),
     ([3, 3], 1, 1.5), ([16], 2, 1.0)],
)  # fmt: skip
def test_however_ray_places_a_streamed_search_some_node_keeps_a_decoding_task_s_cpus(
    fake_cluster,  # noqa: F811  (the fixture imported above)
    nodes: list[int],
    trials: int,
    decode: float,
):
    """#35: the workers and trial drivers of a streamed search never leave every node short
    of one decoding task's CPUs, whichever node Ray puts each of them on (all placements
    tried), else the stream waits forever (3 trials on 3 x 2 CPUs did, at 1.65 a worker)."""
    import itertools

    from distmed.resources import TRIAL_CPU

    fake_cluster([{"CPU": float(n)} for n in nodes])
    one = ScalingSection(num_workers=1)
    concurrent = concurrency_limit(trials, trials, one, decode)
    each = plan_workers(one, concurrent=concurrent, reserve_cpus=decode).cpus_per_worker
    assert concurrent >= 1 and each > 0
    # Each of the trials' workers and drivers on any node with room for it.
    for places in itertools.product(range(len(nodes)), repeat=2 * concurrent):
        free = [float(n) for n in nodes]
        for slot, node in enumerate(places):
            free[node] -= each if slot < concurrent else TRIAL_CPU
        if min(free) < -1e-9:
            continue  # Ray would not put it there
        assert max(free) >= decode - 1e-9, (places, free)


def test_ray_data_s_lines_about_streamed_datasets_are_dropped_and_no_others():
    """A rank reads ~25 windows a pass: Ray Data's start and 'finished' lines for each would
    flood the console. Only ours go, and never a warning."""
    import logging

    from distmed._ray_compat import RAY_DATA_EXECUTOR_LOGGER
    from distmed.data.stream import quiet_stream_logs

    executor = logging.getLogger(RAY_DATA_EXECUTOR_LOGGER)
    quiet_stream_logs()
    quiet_stream_logs()  # once is enough; twice adds nothing
    assert [type(f).__name__ for f in executor.filters].count("_WithoutStreamDatasets") == 1

    def kept(level: int, message: str) -> bool:
        record = executor.makeRecord(executor.name, level, __file__, 1, message, (), None)
        return executor.filter(record)

    ours = "Dataset distmed_stream_a1b2_0 execution finished in 5.38 seconds"
    assert not kept(logging.INFO, ours)
    assert kept(logging.WARNING, ours)
    assert kept(logging.INFO, "Dataset dataset_a1b2_0 execution finished in 5.38 seconds")


def test_a_decoding_reserve_that_leaves_the_workers_no_cpu_is_one_line(
    fake_cluster,  # noqa: F811  (the fixture imported above)
):
    """stream_decode_cpus as large as a node: the workers would get an empty share, which Ray
    refuses with a traceback from inside its controller (a new user's try)."""
    fake_cluster([{"CPU": 2.0}])
    with pytest.raises(UserError, match=r"stream_decode_cpus=2 .* nodes of 2 CPUs; lower it"):
        plan_workers(ScalingSection(num_workers=1), reserve_cpus=2.0)
    assert plan_workers(ScalingSection(num_workers=1), reserve_cpus=0.5).cpus_per_worker == 1.5


def test_a_streamed_run_stops_on_files_the_inspection_cannot_read_before_ray(tmp_path: Path):
    """A truncated PNG (its header reads) stopped a streamed run only once a decoding task
    reached it inside a Train worker; the inspection has read it already, so the run stops
    before Ray, naming it (the cache leaves it out only when asked, data.skip_invalid)."""
    from distmed import pipeline

    root = write_image_folder(tmp_path / "d", {"a": 6, "b": 6}, size=20)
    broken = sorted((root / "a").glob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(UserError, match=r"1 image file\(s\) in .* cannot be read, e\.g\. a/"):
        pipeline.prepare(_config(root, loader="stream"))
    cfg = _config(root, skip_invalid=True, cache_dir=str(tmp_path / "c"))
    assert len(pipeline.prepare(cfg).data.index.pool) == 11  # the cache, asked, leaves it out


def test_a_streamed_fit_s_labels_and_folds_cross_into_ray_as_a_file(tmp_path: Path):
    """#35: what a streamed fit's workers receive (the train loop's config) no longer grows
    with the images: labels and fold lists (~17 bytes an image for 5 folds) are an .npz in
    the run's storage, read back on the worker's side into the same WorkerConfig."""
    from distmed.data.streamindex import read_plan_arrays, write_plan_arrays
    from distmed.worker import FoldIndices, WorkerConfig

    cfg = _config(tmp_path)
    options = cfg.data.decode_settings()
    sizes = {}
    for count in (60, 6000):
        labels = (np.arange(count) % 2).tolist()
        folds = fold_specs(np.arange(count) % 3, 3) + [{"train": list(range(count)), "val": None}]
        paths = [f"/d/{i}.png" for i in range(count)]
        stream = StreamSpec(paths=paths, options=options).published(str(tmp_path))
        common = {"config": cfg, "images_path": "", "task": BinaryTask(("a", "b"), 1)}
        common |= {"threads": 1, "stream": stream}
        location = write_plan_arrays(labels, folds, str(tmp_path))
        sent = WorkerConfig(labels=[], folds=[], plan_arrays=location, **common).to_loop_config()
        sizes[count] = len(pickle.dumps(sent))
        direct = WorkerConfig(labels=labels, folds=[FoldIndices(**f) for f in folds], **common)
        received = WorkerConfig.from_loop_config(sent)
        assert received.labels == direct.labels and received.folds == direct.folds
        assert received.folds[-1].val is None and received.folds[0].val == folds[0]["val"]
        assert write_plan_arrays(labels, folds, str(tmp_path)) == location  # written once
    assert abs(sizes[6000] - sizes[60]) <= 16, sizes
    assert read_plan_arrays(location)[0] == (np.arange(6000) % 2).tolist()
