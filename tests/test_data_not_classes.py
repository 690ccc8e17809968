"""Folders that are not classes: a DICOM export, a patient/study tree, the parts of a download
or many tiny folders beside a labels sheet stop with one line naming the folder and the fix,
through the scan and `python -m distmed.data`; class-folder layouts that resemble them pass."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder

from distmed.config import DataConfig
from distmed.data import scan_source
from distmed.data.__main__ import main as inspect_main
from distmed.errors import UserError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402


def write_dicom(path: Path, patient: str, study: str = "1.2.3", seed: int = 0, **tags) -> Path:
    """A small Part-10 CT image (16 x 16, 12 bits) with the header a PACS export writes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "CT", patient, study
    ds.SeriesInstanceUID = study + ".1" if study else ""
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.random.default_rng(seed).integers(0, 4000, (16, 16))
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_export(root: Path, patients: int = 4, images: int = 2, dicomdir: bool = True) -> Path:
    """A DICOM-CD export as pydicom's FileSet writes it: PT*/ST*/SE*/IM* without suffixes."""
    for p in range(patients):
        for k in range(images):
            path = root / f"PT{p:06d}" / "ST000000" / "SE000000" / f"IM{k:06d}"
            write_dicom(path, f"PAT{p + 1:03d}", f"1.2.826.{p + 1}", seed=10 * p + k)
    if dicomdir:
        (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # the index; never read
    return root


def stopped(root: Path, capsys) -> str:
    """The one-line message of the scan, checked to be what the inspector prints (exit 2)."""
    with pytest.raises(UserError) as info:
        scan_source(DataConfig(root=str(root)))
    message = str(info.value)
    assert "\n" not in message
    capsys.readouterr()
    assert inspect_main([str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}"
    return message


def counts(index) -> Counter:
    return Counter(index.class_names[label] for label in index.pool.labels)


# --------------------------------------------------------------------------- DICOM exports


def test_dicomdir_export_stops_naming_it_and_the_sheet(tmp_path, capsys):
    """Case 26: DICOMDIR + PT*/ST*/SE*; given as the export or as the folder above it."""
    export = write_export(tmp_path / "case" / "export")
    (tmp_path / "case" / "labels_by_patient.csv").write_text("PatientID,label\nPAT001,a\n")
    for given in (export, tmp_path / "case"):
        message = stopped(given, capsys)
        assert f"data.root {export} is a DICOM export" in message and "DICOMDIR" in message
        assert "not class folders" in message
        sheet = tmp_path / "case" / "labels_by_patient.csv"
        assert "holds `labels_by_patient.csv`" in message
        assert f"--data {sheet}`" in message and "PatientID,label" in message


def test_export_levels_without_dicomdir_stop(tmp_path, capsys):
    export = write_export(tmp_path / "export", dicomdir=False)
    message = stopped(export, capsys)
    assert f"{export}: folders PT000000/, PT000001/, PT000002/ and 1 more" in message
    assert "PT*/ST*/SE*" in message and "DICOM export" in message
    assert "PatientID,label" in message and "--data" in message  # how to label it instead


def test_dicom_folders_named_by_their_patient_id_stop(tmp_path, capsys):
    root = tmp_path / "d"
    for patient in ("10045", "10046", "10047"):
        for k in range(3):
            write_dicom(root / patient / f"{k}.dcm", patient, seed=k)
    message = stopped(root, capsys)
    assert "named by the PatientID of their DICOM files (10045, 10046, 10047)" in message
    assert "patients, not classes" in message


def test_one_patient_per_dicom_folder_stops(tmp_path, capsys):
    root = tmp_path / "d"
    for n, name in enumerate(("alpha", "beta")):
        for k in range(3):
            write_dicom(root / name / f"{k}.dcm", f"ANON{n}", seed=k)
    message = stopped(root, capsys)
    assert "alpha/, beta/" in message and "one patient each" in message


# --------------------------------------------------------------------------- other trees


def test_chexpert_patient_study_tree_stops_pointing_at_its_sheet(tmp_path, capsys):
    root = tmp_path / "CheXpert-v1.0-small"
    for split in ("train", "valid"):
        for p in range(1, 4):
            for study in (1, 2):
                write_image_folder(root / split / f"patient{p:05d}", {f"study{study}": 2}, seed=p)
    (root / "train.csv").write_text("Path,Sex,Pneumonia\n")
    (root / "valid.csv").write_text("Path,Sex,Pneumonia\n")
    message = stopped(root, capsys)
    assert f"{root / 'train'}: folders patient00001/, patient00002/, patient00003/" in message
    assert "patient/study tree" in message and "not classes" in message
    assert f"{root} holds `train.csv`, `valid.csv`" in message
    assert f"--data {root / 'train.csv'}` once it has a `path`" in message
    assert "and a `label` column (it has Path, Sex, Pneumonia)" in message


def test_download_parts_stop_pointing_at_the_metadata(tmp_path, capsys):
    """HAM10000: HAM10000_images_part_1/, _part_2/ and HAM10000_metadata.csv beside them."""
    root = tmp_path / "ham"
    write_image_folder(root, {"HAM10000_images_part_1": 6, "HAM10000_images_part_2": 6})
    (root / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    message = stopped(root, capsys)
    assert "HAM10000_images_part_1/, HAM10000_images_part_2/" in message
    assert "parts of one download, not classes" in message
    assert f"--data {root / 'HAM10000_metadata.csv'}` once it has a `path`" in message
    assert "(it has lesion_id, image_id, dx)" in message


@pytest.mark.parametrize(
    "names",
    [
        ("stage_2_train_images", "stage_2_test_images"),  # RSNA pneumonia (flat DICOM)
        ("ISIC_2019_Training_Input", "ISIC_2019_Test_Input"),
        ("dicom-images-train", "dicom-images-test"),  # SIIM pneumothorax
    ],
)
def test_split_named_download_folders_stop(tmp_path, capsys, names):
    root = write_image_folder(tmp_path / "d", dict.fromkeys(names, 3))
    (root / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n")
    message = stopped(root, capsys)
    assert f"{names[0]}/" in message and f"{names[1]}/" in message
    assert "splits of one download (their names hold train/test/val), not classes" in message
    assert f"--data {root / 'stage_2_train_labels.csv'}`" in message


def test_many_tiny_folders_beside_a_sheet_stop(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", {f"ISIC_{i:07d}": 2 for i in range(12)})
    (root / "labels.tsv").write_text("image\tlabel\n")
    message = stopped(root, capsys)
    assert f"{root}: 12 folders of 2 image(s) each (median) are not classes" in message
    assert f"{root} holds `labels.tsv`; to use its labels, give it with" in message


# --------------------------------------------------------------------------- still classes


def test_many_tiny_folders_without_a_sheet_are_classes(tmp_path):
    root = write_image_folder(tmp_path / "d", {f"c{i:02d}": 2 for i in range(12)})
    index = scan_source(DataConfig(root=str(root)))
    assert len(index.class_names) == 12 and set(counts(index).values()) == {2}


def test_many_classes_of_real_size_beside_a_sheet_are_classes(tmp_path):
    root = write_image_folder(tmp_path / "d", {f"c{i:02d}": 6 for i in range(10)}, size=8)
    (root / "notes.csv").write_text("class,source\n")
    assert counts(scan_source(DataConfig(root=str(root)))) == {f"c{i:02d}": 6 for i in range(10)}


def test_kaggle_split_export_with_a_sheet_and_numbered_classes_passes(tmp_path):
    """Roboflow/Kaggle: train/valid/test with _classes.csv; DR grades named grade_1..3."""
    root = tmp_path / "d"
    for seed, split in enumerate(("train", "valid", "test")):
        write_image_folder(root / split, {"grade_1": 2, "grade_2": 2, "grade_3": 2}, seed=seed)
    (root / "_classes.csv").write_text("filename,grade\n")
    index = scan_source(DataConfig(root=str(root)))
    assert index.class_names == ["grade_1", "grade_2", "grade_3"]
    assert len(index.pool) == 12 and len(index.test) == 6


def test_dicom_class_folders_of_several_patients_pass(tmp_path):
    """Class folders that each hold copied CDs (with their DICOMDIR) of several patients."""
    root = tmp_path / "d"
    for label in ("normal", "pneumonia"):
        for p in range(2):
            cd = root / label / f"{label}_CD{p}"
            for k in range(2):
                write_dicom(cd / "PT000000" / "ST000000" / f"IM{k}", f"{label}-{p}", seed=k)
            (cd / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    index = scan_source(DataConfig(root=str(root), group_from="PatientID"))
    assert counts(index) == {"normal": 4, "pneumonia": 4}
    assert sorted(set(index.pool.groups)) == ["normal-0", "normal-1", "pneumonia-0", "pneumonia-1"]
    assert index.ignored["normal/normal_CD0/DICOMDIR"] == "DICOMDIR (a DICOM export's index)"


# --------------------------------------------------------------------------- patient words


@pytest.mark.parametrize(
    "names",
    [
        [f"Patient {p}" for p in range(1, 7)],  # space separator, as people name folders
        ["Subject 1", "Subject 2", "Subject 3"],
        ["Pt 1", "Pt 2"],
        ["case_00000", "case_00001", "case_00002"],  # KiTS
        ["pid0001", "pid0002"],
        ["ID_0001", "ID_0002", "ID_0003"],
        ["PATIENT_1", "PATIENT_2"],
        ["participant-01", "participant-02"],
    ],
)
def test_patient_folders_with_any_separator_stop(tmp_path, capsys, names):
    root = write_image_folder(tmp_path / "d", dict.fromkeys(names, 3))
    message = stopped(root, capsys)
    assert f"{root}: folders {names[0]}/, {names[1]}/" in message
    assert "patient/study tree" in message and "not classes" in message
    assert f"write a path,label sheet into {root}" in message


@pytest.mark.parametrize(
    "names",
    [
        ("grade_1", "grade_2", "grade_3"),
        ("stage_2", "stage_3"),
        ("Part_1_benign", "Part_1_malignant"),
        ("P1", "P2", "P3"),
        ("S1", "S2"),
        ("Type 1", "Type 2"),
    ],
)
def test_numbered_class_names_that_are_not_patients_pass(tmp_path, names):
    root = write_image_folder(tmp_path / "d", dict.fromkeys(names, 3))
    assert counts(scan_source(DataConfig(root=str(root)))) == dict.fromkeys(names, 3)


def test_patient_date_tree_stops_as_a_patient_tree(tmp_path, capsys):
    """Numeric patient folders holding dated studies (the same dates or not)."""
    root = tmp_path / "d"
    for p, dates in ((1000, ("2019-03-01", "2019-04-01")), (1001, ("2019-03-01", "2019-04-01"))):
        for seed, date in enumerate(dates):
            write_image_folder(root / str(p), {date: 2}, seed=seed)
    write_image_folder(root / "1002", {"20190502_0930": 2})
    message = stopped(root, capsys)
    assert f"{root}: folders 1000/, 1001/, 1002/ are a patient/study tree" in message
    assert "PATIENT/DATE/" in message and "one level off" not in message


def test_one_patients_dated_studies_stop(tmp_path, capsys):
    """A single patient folder is unwrapped as a wrapper: its dates must not become classes."""
    root = tmp_path / "d"
    write_image_folder(root / "MRN12345", {"2019-03-01": 2, "01.04.2019": 2})
    message = stopped(root, capsys)
    assert (
        f"{root / 'MRN12345'}: folders 01.04.2019/, 2019-03-01/ are the studies of one " in message
    )
    assert "patient" in message and "not classes" in message


def test_class_folders_holding_dated_sub_folders_pass(tmp_path):
    root = tmp_path / "d"
    for seed, label in enumerate(("normal", "pneumonia")):
        dates = {f"2019-0{seed + 3}-01": 2, f"2019-0{seed + 3}-02": 2}
        write_image_folder(root / label, dates, seed=seed)
    assert counts(scan_source(DataConfig(root=str(root)))) == {"normal": 4, "pneumonia": 4}


# --------------------------------------------------------------------------- one patient


@pytest.mark.parametrize("series", [1, 2])
def test_one_patient_export_without_dicomdir_stops_as_an_export(tmp_path, capsys, series):
    """ROOT/PT000000/ST00000s/SE00000k/IM*: the lone PT folder is unwrapped, yet the export
    stop wins over the class scan and over "one level off"."""
    root = tmp_path / "export"
    for st in range(2):
        for se in range(series):
            for k in range(2):
                folder = root / "PT000000" / f"ST{st:06d}" / f"SE{se:06d}"
                write_dicom(folder / f"IM{k:06d}", "PAT001", f"1.2.{st}", seed=k)
    (tmp_path / "labels_by_patient.csv").write_text("PatientID,label\nPAT001,a\n")
    message = stopped(root, capsys)
    assert f"{root / 'PT000000'}: folders ST000000/, ST000001/" in message
    assert "DICOM export (PT*/ST*/SE*), not classes" in message
    assert f"--data {tmp_path / 'labels_by_patient.csv'}`" in message
    assert "PatientID,label / StudyInstanceUID,label" in message
    assert "one level off" not in message


def test_one_patients_series_as_a_viewer_exports_them_stop(tmp_path, capsys):
    """`CHEST PA - 1/`, `CHEST LAT - 2/`: every DICOM file has the same PatientID."""
    root = tmp_path / "viewer"
    for s, name in enumerate(("CHEST PA - 1", "CHEST LAT - 2", "ABDOMEN - 3")):
        for k in range(3):
            write_dicom(root / name / f"IM{k}.dcm", "0042", f"1.2.{s}", seed=k)
    message = stopped(root, capsys)
    assert f"{root}: folders ABDOMEN - 3/, CHEST LAT - 2/, CHEST PA - 1/" in message
    assert "one patient (PatientID 0042)" in message and "not classes" in message
    assert "write a sheet StudyInstanceUID,label (or SeriesInstanceUID,label" in message
    assert "PatientID,label" in message and "--data SHEET.csv" in message


def test_dicom_class_folders_sharing_one_of_several_patients_pass(tmp_path):
    """One patient in both folders is not one patient only: the folds handle the overlap."""
    root = tmp_path / "d"
    for label in ("normal", "pneumonia"):
        for k, patient in enumerate(("A", "B", f"{label}-C")):
            write_dicom(root / label / f"{k}.dcm", patient, seed=k)
    assert counts(scan_source(DataConfig(root=str(root)))) == {"normal": 3, "pneumonia": 3}


# --------------------------------------------------------------------------- download copies


@pytest.mark.parametrize(
    "names",
    [
        ("Images", "Images (1)", "Images (2)"),
        ("images (1)", "images (2)"),
        ("train (1)", "train (2)"),
        ("train", "train (2)"),  # beside a split's name: still one download, not a split
    ],
)
def test_browser_download_copies_stop_as_parts(tmp_path, capsys, names):
    root = write_image_folder(tmp_path / "d", dict.fromkeys(names, 3))
    (root / "metadata.csv").write_text("path,label\n")
    message = stopped(root, capsys)
    assert f"{root}: folders " + ", ".join(f"{n}/" for n in sorted(names)) in message
    assert "parts of one download, not classes" in message
    assert f"{root} holds `metadata.csv`; to use its labels, give it with" in message


@pytest.mark.parametrize("uids", ["none", "per image"])
def test_dicom_anonymised_to_one_patient_id_pass(tmp_path, uids):
    """Case 06: every file says PatientID SYN0001, with no study/series UIDs or a new study per
    image; the folders are not one study or series each, so they stay classes."""
    root = tmp_path / "d"
    for label in ("normal", "pneumonia"):
        for k in range(3):
            study = f"1.2.{label == 'normal':d}.{k}" if uids == "per image" else ""
            write_dicom(root / label / f"{k}.dcm", "SYN0001", study, seed=k)
    assert counts(scan_source(DataConfig(root=str(root)))) == {"normal": 3, "pneumonia": 3}
