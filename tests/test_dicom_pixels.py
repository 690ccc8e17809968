"""Issue 30 items 4-5: pixels as the file means them, and files that are not 2-D images.

DICOM through pydicom's own functions (VOI LUT and Modality LUT Sequences, windows, palette
colour, YBR, MONOCHROME1, legacy files without file meta, non-image objects, several frames),
colour with 16 bits per sample, volumes (NIfTI), animations (GIF, APNG), WebP/AVIF photos,
and any decoder exception named per file. Synthetic files are built here; real ones come from
pydicom's test files and the pydicom-data package (dev extra). Decoded pixels are compared with
what pydicom's functions give (a viewer's view). No Ray.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image, features

from distmed import predict
from distmed.config import DataConfig
from distmed.data import build_cache, drop_samples, load_cached, scan_source, try_decode
from distmed.data.decode import decode_image, describe_file
from distmed.data.dicom import read_dicom
from distmed.data.inspection import inspect_index
from distmed.data.settings import DecodeSettings
from distmed.errors import UserError
from distmed.inference import decode_file

pydicom = pytest.importorskip("pydicom")
cv2 = pytest.importorskip("cv2")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import (  # noqa: E402
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
)
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def real_file(name: str) -> Path:
    """A real file from pydicom's test files or the pydicom-data package (never downloaded)."""
    found = get_testdata_file(name, download=False)
    assert found, f"{name}: pip install pydicom-data (in distmed's dev extra)"
    return Path(str(found))


def dataset(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", **fields) -> Dataset:
    """An image data set (grey, or RGB/YBR for (H, W, 3) uint8); `fields` set as given."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.PatientID = "OT", "P1"
    if pixels is not None:
        colour = pixels.ndim == 3
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 3 if colour else 1
        ds.PhotometricInterpretation = photometric
        bits = pixels.dtype.itemsize * 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        if colour:
            ds.PlanarConfiguration = 0
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in fields.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path, file_meta: bool = True) -> Path:
    """A Part-10 file (preamble, file meta), or the bare data set as legacy files hold it."""
    if file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.preamble = b"\0" * 128
        ds.save_as(path, enforce_file_format=True)
    else:
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    return path


def lut_item(descriptor: list[int], data: np.ndarray, **fields) -> Dataset:
    item = Dataset()  # both elements' VRs are ambiguous (US/SS, US/OW): said here
    item.add_new("LUTDescriptor", "SS" if descriptor[1] < 0 else "US", descriptor)
    item.add_new("LUTData", "US", [int(v) for v in data])
    for key, value in fields.items():
        setattr(item, key, value)
    return item


def reason(path: Path, options: DecodeSettings | int = 16) -> str:
    image, why = try_decode(path, options)
    assert image is None, f"{path.name} decoded"
    return why


def full_size(path: Path, options: DecodeSettings | None = None) -> np.ndarray:
    """The decoded pixels at the file's own size (what the inspector hashes)."""
    return describe_file(path, options or DecodeSettings())[4].astype(int)


# --------------------------------------------------------------------------- VOI / modality


def test_a_voi_lut_sequence_is_applied_and_spans_the_full_grey_range(tmp_path):
    stored = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    # A 12-bit S-curve said to be 16-bit (the descriptor's bit count is often wrong): its
    # entries still run from black to white.
    curve = (4095 / (1 + np.exp(-(np.arange(256) - 128) / 24))).round()
    ds = dataset(stored, VOILUTSequence=Sequence([lut_item([256, 0, 16], curve)]))
    path = save(ds, tmp_path / "vlut.dcm")
    out = full_size(path)
    shown = apply_voi_lut(stored, read_dicom(path))
    want = np.round((shown - curve.min()) / (curve.max() - curve.min()) * 255)
    assert np.abs(out - want).max() <= 1
    assert out.max() - out.min() > 200  # not black: a real range


def test_real_voi_lut_file_decodes_as_pydicom_shows_it():
    path = real_file("vlut_04.dcm")  # decoded black before
    ds = pydicom.dcmread(path)
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(float)
    out = full_size(path)
    assert out.max() - out.min() == 255
    assert np.abs(out - np.round(shown / 65535 * 255)).max() <= 1


def test_a_modality_lut_sequence_maps_stored_values_through_pydicom(tmp_path):
    stored = np.array([[-2048, -1000, 0, 1000, 2047, 3000]], dtype=np.int16).repeat(3, 0)
    table = (np.sqrt(np.arange(4096) / 4095) * 65535).round()
    ds = dataset(
        stored,
        ModalityLUTSequence=Sequence([lut_item([4096, -2048, 16], table, ModalityLUTType="US")]),
    )
    out = full_size(save(ds, tmp_path / "mlut.dcm"), DecodeSettings(intensity="minmax"))
    mapped = apply_modality_lut(stored, ds).astype(float)
    assert mapped[0, -1] == mapped[0, -2]  # past the LUT's end: its last entry
    want = np.round((mapped - mapped.min()) / (mapped.max() - mapped.min()) * 255)
    assert np.abs(out - want).max() <= 1
    # The square-root LUT, not a straight line: the middle value is well above mid-grey.
    assert out[0, 2] > 170


def test_an_8_bit_voi_lut_with_4096_entries_maps_every_value(tmp_path):
    # pydicom indexes an 8-bit LUT with uint8 and subtracts in the LUT's type: entry 2048 and
    # a rescaled 65536 (past the end) would wrap to entries 0; here they are mid-grey, white.
    stored = np.array([[0, 128, 4096]], dtype=np.uint16).repeat(2, 0)
    lut = np.linspace(0, 255, 4096).round()
    ds = dataset(
        stored,
        RescaleSlope=16,
        RescaleIntercept=0,
        VOILUTSequence=Sequence([lut_item([4096, 0, 8], lut)]),
    )
    out = full_size(save(ds, tmp_path / "wide.dcm"))[0]
    assert out[0] == 0 and abs(out[1] - lut[2048]) <= 1 and out[2] == 255


def test_a_window_follows_pydicoms_rules_and_monochrome1_inverts_within_it(tmp_path):
    hu = np.array([[-1000, -160, 0, 40, 80, 240, 1000]], dtype=np.int16).repeat(2, 0)
    fields = {"RescaleSlope": 1, "RescaleIntercept": 0, "WindowCenter": 40, "WindowWidth": 400}
    mono2 = dataset(hu, **fields)
    out = full_size(save(mono2, tmp_path / "ct.dcm"))[0]
    windowed = apply_voi_lut(apply_modality_lut(hu, mono2), mono2)[0]
    low, high = -(2**15), 2**15 - 1  # pydicom's y range for signed 16-bit stored values
    assert np.abs(out - np.round((windowed - low) / (high - low) * 255)).max() <= 1
    assert out[0] == 0 and out[-1] == 255 and abs(out[3] - 128) <= 1
    mono1 = dataset(hu, "MONOCHROME1", **fields)
    assert (full_size(save(mono1, tmp_path / "inv.dcm"))[0] == 255 - out).all()
    # data.intensity=window replaces the file's window, and MONOCHROME1 still inverts.
    own = DecodeSettings(intensity="window", window=(500, 1000))
    assert full_size(tmp_path / "inv.dcm", own)[0][-1] == 0  # HU 1000: top of the window


def test_real_monochrome1_radiograph_decodes_inverted_in_its_window():
    path = real_file("RG1_UNCR.dcm")  # MONOCHROME1, 15-bit, WindowCenter 15000 / Width 30000
    ds = pydicom.dcmread(path)
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(float)
    want = 255 - np.round(shown / (2**15 - 1) * 255)
    assert np.abs(full_size(path) - want).max() <= 1


# --------------------------------------------------------------------------- colour


@pytest.mark.parametrize("bits", [8, 16])
def test_palette_colour_becomes_rgb_through_apply_color_lut(tmp_path, bits):
    indices = np.arange(64, dtype=np.uint8).reshape(8, 8)
    ramp = np.arange(64) * 4
    red, green, blue = ramp, 252 - ramp, np.full(64, 128)
    scale = 257 if bits == 16 else 1
    ds = dataset(indices, "PALETTE COLOR")
    for name, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [64, 0, bits])
        data = (lut * scale).astype(f"<u{bits // 8}").tobytes()
        setattr(ds, f"{name}PaletteColorLookupTableData", data)
    out = decode_image(save(ds, tmp_path / "pal.dcm"), 8)
    assert out.shape == (8, 8, 3)
    rgb = apply_color_lut(indices, ds) // scale
    assert (out == rgb).all()  # 8 px: no resampling
    assert out[0, 0].tolist() == [0, 252, 128] and out[7, 7].tolist() == [252, 0, 128]


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "OT-PAL-8-face.dcm", "examples_palette.dcm"])
def test_real_palette_files_decode_as_colour_not_indices(name):
    path = real_file(name)  # OT-PAL-8-face has no file meta either
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        ds = read_dicom(path)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(float)
    top = 65535 if rgb.max() > 255 else 255
    out = full_size(path)
    assert out.ndim == 3 and np.abs(out - np.round(rgb / top * 255)).max() <= 1
    assert np.abs(out[..., 0] - out[..., 2]).max() > 50  # colour, not grey indices


def test_ybr_full_is_converted_to_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:4, :, 0], rgb[4:, :, 2], rgb[:, :4, 1] = 220, 200, 90
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = decode_image(save(dataset(ybr, "YBR_FULL"), tmp_path / "ybr.dcm"), 8)
    assert np.abs(out.astype(int) - rgb).max() <= 2


def test_real_ybr_and_jpeg_colour_files_show_the_same_picture_as_rgb():
    reference = full_size(real_file("SC_rgb.dcm"))
    for name in ("SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        assert np.abs(full_size(real_file(name)) - reference).mean() < 3, name
    # JPEG-coded YBR_FULL_422 ultrasound and its lossless twin: the same colours.
    assert (
        np.abs(full_size(real_file("US1_J2KR.dcm")) - full_size(real_file("US1_UNCR.dcm"))).max()
        == 0
    )


# --------------------------------------------------------------------------- reading


def test_a_file_without_file_meta_reads_like_its_part10_twin(tmp_path):
    stored = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 60).astype(np.uint16)
    twin = save(dataset(stored), tmp_path / "twin.dcm")
    legacy = save(dataset(stored), tmp_path / "legacy.dcm", file_meta=False)
    assert legacy.read_bytes()[128:132] != b"DICM"
    assert (decode_image(legacy, 8) == decode_image(twin, 8)).all()


def test_force_is_used_only_where_a_data_set_is_there(tmp_path):
    png = tmp_path / "scan.dcm"
    Image.new("L", (8, 8), 7).save(png, format="PNG")
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(600))
    for name in ("scan.dcm", "noise.dcm"):
        assert reason(tmp_path / name).startswith("not a DICOM file (no DICM preamble")


def test_non_image_dicom_is_refused_naming_what_it_is(tmp_path):
    report = dataset(None, SOPClassUID=ComprehensiveSRStorage)
    why = reason(save(report, tmp_path / "report.dcm"))
    assert why == "DICOM Comprehensive SR Storage without pixel data: not an image"
    assert "RT Structure Set Storage without pixel data" in reason(real_file("rtstruct.dcm"))
    assert reason(real_file("DICOMDIR")).startswith("a DICOMDIR (the index of a DICOM export)")
    assert "Segmentation (a label mask)" in reason(real_file("liver_1frame.dcm"))


def test_multi_frame_is_refused_and_one_frame_is_an_image(tmp_path):
    one = save(dataset(np.full((4, 4), 9, np.uint16), NumberOfFrames=1), tmp_path / "one.dcm")
    assert decode_image(one, 4).shape == (4, 4)
    assert reason(real_file("emri_small.dcm")).startswith("multi-frame DICOM (10 frames)")


def test_a_file_no_decoder_reads_is_named_with_the_decoders_reasons():
    why = reason(real_file("JPEG-lossy.dcm"))  # damaged JPEG: libjpeg and Pillow both fail
    assert why.startswith("DICOM pixel data (JPEG Extended (Process 2 and 4)) that no installed")
    assert "pylibjpeg:" in why and "\n" not in why


# --------------------------------------------------------------------------- any failure


def _folder_with_a_crashing_file(root: Path) -> Path:
    write_image_folder(root, {"a": 3, "b": 3}, size=8)
    save(dataset(np.full((8, 8), 5, np.uint16)), root / "b" / "crash.dcm")
    return root


def _crash_on(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder bug on one file: an exception type no one expects (pydicom raised
    AttributeError for a file without file meta)."""
    import distmed.data.decode as decode_mod

    real = decode_mod.read_pixels

    def read_pixels(path, *args):
        if path.name == name:
            raise AttributeError("Unable to decode the pixel data")
        return real(path, *args)

    monkeypatch.setattr(decode_mod, "read_pixels", read_pixels)


def test_any_decoder_exception_names_the_file_and_follows_skip_invalid(tmp_path, monkeypatch):
    root = _folder_with_a_crashing_file(tmp_path / "d")
    _crash_on("crash.dcm", monkeypatch)
    config = DataConfig(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError) as info:
        build_cache(scan_source(config), config)
    assert "b/crash.dcm (decoder error: AttributeError: Unable to decode" in str(info.value)
    lenient = config.model_copy(update={"skip_invalid": True})
    index = scan_source(lenient)
    cached = build_cache(index, lenient)
    assert list(cached.skipped) == ["b/crash.dcm"]
    assert load_cached(cached.pool_path).shape[0] == len(drop_samples(index, cached.skipped).pool)


def test_predict_reports_the_crashing_file_and_decodes_the_rest(tmp_path, monkeypatch):
    root = _folder_with_a_crashing_file(tmp_path / "d")
    _crash_on("crash.dcm", monkeypatch)
    files = predict.collect_images([str(root)])
    decoded = {p.relative_to(root).as_posix(): decode_file(p, 8) for p in files}
    assert decoded["b/crash.dcm"].startswith("decoder error: AttributeError")
    assert sum(isinstance(d, np.ndarray) for d in decoded.values()) == 6


# --------------------------------------------------------------------------- deep colour


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_colour_with_16_bits_per_sample_is_scaled_like_16_bit_grey(tmp_path, suffix):
    rgb = np.zeros((8, 8, 3), dtype=np.uint16)  # 12-bit data in 16-bit samples
    rgb[:, :4, 0], rgb[:, 4:, 1], rgb[4:, :, 2] = 4000, 2000, 1000
    path = tmp_path / f"rgb48{suffix}"
    assert cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    out = decode_image(path, DecodeSettings(image_size=8, intensity="minmax")).astype(int)
    want = np.round(rgb / 4000 * 255)  # one range for all channels: min 0, max 4000
    assert np.abs(out - want).max() <= 1  # Pillow alone gives 4000 >> 8 = 15: nearly black
    fmt, mode, _, bits, _ = describe_file(path, DecodeSettings())
    assert (fmt, mode, bits) == ({".png": "PNG", ".tif": "TIFF"}[suffix], "RGB", 16)


def test_16_bit_colour_is_turned_upright_by_its_exif_orientation(tmp_path):
    rgb = np.zeros((8, 12, 3), dtype=np.uint16)
    rgb[:2, :, 0], rgb[..., 2] = 4000, 1000  # a red strip along the top
    png = cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the top strip on the right
    payload = exif.tobytes().removeprefix(b"Exif\0\0")
    chunk = b"eXIf" + payload
    chunk = struct.pack(">I", len(payload)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    at = png.index(b"IDAT") - 4
    path = tmp_path / "rotated48.png"
    path.write_bytes(png[:at] + chunk + png[at:])
    red = full_size(path, DecodeSettings(intensity="minmax"))[..., 0]
    assert red.shape == (12, 8)  # upright: 8 wide, 12 high, rotated once (not twice)
    assert (red[:, 6:] == 255).all() and (red[:, :6] == 0).all()


# --------------------------------------------------------------------------- not 2-D images


def nifti(shape: tuple[int, ...], gz: bool = False) -> bytes:
    """A NIfTI-1 single file: 348-byte header (sizeof_hdr, dim, datatype int16), data."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    struct.pack_into("<hh", header, 70, 4, 16)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\x00"
    body = bytes(header) + b"\0" * 4 + np.zeros(shape, "<i2").tobytes()
    return gzip.compress(body) if gz else body


def test_nifti_volumes_are_refused_by_name_with_their_shape(tmp_path):
    (tmp_path / "vol.nii").write_bytes(nifti((32, 32, 8)))
    (tmp_path / "vol.nii.gz").write_bytes(nifti((32, 32, 8, 3), gz=True))
    (tmp_path / "slice.nii").write_bytes(nifti((32, 32)))
    (tmp_path / "seg.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\n")
    assert reason(tmp_path / "vol.nii").startswith("NIfTI 3-D volume 32x32x8: distmed classifies")
    assert reason(tmp_path / "vol.nii.gz").startswith("NIfTI 4-D volume 32x32x8x3")
    assert reason(tmp_path / "slice.nii").startswith("NIfTI image 32x32: distmed reads 2-D")
    assert reason(tmp_path / "seg.nrrd").startswith("NRRD file: a 3-D volume format")


def test_a_folder_of_only_volumes_says_they_are_volumes(tmp_path):
    root = tmp_path / "nifti_only"
    for name in ("normal", "abnormal"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"case{i}.nii.gz").write_bytes(nifti((16, 16, 4), gz=True))
    config = DataConfig(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"))
    index = scan_source(config)  # indexed to be named, not "has no images"
    assert len(index.pool) == 4
    summary = inspect_index(index, config)
    assert summary["unreadable"]["count"] == 4
    assert list(summary["unreadable"]["reasons"]) == [
        "NIfTI 3-D volume 16x16x4: distmed classifies 2-D images; export 2-D slices "
        "(PNG, TIFF or DICOM)"
    ]
    with pytest.raises(UserError) as info:
        build_cache(index, config)
    message = str(info.value)
    assert message.startswith("nifti_only: none of the 4 pool image files can be read")
    assert "abnormal/case0.nii.gz (NIfTI 3-D volume 16x16x4" in message
    assert "skip_invalid" not in message  # leaving them out would leave nothing


def frames(count: int) -> list[Image.Image]:
    return [Image.new("L", (8, 8), 40 * k) for k in range(count)]


@pytest.mark.parametrize(
    ("name", "save_kw", "want"),
    [
        ("cine.gif", {"duration": 100, "loop": 0}, "animated GIF (4 frames)"),
        ("seq.png", {"duration": 100}, "animated PNG (4 frames)"),
        ("anim.webp", {"duration": 100, "lossless": True}, "animated WebP (4 frames)"),
    ],
)
def test_animations_are_refused_by_name(tmp_path, name, save_kw, want):
    first, *rest = frames(4)
    first.save(tmp_path / name, save_all=True, append_images=rest, **save_kw)
    assert reason(tmp_path / name).startswith(f"{want}: a cine loop or stack")


def test_phone_and_web_formats_are_read(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.webp", lossless=True)
    assert (decode_image(tmp_path / "photo.webp", 16) == pixels).all()
    Image.fromarray(pixels[..., 0]).save(tmp_path / "still.gif")  # one frame: an image
    assert (decode_image(tmp_path / "still.gif", 16) == pixels[..., 0]).all()
    if features.check("avif"):
        flat = np.full((16, 16, 3), (200, 60, 30), dtype=np.uint8)
        Image.fromarray(flat).save(tmp_path / "photo.avif", quality=95)
        assert np.abs(decode_image(tmp_path / "photo.avif", 16).astype(int) - flat).max() <= 6
    (tmp_path / "iphone.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))  # no decoder
    assert reason(tmp_path / "iphone.heic").startswith("HEIC/HEIF photo that Pillow does not")
    folder = tmp_path / "d"
    write_image_folder(folder, {"a": 1, "b": 1}, size=8)
    (folder / "a" / "photo.webp").write_bytes((tmp_path / "photo.webp").read_bytes())
    assert "a/photo.webp" in scan_source(DataConfig(root=str(folder))).pool.ids


# --------------------------------------------------------------------------- the inspector


def test_the_inspector_reports_stored_bit_depth_and_photometric(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root, {"a": 1, "b": 1}, size=8)
    rgb48 = np.full((8, 8, 3), 3000, dtype=np.uint16)
    cv2.imwrite(str(root / "a" / "rgb48.png"), rgb48)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "a" / "grey16.png")
    indices = np.zeros((8, 8), np.uint8)
    pal = dataset(indices, "PALETTE COLOR")
    for name in ("Red", "Green", "Blue"):
        setattr(pal, f"{name}PaletteColorLookupTableDescriptor", [1, 0, 8])
        setattr(pal, f"{name}PaletteColorLookupTableData", b"\x80\x00")
    save(pal, root / "b" / "pal.dcm")
    ybr = convert_color_space(np.full((8, 8, 3), 90, np.uint8), "RGB", "YBR_FULL")
    save(dataset(ybr, "YBR_FULL"), root / "b" / "ybr.dcm")
    mono1 = dataset(np.full((8, 8), 7, np.uint16), "MONOCHROME1", BitsStored=12, HighBit=11)
    save(mono1, root / "b" / "mono1.dcm")
    config = DataConfig(root=str(root), cache_dir=str(tmp_path / "c"))
    images = inspect_index(scan_source(config), config)["images"]
    assert images["modes"] == {
        "L": 2,
        "RGB": 1,
        "I;16": 1,
        "PALETTE COLOR": 1,
        "YBR_FULL": 1,
        "MONOCHROME1": 1,
    }
    assert images["bit_depths"] == {"8-bit": 4, "16-bit": 2, "12-bit": 1}


# --------------------------------------------------------------------------- the real zoo

# Case 25's kinds: every real file decodes to a picture with contrast, or is refused by name.
REAL_IMAGES = [
    "CT_small.dcm", "MR_small.dcm", "MR2_UNCR.dcm", "RG3_UNCR.dcm", "mlut_18.dcm",
    "JPEG2000.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_RLE.dcm", "JPGExtended.dcm", "JPEG-LL.dcm", "RG1_J2KR.dcm",
    "JPEGLSNearLossless_16.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle.dcm", "SC_rgb_16bit.dcm",
]  # fmt: skip
REAL_REFUSED = {
    "SC_rgb_2frame.dcm": "multi-frame DICOM (2 frames)",
    "test-SR.dcm": "DICOM Comprehensive SR Storage without pixel data",
    "rtplan.dcm": "DICOM RT Plan Storage without pixel data",
    "waveform_ecg.dcm": "DICOM 12-lead ECG Waveform Storage without pixel data",
}


@pytest.mark.parametrize("name", REAL_IMAGES)
def test_real_dicom_files_decode_with_contrast(name):
    out = decode_image(real_file(name), 32).astype(int)
    assert out.max() - out.min() > 100, name


@pytest.mark.parametrize(("name", "want"), REAL_REFUSED.items())
def test_real_non_images_are_refused_by_name(name, want):
    assert reason(real_file(name)).startswith(want)
