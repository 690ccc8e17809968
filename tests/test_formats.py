"""Issue 21: medical formats and full-size images through the one decoder.

DICOM (MONOCHROME1/2, rescale slope/intercept, a window, compressed, multi-frame), EXIF
orientation, non-finite float pixels, oversized files (named and skipped, predict answers
for the rest), resize modes and intensity policies saved with the model, label manifests,
3-D inputs refused, and the parallel memory-mapped cache. Every input is built here, small.
No Ray.
"""

from __future__ import annotations

import pickle
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

import distmed.data as data_mod
from distmed import inference, predict
from distmed.config import DataConfig, ExperimentConfig, load_config
from distmed.cv import prepare_data
from distmed.data import (
    DecodeSettings,
    build_cache,
    decode_image,
    decode_split,
    drop_samples,
    load_cached,
    scan_folder,
    scan_source,
    try_decode,
)
from distmed.errors import UserError
from distmed.model import build_model
from distmed.savedmodel import SavedModel, preprocessing_for

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def data_cfg(**fields):
    return ExperimentConfig.model_validate({"data": fields}).data


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    patient: str = "P001",
    compress: str | None = None,
) -> Path:
    """A minimal Part-10 file: 12-bit grey in 16 bits (or 8-bit RGB; 3-D = frames)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", patient
    rgb = photometric == "RGB"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if pixels.ndim == (4 if rgb else 3):
        ds.NumberOfFrames = pixels.shape[0]
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    dtype = "u1" if rgb else "<u2"
    ds.PixelData = np.ascontiguousarray(pixels).astype(dtype).tobytes()
    if compress:
        ds.compress(getattr(pydicom.uid, compress))
    ds.save_as(path, enforce_file_format=True)
    return path


def field(seed: int = 0, shape=(32, 32)) -> np.ndarray:
    """12-bit values with structure and a few hot pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    values = 800 + 1500 * (xx / shape[1]) + 600 * ((yy - 16) ** 2 + (xx - 16) ** 2 < 60)
    values = values + rng.normal(0, 40, shape)
    return values.clip(0, 4095).astype(np.uint16)


# --------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize("intensity", ["minmax", "percentile"])
def test_monochrome1_equals_its_monochrome2_twin_and_rescale_changes_nothing(tmp_path, intensity):
    values = field()
    mono2 = write_dicom(tmp_path / "mono2.dcm", values)
    mono1 = write_dicom(tmp_path / "mono1.dcm", 4095 - values, photometric="MONOCHROME1")
    rescaled = write_dicom(tmp_path / "hu.dcm", values, slope=2.0, intercept=-1024.0)
    options = DecodeSettings(image_size=32, intensity=intensity)
    want = decode_image(mono2, options).astype(int)
    assert want.min() == 0 and want.max() == 255 and want.shape == (32, 32)
    assert np.abs(decode_image(mono1, options).astype(int) - want).max() <= 1
    assert np.abs(decode_image(rescaled, options).astype(int) - want).max() <= 1
    # The disc (values + 600) is brighter than its surroundings, as a viewer shows it.
    assert want[16, 16] > want[16, 2] + 40


def test_a_windowed_dicom_maps_its_values_where_the_window_says(tmp_path):
    stored = np.tile(np.array([0, 864, 1024, 1064, 1104, 1264, 2000, 4095]), (8, 1))
    path = write_dicom(
        tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0, window=(40, 400)
    )  # HU = stored - 1024: -1024, -160, 0, 40, 80, 240, 976, 3071
    row = decode_image(path, DecodeSettings(image_size=8))[0].astype(int)
    assert row[0] == 0 and row[1] == 0  # at or below center - width / 2
    assert row[5] == 255 and row[6] == 255 and row[7] == 255  # at or above center + width / 2
    assert abs(row[3] - 128) <= 1  # the center: mid-grey
    assert abs(row[2] - 255 * 0.4) <= 2 and abs(row[4] - 255 * 0.6) <= 2
    # data.intensity=window overrides the file's own window: [540, 1000] spans HU 40..1040.
    windowed = DecodeSettings(image_size=8, intensity="window", window=(540, 1000))
    own = decode_image(path, windowed)[0]
    assert own[3] == 0 and abs(int(own[6]) - round(255 * 0.936)) <= 1 and own[7] == 255


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_a_compressed_dicom_decodes_like_the_uncompressed_one(tmp_path, syntax):
    if syntax == "JPEG2000Lossless":
        pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes JPEG 2000")
    values = field(3)
    plain = write_dicom(tmp_path / "plain.dcm", values)
    packed = write_dicom(tmp_path / "packed.dcm", values, compress=syntax)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID.is_compressed
    assert (decode_image(packed, 16) == decode_image(plain, 16)).all()


def test_rgb_dicom_stays_colour(tmp_path):
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    out = decode_image(write_dicom(tmp_path / "rgb.dcm", pixels, photometric="RGB"), 8)
    assert out.shape == (8, 8, 3) and (out[..., 0] == 200).all() and (out[..., 1] == 0).all()


def test_a_multi_frame_dicom_is_refused_naming_the_file(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root, {"a": 3, "b": 3}, size=12)
    write_dicom(root / "b" / "cine.dcm", np.stack([field(i, (12, 12)) for i in range(4)]))
    config = data_cfg(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError) as info:
        build_cache(scan_source(config), config)
    message = str(info.value)
    assert "b/cine.dcm (multi-frame DICOM (4 frames)" in message and "\n" not in message
    assert "data.skip_invalid=true" in message


def test_dicom_in_class_folders_found_by_suffix_and_by_content(tmp_path):
    """Case 06: PNG + DICOM mixed, DICOM-only classes, and a PACS file without a suffix."""
    root = tmp_path / "mixed"
    write_image_folder(root, {"normal": 4, "pneumonia": 2}, size=16)
    for i in range(3):
        write_dicom(root / "pneumonia" / f"site2_{i}.dcm", 4095 - field(i, (16, 16)), "MONOCHROME1")
    write_dicom(root / "pneumonia" / "IM000001", field(9, (16, 16)))
    (root / "pneumonia" / "notes.txt").write_text("not an image")
    config = data_cfg(root=str(root), image_size=16, cache_dir=str(tmp_path / "c"))
    index = scan_source(config)
    assert len(index.pool) == 10 and "pneumonia/IM000001" in index.pool.ids
    assert index.ignored == {"pneumonia/notes.txt": "not an image file (.txt)"}
    cached = build_cache(index, config)
    assert load_cached(cached.pool_path).shape == (10, 1, 16, 16) and not cached.skipped
    only = tmp_path / "dicom_only"
    for name in ("a", "b"):
        (only / name).mkdir(parents=True)
        for i in range(2):
            write_dicom(only / name / f"{i}.dcm", field(i, (16, 16)), patient=f"{name}{i}")
    assert len(scan_folder(only, data_cfg()).pool) == 4


def test_group_from_patient_id_reads_the_dicom_header(tmp_path):
    root = tmp_path / "d"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            write_dicom(root / name / f"{i}.dcm", field(i, (8, 8)), patient=f"{name}-p{i // 2}")
    index = scan_source(data_cfg(root=str(root), group_from="PatientID"))
    assert list(index.pool.groups) == ["a-p0", "a-p0", "a-p1", "a-p1"] + [
        "b-p0",
        "b-p0",
        "b-p1",
        "b-p1",
    ]
    write_image_folder(root, {"a": 1}, size=8)  # a PNG has no header to read
    with pytest.raises(UserError, match="group_from=PatientID: .*p00_img00.png is not a DICOM"):
        scan_source(data_cfg(root=str(root), group_from="PatientID"))


# --------------------------------------------------------------------------- pixels


def test_an_exif_rotated_photo_decodes_equal_to_its_upright_twin(tmp_path):
    """Case 05: stored landscape with Orientation=6, shown portrait with the ruler below."""
    yy, xx = np.mgrid[:64, :48]
    shown = np.stack([120 + 60 * np.sin(yy / 9.0), 100 + xx, 90 + yy], axis=-1)
    shown[-8:] = 30  # the dark ruler strip along the bottom
    upright = Image.fromarray(shown.clip(0, 255).astype(np.uint8), mode="RGB")
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
    options = DecodeSettings(image_size=32, resize="pad")
    twin = decode_image(tmp_path / "upright.jpg", options).astype(int)
    rotated = decode_image(tmp_path / "phone.jpg", options).astype(int)
    assert np.abs(rotated - twin).mean() < 2
    assert rotated[-2:, 10:22].mean() < 45 < rotated[:4, 10:22].mean()  # the ruler at the bottom


def test_a_nan_background_float_image_keeps_its_contrast(tmp_path):
    values = np.full((16, 16), np.nan, dtype=np.float32)
    values[4:12, 4:12] = np.linspace(0.2, 0.3, 64).reshape(8, 8)  # a narrow float range
    values[0, 0] = np.inf
    Image.fromarray(values, mode="F").save(tmp_path / "float.tif")
    out = decode_image(tmp_path / "float.tif", DecodeSettings(image_size=16, intensity="minmax"))
    inside = out[4:12, 4:12]
    assert inside.min() == 0 and inside.max() == 255  # the full range, not NaN garbage
    assert (out[:4] == 0).all() and out[0, 0] == 0  # masked pixels are black
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(
        tmp_path / "empty.tif"
    )
    image, reason = try_decode(tmp_path / "empty.tif", 8)
    assert image is None and reason == "no finite pixel value (every pixel NaN or inf)"


def test_percentile_intensity_ignores_hot_pixels(tmp_path):
    values = field(1, (32, 32))
    values[0, :3] = 4095  # hot pixels
    path = tmp_path / "hot.png"
    Image.fromarray(values).save(path)
    robust = decode_image(path, DecodeSettings(image_size=32, intensity="percentile"))
    plain = decode_image(path, DecodeSettings(image_size=32, intensity="minmax"))
    assert robust[8:24, 8:24].std() > 1.5 * plain[8:24, 8:24].std()


def test_resize_modes_keep_the_aspect_ratio_when_asked(tmp_path):
    Image.new("L", (40, 20), 200).save(tmp_path / "wide.png")
    stretch = decode_image(tmp_path / "wide.png", DecodeSettings(image_size=16))
    pad = decode_image(tmp_path / "wide.png", DecodeSettings(image_size=16, resize="pad"))
    crop = decode_image(tmp_path / "wide.png", DecodeSettings(image_size=16, resize="center_crop"))
    assert (stretch == 200).all() and (crop == 200).all()
    assert (pad[:3] == 0).all() and (pad[-3:] == 0).all() and (pad[5:11] == 200).all()


# --------------------------------------------------------------------------- oversized files


def write_huge_png(path: Path, side: int = 13_500) -> Path:
    """Case 07: a 1-bit PNG of side x side (182 M pixels for 13,500), a few kB, streamed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes((side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def test_an_oversized_png_is_named_and_skipped_under_skip_invalid(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root, {"benign": 4, "tumour": 4}, size=12)
    write_huge_png(root / "tumour" / "wsi_overview.png")
    config = data_cfg(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError) as info:
        build_cache(scan_source(config), config)
    assert "tumour/wsi_overview.png (13500x13500 = 182 M pixels, over data.max_pixels" in str(
        info.value
    )
    skip = config.model_copy(update={"skip_invalid": True})
    index = scan_source(skip)
    cached = build_cache(index, skip)
    assert list(cached.skipped) == ["tumour/wsi_overview.png"]
    assert load_cached(cached.pool_path).shape[0] == len(drop_samples(index, cached.skipped).pool)


def test_an_oversized_jpeg_is_decoded_reduced_within_max_pixels(tmp_path):
    big = np.zeros((1600, 2000), dtype=np.uint8)
    big[:, 1000:] = 255
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(big).save(tmp_path / "big.png")
    options = DecodeSettings(image_size=16, max_pixels=1_000_000)
    out = decode_image(tmp_path / "big.jpg", options)  # drafted to 1/8 while decoding
    assert out[:, :6].max() < 30 and out[:, -6:].min() > 225
    image, reason = try_decode(tmp_path / "big.png", options)  # PNG cannot be drafted
    assert image is None and reason.startswith("2000x1600 = 3 M pixels, over data.max_pixels")


def _model(tmp_path: Path, size: int = 16, **data) -> Path:
    cfg = ExperimentConfig.model_validate(
        {"data": {"root": "x", "image_size": size, **data}, "model": {"weights": "none"}}
    )
    saved = SavedModel(
        config=cfg,
        class_names=["benign", "tumour"],
        positive_index=1,
        preprocessing=preprocessing_for(size, 1, cfg.data),
    )
    path = tmp_path / "best_model.pt"
    saved.save(path, build_model(cfg.model, 2).state_dict())
    return path


def test_predict_answers_for_every_other_file_with_exit_3(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "scans", {"x": 3}, size=16) / "x"
    write_huge_png(folder / "wsi_overview.png")
    write_dicom(folder / "scan.dcm", field(0, (16, 16)))
    out = tmp_path / "p.csv"
    model = _model(tmp_path)
    code = predict.main(["--model", str(model), str(folder), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == predict.EXIT_SOME_UNREADABLE
    assert "unreadable: " in err and "wsi_overview.png (13500x13500 = 182 M pixels" in err
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 5
    predicted = [r for r in rows if r.split(",")[1]]
    assert len(predicted) == 4 and any("scan.dcm" in r for r in predicted)


# --------------------------------------------------------------------------- saved decoding


def test_the_decoding_is_saved_with_the_model_and_predict_uses_it(tmp_path):
    root = tmp_path / "d"
    for label, shade in (("a", 60), ("b", 200)):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (30 + 10 * i, 12), shade).save(root / label / f"{i}.png")
    config = data_cfg(root=str(root), image_size=12, resize="pad", cache_dir=str(tmp_path / "c"))
    index = scan_source(config)
    pool = load_cached(build_cache(index, config).pool_path)
    saved = SavedModel.load(_model(tmp_path, 12, resize="pad", intensity="minmax"))
    options = saved.preprocessing.decode_settings()
    assert options.resize == "pad" and options.intensity == "minmax"
    for row, path in enumerate(index.pool.paths):
        assert (inference.decode_file(path, options)[0] == pool[row, 0]).all()
    assert (pool[:, 0, 0] == 0).all()  # padded, not stretched


def test_an_old_model_file_decodes_as_it_was_trained(tmp_path):
    import torch

    path = _model(tmp_path)
    payload = torch.load(path, weights_only=True)
    for key in ("intensity", "percentiles", "window", "resize_mode", "max_pixels"):
        del payload["preprocessing"][key]
    torch.save(payload, path)
    options = SavedModel.load(path).preprocessing.decode_settings()
    assert (options.intensity, options.resize) == ("minmax", "stretch")


def test_every_decode_setting_travels_into_the_model_file_in_its_old_layout(tmp_path):
    import torch

    path = _model(tmp_path, 12, resize="pad", intensity="window", window=[40, 400])
    stored = torch.load(path, weights_only=True)["preprocessing"]
    # The layout files have always had (older distmed reads new files): mode and text.
    assert stored["resize_mode"] == "pad" and stored["resize"].startswith("bilinear, the long")
    assert "resize_text" not in stored
    saved = SavedModel.load(path)
    assert saved.preprocessing.decode_settings() == saved.config.data.decode_settings()
    assert saved.preprocessing.resize_text == stored["resize"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("image_size", 32), ("intensity", "minmax"), ("window", (40.0, 400.0)),
     ("percentiles", (1.0, 99.0)), ("resize", "pad"), ("max_pixels", 10)],
)  # fmt: skip
def test_every_decode_setting_is_in_the_cache_key(field, value):
    assert set(DecodeSettings.model_fields) == {"image_size", "intensity", "window",
                                                "percentiles", "resize", "max_pixels"}  # fmt: skip
    default = DecodeSettings()
    assert default.model_copy(update={field: value}).key() != default.key()
    # The key of caches decoded before DecodeSettings replaced DecodeOptions: they stay valid.
    assert default.key() == "224|percentile|None|(0.5, 99.5)|stretch|100000000"


def test_a_decode_worker_unpickles_its_settings_without_torch():
    settings = DataConfig(resize="pad", intensity="minmax").decode_settings()
    code = (
        "import pickle, sys; settings = pickle.loads(sys.stdin.buffer.read()); "
        "import distmed.data.decode; print(settings.resize, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(settings), capture_output=True, check=True
    )
    assert out.stdout.decode().split() == ["pad", "False"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"intensity": "window"}, "intensity=window needs data.window"),
        ({"window": [40, 400]}, "data.window is set but data.intensity is not 'window'"),
        ({"percentiles": [99, 1]}, "the low one must be below the high one"),
        ({"group_regex": "x", "group_from": "PatientID"}, "set at most one of group_csv"),
    ],
)
def test_inconsistent_decoding_settings_are_one_line(fields, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [f"data.{k}={v}" for k, v in fields.items()])


# --------------------------------------------------------------------------- manifests


def _manifest_data(tmp_path: Path) -> Path:
    images = write_image_folder(tmp_path / "ds" / "images", {"neg": 8, "pos": 8}, size=12)
    lines = ["Path,Label,Group,Split"]
    for name in ("neg", "pos"):
        for i, file in enumerate(sorted((images / name).iterdir())):
            split = "test" if i >= 6 else ("valid" if i == 5 else "train")
            lines.append(f"images/{name}/{file.name},{name},{name}{i // 2},{split}")
    path = tmp_path / "ds" / "labels.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    return path


def test_a_manifest_trains_with_its_own_splits_and_groups(tmp_path):
    csv_path = _manifest_data(tmp_path)
    cfg = load_config(
        None,
        [f"data.manifest={csv_path}", f"data.cache_dir={tmp_path / 'c'}", "data.image_size=8"]
        + ["cv.folds=3", "train.batch_size=4"],
    )
    index = scan_source(cfg.data)
    assert index.class_names == ["neg", "pos"] and len(index.pool) == 12 and len(index.test) == 4
    assert set(index.pool.origins) == {"train", "val"}
    assert index.pool.groups[0] == "neg0" and index.test.ids[0] == "images/neg/p03_img06.png"
    prepared = prepare_data(cfg, index)
    for fold in prepared.plan.folds:  # grouped: no patient on both sides of a fold
        train = {index.pool.groups[i] for i in fold["train"]}
        assert not train & {index.pool.groups[i] for i in fold["val"]}
    assert load_cached(prepared.cache.test_path).shape == (4, 1, 8, 8)
    assert scan_source(data_cfg(root=str(csv_path))).fingerprint == index.fingerprint


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("p00_img00.png", "gone.png", 1), "row 2: no such file images/neg/"),
        (lambda t: t.replace(",train", ",training2", 1), "row 2: split 'training2' is not"),
        (
            lambda t: t + t.splitlines()[1] + "\n",
            "row 18: images/neg/p00_img00.png is listed again (first in row 2)",
        ),
        (lambda t: t.replace(",pos,", ",neg,"), "column 'label' has one value ('neg') in all 16"),
        (lambda t: t.replace("Label", "Class"), "needs columns 'path' and 'label'"),
    ],
    ids=["missing-file", "unknown-split", "duplicate", "one-label", "no-label-column"],
)
def test_manifest_problems_are_one_line_naming_the_row(tmp_path, edit, message):
    csv_path = _manifest_data(tmp_path)
    csv_path.write_text(edit(csv_path.read_text(encoding="utf-8-sig")))
    with pytest.raises(UserError, match=re.escape(message)) as info:
        scan_source(data_cfg(manifest=str(csv_path)))
    assert str(csv_path) in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- 3-D, cache


def test_a_3d_npz_is_refused_up_front(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "organmnist3d.npz", **arrays)
    with pytest.raises(UserError, match=r"train_images has shape \(4, 28, 28, 28\), a 3-D"):
        scan_source(data_cfg(root=str(tmp_path / "organmnist3d.npz")))


def test_the_parallel_cache_equals_the_serial_one(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "d", {"a": 5, "b": 5}, size=20)
    write_image_folder(tmp_path / "d", {"b": 2}, size=20, mode="RGB", seed=3, suffix=".jpg")
    (root / "a" / "broken.png").write_bytes(b"")
    monkeypatch.setattr(data_mod.cache, "CHUNK", 3)
    arrays = []
    for workers in (1, 2):
        config = data_cfg(
            root=str(root), image_size=12, skip_invalid=True, decode_workers=workers,
            cache_dir=str(tmp_path / f"c{workers}"),
        )  # fmt: skip
        cached = build_cache(scan_source(config), config)
        assert cached.skipped == {"a/broken.png": "empty file"}
        arrays.append(np.array(load_cached(cached.pool_path)))
    assert arrays[0].shape == (12, 3, 12, 12)
    assert (arrays[0] == arrays[1]).all()
    reference, _ = decode_split(scan_source(config).pool, 12)
    assert (arrays[0] == reference).all()


def test_an_interrupted_decode_leaves_no_cache_a_later_run_trusts(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "d", {"a": 4, "b": 4}, size=12)
    config = data_cfg(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    calls = []

    def interrupted(path, options):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return try_decode(path, options)

    monkeypatch.setattr(data_mod.decode, "try_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(scan_source(config), config)
    left = [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert left == []  # no meta.json, no pool.npy, no staging file
    monkeypatch.undo()
    cached = build_cache(scan_source(config), config)
    assert load_cached(cached.pool_path).shape == (8, 1, 8, 8)
