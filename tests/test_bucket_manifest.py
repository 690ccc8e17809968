"""Labels sheets and buckets (issue #35): a local sheet whose paths are `s3://` URIs, and a
sheet kept in the bucket itself (relative paths under its prefix), indexed as objects
(`Split.uris` + versions) with the labels, groups, splits and findings a sheet of local files
gets; missing objects and sheets mixing files and objects stop in one line. On a real S3
protocol server (moto); no Ray.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from test_concurrent_ray import BUCKET, s3_server  # noqa: F401  (a fixture)

from distmed.config import ExperimentConfig
from distmed.cv import prepare_data
from distmed.data import remote, scan_source
from distmed.data.remote import bucket_summary
from distmed.errors import UserError
from distmed.evaluate import concat_splits
from distmed.searchfile import images_hash


def _config(cache: Path, **data) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "data": {"image_size": 16, "cache_dir": str(cache), "decode_workers": 1, **data},
            "model": {"weights": "none"},
            "cv": {"folds": 2},
            "train": {"batch_size": 4},
        }
    )


def _images(root: Path) -> list[tuple[str, str, str, str]]:
    """(relative path, label, patient, split) of 10 train and 4 test images under `root`."""
    write_image_folder(root / "train", {"neg": 5, "pos": 5}, size=20)
    write_image_folder(root / "test", {"neg": 2, "pos": 2}, size=20, seed=3)
    rows = []
    for path in sorted(root.rglob("*.png"), key=lambda p: (p.parent.parent.name != "train", p)):
        relative = path.relative_to(root)
        split, label = relative.parts[0], relative.parts[1]
        rows.append((relative.as_posix(), label, f"{split}-{path.name[:3]}", split))
    return rows


def _write_sheet(path: Path, header: list[str], rows: list, delimiter: str = ",") -> Path:
    with path.open("w", newline="") as out:
        writer = csv.writer(out, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _upload(client, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*.png")):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")


@pytest.fixture
def bucket(s3_server, monkeypatch: pytest.MonkeyPatch):  # noqa: F811  (the fixture above)
    client, env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return client


def test_a_local_sheet_of_uris_is_indexed_and_cached_like_its_local_twin(
    bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    local = tmp_path / "src"
    rows = _images(local)
    _upload(bucket, local, "data")
    header = ["path", "label", "group", "split"]
    twin_sheet = _write_sheet(tmp_path / "twin.csv", header, [(f"src/{p}", *r) for p, *r in rows])
    uri_rows = [(f"s3://{BUCKET}/data/{p}", *r) for p, *r in rows]
    sheet = _write_sheet(tmp_path / "objects.csv", header, uri_rows)

    twin_cfg = _config(tmp_path / "local-cache", manifest=str(twin_sheet))
    twin = prepare_data(twin_cfg, scan_source(twin_cfg.data))
    cfg = _config(tmp_path / "cache", manifest=str(sheet))
    index = scan_source(cfg.data)

    assert index.pool.paths is None and index.pool.uris == [r[0] for r in uri_rows[:10]]
    assert index.pool.ids == index.pool.uris  # the URI as written is the sample id
    assert index.test is not None and index.test.uris == [r[0] for r in uri_rows[10:]]
    for ours, theirs in ((index.pool, twin.index.pool), (index.test, twin.index.test)):
        assert ours.versions is not None and len(ours.versions) == len(ours)
        np.testing.assert_array_equal(ours.labels, theirs.labels)
        assert ours.groups is not None and list(ours.groups) == list(theirs.groups)
        assert list(ours.origins) == list(theirs.origins)
    assert index.class_names == ["neg", "pos"]
    assert bucket_summary(index)["per_class"] == {"neg": 5, "pos": 5}
    # `distmed evaluate --split all` scores pool and test together: still objects.
    both = concat_splits([index.pool, index.test])
    assert both.uris == index.pool.uris + index.test.uris
    assert both.versions == index.pool.versions + index.test.versions

    # Listing the common prefix finds what one request per object finds.
    monkeypatch.setattr(remote, "LOOKUP_ONE_BY_ONE", 0)
    listed = scan_source(cfg.data)
    assert listed.pool.versions == index.pool.versions
    assert images_hash(listed) == images_hash(index)

    prepared = prepare_data(cfg, index)  # data.loader: cache, decoded from the objects
    np.testing.assert_array_equal(np.load(prepared.cache.pool_path), np.load(twin.cache.pool_path))
    np.testing.assert_array_equal(np.load(prepared.cache.test_path), np.load(twin.cache.test_path))
    assert prepared.plan.folds == twin.plan.folds  # the same patients, the same folds

    stream_cfg = _config(tmp_path / "cache", manifest=str(sheet), loader="stream")
    streamed = prepare_data(stream_cfg, scan_source(stream_cfg.data))
    assert streamed.plan.stream is not None and streamed.plan.stream.paths == index.pool.uris
    assert streamed.test_stream is not None and streamed.test_stream.paths == index.test.uris

    # A rewritten object is other images: a resumed search would see it.
    bucket.put_object(Bucket=BUCKET, Key=f"data/{rows[0][0]}", Body=b"x" * 5000)
    assert images_hash(scan_source(cfg.data)) != images_hash(index)


def test_a_sheet_in_the_bucket_names_objects_relative_to_its_prefix(bucket, tmp_path: Path):
    local = tmp_path / "src"
    rows = _images(local)
    _upload(bucket, local, "sets/cxr")
    # European Excel: ';'-separated; the Windows export's backslashes; one path via `..`.
    written = [(p.replace("/", "\\"), *r) for p, *r in rows]
    written[0] = (f"../cxr/{rows[0][0]}", *rows[0][1:])
    sheet = _write_sheet(tmp_path / "labels.csv", ["path", "label", "group", "split"], written, ";")
    bucket.upload_file(str(sheet), BUCKET, "sets/cxr/labels.csv")

    for data in ({"root": f"s3://{BUCKET}/sets/cxr/labels.csv"},
                 {"manifest": f"s3://{BUCKET}/sets/cxr/labels.csv"}):  # fmt: skip
        index = scan_source(_config(tmp_path / "cache", **data).data)
        expected = [f"s3://{BUCKET}/sets/cxr/{p}" for p, *_ in rows]
        assert index.pool.uris == expected[:10] and index.test.uris == expected[10:]
        assert index.pool.ids == [w[0] for w in written[:10]]  # as written
        assert list(index.pool.groups) == [r[2] for r in rows[:10]]
        assert set(index.test.origins) == {"test"} and set(index.pool.origins) == {"train"}
        assert index.name == "labels" and "';'-separated" in index.layout

    # CheXpert's paths start with the sheet's folder name: found from the prefix above.
    chexpert = [(f"cxr/{p}", label) for p, label, *_ in rows]
    sheet = _write_sheet(tmp_path / "chexpert.csv", ["path", "label"], chexpert)
    bucket.upload_file(str(sheet), BUCKET, "sets/cxr/chexpert.csv")
    index = scan_source(
        _config(tmp_path / "cache", root=f"s3://{BUCKET}/sets/cxr/chexpert.csv").data
    )
    assert index.pool.uris == expected and index.pool.ids == [c[0] for c in chexpert]

    # Several findings per image: the finding columns of a sheet in the bucket.
    findings = [(p, int(label == "pos"), i % 2) for i, (p, label, *_) in enumerate(rows)]
    sheet = _write_sheet(tmp_path / "findings.csv", ["path", "Effusion", "Edema"], findings)
    bucket.upload_file(str(sheet), BUCKET, "sets/cxr/findings.csv")
    cfg = _config(
        tmp_path / "cache", root=f"s3://{BUCKET}/sets/cxr/findings.csv", task="multilabel"
    )
    index = scan_source(cfg.data)
    assert index.multilabel and index.class_names == ["Effusion", "Edema"]
    np.testing.assert_array_equal(index.pool.labels, np.array([f[1:] for f in findings]))
    assert index.pool.uris == [f"s3://{BUCKET}/sets/cxr/{p}" for p, *_ in rows]
    assert bucket_summary(index)["per_class"] == {"Effusion": 7, "Edema": 7}  # positives


def test_a_missing_object_is_named_with_its_row(
    bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    local = tmp_path / "src"
    rows = _images(local)
    _upload(bucket, local, "data")
    header = ["path", "label"]
    relative = [(p, label) for p, label, *_ in rows]
    relative[3] = ("train/neg/gone.png", "neg")
    sheet = _write_sheet(tmp_path / "labels.csv", header, relative)
    bucket.upload_file(str(sheet), BUCKET, "data/labels.csv")
    cfg = _config(tmp_path / "cache", root=f"s3://{BUCKET}/data/labels.csv")
    with pytest.raises(UserError, match=(
        rf"^data.manifest s3://{BUCKET}/data/labels.csv row 5: no such object "
        rf"s3://{BUCKET}/data/train/neg/gone.png \(paths are relative to the sheet's prefix"
    )):  # fmt: skip
        scan_source(cfg.data)

    # A local sheet of URIs, looked up by listing their common prefix.
    monkeypatch.setattr(remote, "LOOKUP_ONE_BY_ONE", 0)
    uris = [(f"s3://{BUCKET}/data/{p}", label) for p, label, *_ in rows]
    uris[12] = (f"s3://{BUCKET}/data/test/pos/p09_img99.png", "pos")
    local_sheet = _write_sheet(tmp_path / "uris.csv", header, uris)
    cfg = _config(tmp_path / "cache", manifest=str(local_sheet))
    with pytest.raises(
        UserError,
        match=rf"uris.csv row 14: no such object s3://{BUCKET}/data/test/pos/p09_img99.png; fix",
    ):
        scan_source(cfg.data)

    outside = _write_sheet(tmp_path / "out.csv", header, [("../../x.png", "neg"), *relative[:3]])
    bucket.upload_file(str(outside), BUCKET, "data/out.csv")
    cfg = _config(tmp_path / "cache", root=f"s3://{BUCKET}/data/out.csv")
    with pytest.raises(UserError, match=r"out.csv row 2: \.\./\.\./x.png leads out of the bucket"):
        scan_source(cfg.data)


def test_a_sheet_mixing_files_and_objects_is_refused_naming_the_rows(tmp_path: Path):
    write_image_folder(tmp_path / "img", {"neg": 2, "pos": 2})
    rows = [
        ("img/neg/p00_img00.png", "neg"),
        ("s3://bucket/x/a.png", "neg"),
        ("img/pos/p00_img00.png", "pos"),
        ("s3://bucket/x/b.png", "pos"),
        ("img/pos/p00_img01.png", "pos"),
    ]
    sheet = _write_sheet(tmp_path / "mixed.csv", ["path", "label"], rows)
    cfg = _config(tmp_path / "cache", manifest=str(sheet))
    with pytest.raises(UserError, match=(
        r"mixed.csv: rows 2, 4, 6 name local files and rows 3, 5 objects in a bucket; a "
        r"sheet names one or the other"
    )):  # fmt: skip
        scan_source(cfg.data)


def test_dicom_keys_and_credentials_are_refused_for_objects(tmp_path: Path):
    """What needs local DICOM files, or would carry a secret into ids and logs, stops
    before any request."""
    cfg = _config(tmp_path / "c", root="s3://bucket/labels.csv", group_from="PatientID")
    with pytest.raises(UserError, match="data.group_from reads DICOM headers on this machine"):
        scan_source(cfg.data)
    cfg = _config(tmp_path / "c", manifest="s3://bucket/labels.csv", label_key="AccessionNumber")
    with pytest.raises(UserError, match="data.label_key reads DICOM headers"):
        scan_source(cfg.data)
    sheet = _write_sheet(
        tmp_path / "secret.csv",
        ["path", "label"],
        [("s3://AKIA:topsecret@bucket/a.png", "a"), ("s3://bucket/b.png", "b")],
    )
    with pytest.raises(UserError, match="row 2") as refused:
        scan_source(_config(tmp_path / "c", manifest=str(sheet)).data)
    assert "topsecret" not in str(refused.value)
