"""The decoded cache of images in a bucket (`data.loader: cache` with an s3:// root), on a real
S3 protocol server (moto): each object is read once per version, so an unchanged bucket is
not read again and a changed object is the only one read and decoded again. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image
from test_concurrent_ray import BUCKET, s3_server  # noqa: F401  (a fixture)

from distmed.config import ExperimentConfig
from distmed.cv import prepare_data
from distmed.data import objects, scan_source
from distmed.data.cache import remove_stale_temporaries
from distmed.errors import UserError
from distmed.searchfile import IMAGES_KEY, check_same_images, images_hash


def _config(root: str, cache: Path) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            # One decoding process: the reads below are counted in this one.
            "data": {"root": root, "image_size": 16, "cache_dir": str(cache), "decode_workers": 1},
            "model": {"weights": "none"},
            "cv": {"folds": 2},
            "train": {"batch_size": 4},
        }
    )


def test_a_bucket_is_cached_by_object_version_and_only_a_changed_object_is_read_again(
    s3_server,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    client, env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "src"
    write_image_folder(local / "train", {"neg": 5, "pos": 5}, size=20)
    write_image_folder(local / "test", {"neg": 2, "pos": 2}, size=20, seed=3)
    local_cfg = _config(str(local), tmp_path / "local-cache")
    twin = prepare_data(local_cfg, scan_source(local_cfg.data))
    for path in sorted(local.rglob("*.png")):
        client.upload_file(str(path), BUCKET, f"data/{path.relative_to(local)}")
    reads: list[str] = []
    real_read = objects.readable_file

    def counted(path: str):
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(objects, "readable_file", counted)
    cfg = _config(f"s3://{BUCKET}/data", tmp_path / "cache")

    first = prepare_data(cfg, scan_source(cfg.data))
    assert sorted(reads) == sorted(first.index.pool.uris + first.index.test.uris)  # once each
    assert len(reads) == 14
    pool = np.load(first.cache.pool_path)
    np.testing.assert_array_equal(pool, np.load(twin.cache.pool_path))  # the local twin's
    np.testing.assert_array_equal(np.load(first.cache.test_path), np.load(twin.cache.test_path))
    assert first.plan.folds == twin.plan.folds and first.plan.stream is None

    reads.clear()
    again = prepare_data(cfg, scan_source(cfg.data))  # unchanged: a hit, nothing read
    assert reads == [] and again.cache.pool_path == first.cache.pool_path

    changed = "data/train/pos/p01_img03.png"  # rewritten, as a new upload would, bigger
    rewritten = np.full((40, 40), 7, dtype=np.uint8)
    Image.fromarray(rewritten, "L").save(tmp_path / "new.png")
    before = images_hash(again.index)
    client.upload_file(str(tmp_path / "new.png"), BUCKET, changed)
    reads.clear()
    third = prepare_data(cfg, scan_source(cfg.data))
    # A search started on the bucket before the rewrite is not resumed on it.
    with pytest.raises(UserError, match="other images .*object times"):
        check_same_images("s3://exp", {IMAGES_KEY: before}, third.index)
    assert reads == [f"s3://{BUCKET}/{changed}"]  # only the changed object
    assert third.cache.pool_path != first.cache.pool_path  # a new version of the bucket
    row = third.index.pool.uris.index(f"s3://{BUCKET}/{changed}")
    now = np.load(third.cache.pool_path)
    assert (now[row] == 7).all()  # the new pixels, decoded
    others = np.arange(len(now)) != row
    np.testing.assert_array_equal(now[others], pool[others])


def test_an_unfinished_decoded_object_of_a_killed_run_is_removed(tmp_path: Path):
    """A decoded object is written whole or not at all; what a killed writer left behind is
    swept with the cache's other temporaries."""
    store = tmp_path / "objects" / "16px-abc"
    store.mkdir(parents=True)
    kept = objects.stored_row_path(store, "s3://b/x.png", objects.object_version(10, 5))
    (store / f".{kept.name}.tmp999999999").write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == 1 and not list(store.iterdir())


def test_the_inspector_reads_a_bucket_and_names_an_unreadable_object(
    s3_server,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """`python -m distmed.data s3://...`: every object is read (through a temporary local
    copy) and surveyed as a local file is; a broken object is listed by name with its reason.
    It stopped with a bare AssertionError (the survey read only local paths)."""
    from distmed.data.__main__ import main as inspect_main

    client, env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DISTMED_CACHE", str(tmp_path / "cache"))
    local = write_image_folder(tmp_path / "src", {"neg": 3, "pos": 3}, size=20)
    for path in sorted(local.rglob("*.png")):
        client.upload_file(str(path), BUCKET, f"inspect/{path.relative_to(local)}")
    client.put_object(Bucket=BUCKET, Key="inspect/pos/broken.png", Body=b"not a png at all")
    out = tmp_path / "summary.json"
    status = inspect_main([f"s3://{BUCKET}/inspect", "--json", str(out)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    summary = json.loads(out.read_text())
    assert summary["images"]["formats"] == {"PNG": 6}
    assert summary["images"]["sizes"] == {"20x20": 6}
    unreadable = summary["unreadable"]
    [listed] = unreadable["first"]
    assert unreadable["count"] == 1 and listed.startswith("pos/broken.png (")
    assert "cannot identify image" in listed
    assert "distmed-object-" not in listed  # the temporary local copy is not the file's name
    assert "broken.png" in printed.out and "AssertionError" not in printed.out + printed.err
