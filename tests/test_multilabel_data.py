"""Several findings per image (issue 32), the data side: CheXpert-, NIH- and ChestMNIST-shaped
sources read as their users expect (raw codes 1/0/-1/NaN, patients, findings), one-line
refusals, the inspector's per-finding counts, and folds stratified on several findings with
patients kept whole. No Ray; every input is built in tmp_path.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distmed.config import CVConfig, DataConfig, load_config
from distmed.cv import gaps_in_test_split, make_folds, thin_validation_folds
from distmed.data import Split, format_summary, inspect_index, scan_source
from distmed.errors import UserError
from distmed.task import MultilabelTask

NAN = math.nan


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value % 256, dtype=np.uint8)).save(path)


def _config(tmp_path: Path, **data) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **data)


def _same(actual: np.ndarray, expected: list[list[float]]) -> bool:
    return bool(np.array_equal(actual, np.array(expected, dtype=np.float32), equal_nan=True))


# --------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Edema,Pleural Effusion"
# (patient, study, view, cells of No Finding, Edema, Pleural Effusion) as CheXpert writes them
CHEXPERT_ROWS = [
    (1, 1, "view1_frontal", "", "1.0", "-1.0"),
    (1, 1, "view2_lateral", "", "1.0", "-1.0"),
    (1, 2, "view1_frontal", "1.0", "0.0", ""),
    (2, 1, "view1_frontal", "", "-1", "1"),
    (3, 1, "view1_frontal", "1", "0", "0"),
]
CHEXPERT_CODES = [
    [NAN, 1, -1],
    [NAN, 1, -1],
    [1, 0, NAN],
    [NAN, -1, 1],
    [1, 0, 0],
]


def _chexpert(tmp_path: Path, extra_rows: tuple[str, ...] = ()) -> Path:
    """CheXpert-v1.0-small/{train.csv, train/patientNNNNN/studyN/viewN_*.jpg}: the sheet's
    paths start with the set's own folder, as in the downloaded archive."""
    root = tmp_path / "CheXpert-v1.0-small"
    lines = [CHEXPERT_HEADER]
    for n, (patient, study, view, *cells) in enumerate(CHEXPERT_ROWS):
        rel = f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/{view}.jpg"
        _image(tmp_path / rel, 40 * n)
        sex, side = ("Female", "Lateral") if "lateral" in view else ("Male", "Frontal")
        lines.append(",".join([rel, sex, "68", side, "AP", *cells]))
    lines += extra_rows
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def test_a_chexpert_sheet_reads_as_its_users_expect(tmp_path):
    sheet = _chexpert(tmp_path)
    index = scan_source(_config(tmp_path, root=str(sheet), task="multilabel"))
    assert index.multilabel
    # every column but CheXpert's reserved ones is a finding, in the sheet's order
    assert index.class_names == ["No Finding", "Edema", "Pleural Effusion"]
    assert index.pool.labels.dtype == np.float32
    assert _same(index.pool.labels, CHEXPERT_CODES)  # raw codes: no policy applied
    assert index.pool.groups.tolist() == ["patient00001"] * 3 + ["patient00002", "patient00003"]
    # paths are found from the folder above the sheet's (the set's folder starts each path)
    assert index.pool.paths[0] == (
        tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    )
    assert index.pool.ids[3] == "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"
    assert index.test is None and "3 findings per image" in index.layout
    assert "patients from the paths' patientNNNNN folders" in index.layout


def _suggested_setting(message: str) -> str:
    """The KEY=VALUE of the `--set` a refusal suggests, as the shell passes it."""
    after = shlex.split(message.split("; add --set ", 1)[1].split(" (or ", 1)[0])
    assert len(after) == 1, message
    return after[0]


@pytest.mark.parametrize("reader_column", [False, True], ids=["findings-only", "text-column"])
def test_a_chexpert_sheet_without_the_multilabel_key_says_which_set_to_add(tmp_path, reader_column):
    """CheXpert's sheet given without data.task=multilabel was refused as lacking 'label',
    naming neither the form nor the key (new-user try): one line naming both, and the
    setting it suggests reads the sheet."""
    sheet = _chexpert(tmp_path)
    if reader_column:  # a text column beside the findings: task=multilabel would read it too
        lines = sheet.read_text().splitlines()
        lines = [lines[0] + ",Reader"] + [line + ",dr smith" for line in lines[1:]]
        sheet.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as refused:
        scan_source(_config(tmp_path, root=str(sheet)))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"data.manifest {sheet}: no 'label'")
    assert "several findings per image" in message
    assert "No Finding, Edema, Pleural Effusion hold 1/0/-1/blank" in message
    setting = _suggested_setting(message)
    if reader_column:
        assert setting == "data.label_columns=[No Finding, Edema, Pleural Effusion]"
    else:
        assert setting == "data.task=multilabel"
    cfg = load_config(None, [f"data.root={sheet}", f"data.cache_dir={tmp_path}/c", setting])
    index = scan_source(cfg.data)
    assert index.multilabel and index.class_names == ["No Finding", "Edema", "Pleural Effusion"]


def test_a_single_label_sheet_missing_its_label_column_is_not_called_multilabel(tmp_path):
    sheet = _chexpert(tmp_path)
    rows = sheet.read_text().splitlines()
    keep = [",".join(line.split(",")[:6]) for line in rows]  # Path, metadata, one finding
    sheet.write_text("\n".join(keep) + "\n")
    with pytest.raises(UserError, match="needs columns 'path' and 'label'") as refused:
        scan_source(_config(tmp_path, root=str(sheet)))
    assert "data.task=multilabel" not in str(refused.value)


def test_a_patient_rule_or_column_replaces_the_patient_folders(tmp_path):
    sheet = _chexpert(tmp_path)
    by_study = _config(tmp_path, root=str(sheet), task="multilabel",
                       group_regex=r"(patient\d+/study\d+)")  # fmt: skip
    index = scan_source(by_study)
    assert index.pool.groups.tolist()[:3] == ["patient00001/study1"] * 2 + ["patient00001/study2"]
    assert "patientNNNNN" not in index.layout
    # a path without a patient folder: no patients guessed, folds by image
    lines = sheet.read_text().splitlines()
    _image(sheet.parent / "extra.jpg", 9)
    sheet.write_text("\n".join([*lines, "extra.jpg,Male,1,Frontal,AP,,1,0"]) + "\n")
    assert scan_source(_config(tmp_path, root=str(sheet), task="multilabel")).pool.groups is None


def test_label_columns_choose_and_order_the_findings(tmp_path):
    sheet = _chexpert(tmp_path)
    index = scan_source(
        _config(tmp_path, root=str(sheet), label_columns=["pleural effusion", "Edema"])
    )
    assert index.class_names == ["Pleural Effusion", "Edema"]  # as the header spells them
    assert _same(index.pool.labels, [[row[2], row[1]] for row in CHEXPERT_CODES])


def test_a_sheet_beside_the_set_folder_reads_the_same(tmp_path):
    sheet = _chexpert(tmp_path)
    beside = tmp_path / "train.csv"  # the same sheet in the folder that holds the set
    beside.write_text(sheet.read_text())
    inside = scan_source(_config(tmp_path, root=str(sheet), task="multilabel"))
    outside = scan_source(_config(tmp_path, root=str(beside), task="multilabel"))
    assert outside.pool.paths == inside.pool.paths
    assert _same(outside.pool.labels, CHEXPERT_CODES)


def test_a_missing_chexpert_path_names_the_row_and_both_folders(tmp_path):
    missing = "CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg,Male,1,F,AP,,1,0"
    sheet = _chexpert(tmp_path, (missing,))
    with pytest.raises(UserError) as info:
        scan_source(_config(tmp_path, root=str(sheet), task="multilabel"))
    message = str(info.value)
    assert "row 7" in message and "patient00009" in message and "\n" not in message
    assert str(sheet.parent) in message and f"nor in {tmp_path}" in message


def test_a_path_found_from_both_folders_is_ambiguous(tmp_path):
    sheet = _chexpert(tmp_path)
    rel = "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg"
    _image(sheet.parent / rel, 7)  # a copy nested one level deeper
    with pytest.raises(UserError, match=r"row 6: .*patient00003.* ambiguous"):
        scan_source(_config(tmp_path, root=str(sheet), task="multilabel"))


@pytest.mark.parametrize("value", ["2", "yes", "0.5", "Edema|Effusion"])
def test_a_cell_that_is_no_code_is_one_line_naming_it(tmp_path, value):
    rel = "CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg"
    _image(tmp_path / rel, 3)
    sheet = _chexpert(tmp_path, (f"{rel},Male,1,Frontal,AP,,{value},0",))
    with pytest.raises(UserError) as info:
        scan_source(_config(tmp_path, root=str(sheet), task="multilabel"))
    message = str(info.value)
    assert str(sheet) in message and "row 7" in message and "'Edema'" in message
    assert repr(value) in message and "\n" not in message
    assert ("data.label_delimiter" in message) == ("|" in value)


def test_a_patient_regex_that_misses_a_path_names_it(tmp_path):
    sheet = _chexpert(tmp_path)
    with pytest.raises(UserError, match="matches neither file name view1_frontal.jpg nor its"):
        scan_source(_config(tmp_path, root=str(sheet), task="multilabel",
                            group_regex=r"(subject\d+)"))  # fmt: skip


def test_finding_names_in_the_config_are_checked_after_the_scan(tmp_path):
    sheet = _chexpert(tmp_path)
    for key, value in (
        ("uncertain", {"Edema": "ones", "Cardiomegaly": "zeros"}),
        ("missing", {"Atelectasis": "zeros"}),
        ("score_findings", ["Edema", "Consolidation"]),
    ):
        with pytest.raises(UserError) as info:
            scan_source(_config(tmp_path, root=str(sheet), task="multilabel", **{key: value}))
        message = str(info.value)
        assert message.startswith(f"data.{key}: ") and "\n" not in message
        assert "findings: No Finding, Edema, Pleural Effusion" in message
    fine = _config(tmp_path, root=str(sheet), task="multilabel", uncertain={"Edema": "ones"},
                   score_findings=["Edema"])  # fmt: skip
    assert scan_source(fine).class_names[1] == "Edema"


def test_a_misspelt_finding_in_the_config_suggests_the_sheets_finding(tmp_path):
    sheet = _chexpert(tmp_path)
    cfg = _config(tmp_path, root=str(sheet), task="multilabel", score_findings=["Pleural Efusion"])
    with pytest.raises(UserError, match=r"did you mean 'Pleural Effusion'\?$"):
        scan_source(cfg)


def test_multilabel_keys_on_a_single_label_source_are_refused(tmp_path):
    sheet = tmp_path / "labels.csv"
    for n in range(4):
        _image(tmp_path / f"{n}.png", n)
    sheet.write_text("path,label\n" + "".join(f"{n}.png,{'ab'[n % 2]}\n" for n in range(4)))
    with pytest.raises(UserError, match=r"^data.score_findings: labels was read as one label"):
        scan_source(_config(tmp_path, root=str(sheet), score_findings=["a"]))


# --------------------------------------------------------------------------- NIH-14

NIH_SETS = ["No Finding", "Effusion", "Atelectasis|Effusion", "", "Cardiomegaly|Effusion"]


def _nih(tmp_path: Path, sets=NIH_SETS, header="path,Finding Labels,group") -> Path:
    lines = [header]
    for n, found in enumerate(sets):
        _image(tmp_path / "images" / f"{n:08d}_000.png", n)
        lines.append(f"images/{n:08d}_000.png,{found},{n // 2}")
    sheet = tmp_path / "Data_Entry.csv"
    sheet.write_text("\n".join(lines) + "\n")
    return sheet


def test_a_delimited_set_column_gives_sorted_findings(tmp_path):
    sheet = _nih(tmp_path)
    cfg = _config(tmp_path, root=str(sheet), label_delimiter="|", no_finding="No Finding",
                  label_columns=["Finding Labels"])  # fmt: skip
    index = scan_source(cfg)
    assert index.multilabel and index.class_names == ["Atelectasis", "Cardiomegaly", "Effusion"]
    assert _same(index.pool.labels, [[0, 0, 0], [0, 0, 1], [1, 0, 1], [NAN] * 3, [0, 1, 1]])
    assert index.pool.groups.tolist() == ["0", "0", "1", "1", "2"]  # the group column


@pytest.mark.parametrize("delimiter", ["|", ";"])
def test_a_set_column_named_without_its_delimiter_names_the_key_and_the_delimiter(
    tmp_path, delimiter
):
    """NIH's 'Finding Labels' given as data.label_columns without data.label_delimiter: the
    first bad cell ('No Finding') holds no delimiter, the column does; the line says which."""
    sets = [found.replace("|", delimiter) for found in NIH_SETS]
    sheet = _nih(tmp_path, sets=sets)
    with pytest.raises(UserError) as info:
        scan_source(_config(tmp_path, root=str(sheet), label_columns=["Finding Labels"]))
    message = str(info.value)
    assert "row 2" in message and "'Finding Labels'" in message and "\n" not in message
    assert f"set data.label_delimiter: {delimiter!r}" in message


def test_a_set_column_named_label_needs_no_label_columns(tmp_path):
    sheet = _nih(tmp_path, header="path,label,group")
    index = scan_source(_config(tmp_path, root=str(sheet), label_delimiter="|"))
    # without data.no_finding, 'No Finding' is a finding like any other
    assert index.class_names == ["Atelectasis", "Cardiomegaly", "Effusion", "No Finding"]


def test_no_finding_beside_a_finding_is_one_line(tmp_path):
    sheet = _nih(tmp_path, sets=["Effusion", "No Finding|Effusion"], header="path,label,group")
    with pytest.raises(UserError, match=r"row 3: 'No Finding\|Effusion' lists 'No Finding'"):
        scan_source(_config(tmp_path, root=str(sheet), label_delimiter="|",
                            no_finding="No Finding"))  # fmt: skip


def test_one_finding_spelled_two_ways_is_one_line(tmp_path):
    sheet = _nih(tmp_path, sets=["Effusion", "effusion |Mass", "Mass"], header="path,label,group")
    with pytest.raises(UserError, match=r"spells one finding several ways \('Effusion' = 'eff"):
        scan_source(_config(tmp_path, root=str(sheet), label_delimiter="|"))


def test_a_wrong_delimiter_does_not_turn_sets_into_findings(tmp_path):
    """Split on ',' an NIH cell 'Atelectasis|Effusion' stays whole: refused, naming '|'."""
    sheet = _nih(tmp_path, header="path,label,group")
    with pytest.raises(UserError, match=r"split on ',' leaves 'Atelectasis\|Effusion'.*'\|'"):
        scan_source(_config(tmp_path, root=str(sheet), label_delimiter=","))


def test_a_no_finding_value_in_no_cell_is_one_line(tmp_path):
    """A misspelt data.no_finding would make 'No Finding' a finding of its own: refused."""
    sheet = _nih(tmp_path, header="path,label,group")
    with pytest.raises(UserError, match=r"data.no_finding 'NoFinding' is in no cell"):
        scan_source(_config(tmp_path, root=str(sheet), label_delimiter="|",
                            no_finding="NoFinding"))  # fmt: skip


def test_a_sheet_keyed_by_patient_id_cannot_say_several_findings(tmp_path):
    sheet = tmp_path / "labels.csv"
    sheet.write_text("PatientID,label\nP1,Effusion|Mass\n")
    with pytest.raises(UserError, match="keyed by PatientID gives one label per image"):
        scan_source(_config(tmp_path, root=str(sheet), label_delimiter="|"))


def test_single_label_refusal_of_label_sets_points_at_the_delimiter(tmp_path):
    sheet = _nih(tmp_path, sets=["No Finding", "Effusion", "Atelectasis|Effusion", "Effusion"],
                 header="path,label,group")  # fmt: skip
    with pytest.raises(UserError, match=r"set data.label_delimiter: '\|' to learn one output"):
        scan_source(_config(tmp_path, root=str(sheet)))


def test_a_missing_set_column_lists_the_header(tmp_path):
    sheet = _nih(tmp_path)  # 'Finding Labels', not 'label'
    with pytest.raises(UserError, match=r"no column 'label' .*the header has path, Finding La"):
        scan_source(_config(tmp_path, root=str(sheet), label_delimiter="|"))


# --------------------------------------------------------------------------- .npz and folders


def _npz(path: Path, labels: dict[str, np.ndarray]) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, values in labels.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(values), 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = values
    np.savez(path, **arrays)
    return path


def test_an_npz_of_zero_one_columns_is_multilabel(tmp_path):
    train = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=np.uint8)
    path = _npz(tmp_path / "chest.npz", {"train": train, "val": train[:1], "test": train[1:]})
    index = scan_source(_config(tmp_path, root=str(path)))
    assert index.multilabel and index.class_names == ["finding_0", "finding_1", "finding_2"]
    assert _same(index.pool.labels, [*train.tolist(), train[0].tolist()])
    assert _same(index.test.labels, train[1:].tolist())
    named = _config(tmp_path, root=str(path), class_names=["Atelectasis", "Effusion", "Mass"])
    assert scan_source(named).class_names == ["Atelectasis", "Effusion", "Mass"]
    with pytest.raises(UserError, match=r"labels have 3 columns, one per finding; give 3"):
        scan_source(_config(tmp_path, root=str(path), class_names=["a", "b"]))


def test_npz_columns_of_other_values_are_refused_unless_asked(tmp_path):
    train = np.array([[1, -1], [0, 1], [0, 0]], dtype=np.int8)
    path = _npz(tmp_path / "u.npz", {"train": train, "val": train, "test": train})
    with pytest.raises(UserError, match=r"2 columns holding values other than 0/1 \(train_lab"):
        scan_source(_config(tmp_path, root=str(path)))
    index = scan_source(_config(tmp_path, root=str(path), task="multilabel"))
    assert _same(index.pool.labels[:3], train.tolist())
    bad = _npz(tmp_path / "b.npz", {"train": train * 2, "val": train, "test": train})
    with pytest.raises(UserError, match=r"other than 1, 0, -1 .*train_labels -2 x1, 2 x2"):
        scan_source(_config(tmp_path, root=str(bad), task="multilabel"))


def test_a_class_folder_cannot_say_several_findings(tmp_path):
    for name in ("Effusion", "Mass"):
        for n in range(3):
            _image(tmp_path / "d" / name / f"{n}.png", n)
    with pytest.raises(UserError) as info:
        scan_source(_config(tmp_path, root=str(tmp_path / "d"), task="multilabel"))
    message = str(info.value)
    assert "gives one label per image" in message and "data.manifest" in message
    assert "\n" not in message


def test_config_refuses_contradictory_finding_keys():
    with pytest.raises(UserError, match="label_columns names the ONE column"):
        load_config(None, ["data.label_delimiter=|", "data.label_columns=[a, b]"])
    with pytest.raises(UserError, match="positive_class is for binary tasks"):
        load_config(None, ["data.task=multilabel", "data.positive_class=a"])
    with pytest.raises(UserError, match=r"data.uncertain: .*ignore/ones/zeros, or a mapping"):
        load_config(None, ["data.uncertain.Edema=maybe"])
    cfg = load_config(None, ["data.uncertain.Edema=ones", "data.missing=zeros"]).data
    assert cfg.uncertain == {"Edema": "ones"} and cfg.missing == "zeros"


# --------------------------------------------------------------------------- fingerprint


def test_the_fingerprint_changes_with_a_code(tmp_path):
    sheet = _chexpert(tmp_path)
    cfg = _config(tmp_path, root=str(sheet), task="multilabel")
    before = scan_source(cfg).fingerprint
    sheet.write_text(sheet.read_text().replace(",1,0,0\n", ",1,0,-1\n"))
    after = scan_source(cfg)
    assert after.pool.labels[4, 2] == -1 and after.fingerprint != before


# --------------------------------------------------------------------------- inspector


def test_the_inspector_counts_codes_per_finding_and_split(tmp_path):
    rows = [  # split, A, B
        ("train", "1", "-1"),
        ("train", "0", ""),
        ("train", "", "1"),
        ("val", "-1", "0"),
        ("test", "1", "1"),
        ("test", "0", "0"),
    ]
    lines = ["path,A,B,split,group"]
    for n, (split, a, b) in enumerate(rows):
        _image(tmp_path / f"{n}.png", 30 * n)
        lines.append(f"{n}.png,{a},{b},{split},p{n % 3}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    cfg = _config(tmp_path, root=str(tmp_path / "m.csv"), task="multilabel")
    summary = inspect_index(scan_source(cfg), cfg)
    splits = summary["splits"]
    assert summary["multilabel"] and summary["classes"] == ["A", "B"]
    assert splits["train"]["per_finding"] == {
        "A": {"positive": 1, "negative": 1, "uncertain": 0, "missing": 1},
        "B": {"positive": 1, "negative": 0, "uncertain": 1, "missing": 1},
    }
    assert splits["val"]["per_finding"]["A"] == {
        "positive": 0, "negative": 0, "uncertain": 1, "missing": 0,
    }  # fmt: skip
    # images with no positive finding: train row 2 (0, blank), val (-1, 0), test (0, 0)
    assert [splits[s]["no_positive"] for s in ("train", "val", "test")] == [1, 1, 1]
    assert [splits[s]["images"] for s in ("train", "val", "test")] == [3, 1, 2]
    # patients with a positive, per finding: A in train p0; B in train p2 (row 2)
    assert summary["patients"]["per_class"]["train"] == {"A": 1, "B": 1}
    text = format_summary(summary)
    assert "findings (2): A, B" in text and "train: 3 images, 1 with no positive finding" in text
    assert any(line.split() == ["B", "train", "1", "0", "1", "1"] for line in text.splitlines())
    short = format_summary(summary, short=True).splitlines()  # what a run prints at its start
    assert ["B", "train", "1/0/1/1", "val", "0/1/0/0", "test", "1/1/0/0"] in [
        line.split() for line in short
    ]


# --------------------------------------------------------------------------- folds


@dataclass(frozen=True)
class StandIn:
    """The multi-label task's fold interface (contract: `stratify_key` (N, L) int8, 1 where
    the target is positive; `scored` findings), without the task itself."""

    class_names: tuple[str, ...]
    scored: tuple[str, ...]

    def stratify_key(self, labels: np.ndarray) -> np.ndarray:
        return (np.asarray(labels) == 1).astype(np.int8)  # U-Ignore: -1 and NaN are not positive


def _patients(n_patients: int = 60, seed: int = 0) -> tuple[Split, StandIn]:
    """Patients of 1-3 images; findings of prevalence 40%, 20%, 10% and one of 2 patients."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for patient in range(n_patients):
        risk = rng.random(3) < (0.4, 0.2, 0.1)
        rare = patient in (5, 17)
        for _ in range(rng.integers(1, 4)):
            row = [1.0 if r and rng.random() < 0.8 else 0.0 for r in risk] + [float(rare)]
            if rng.random() < 0.1:
                row[0] = -1.0 if rng.random() < 0.5 else NAN
            labels.append(row)
            groups.append(f"patient{patient:05d}")
    codes = np.array(labels, dtype=np.float32)
    split = Split(ids=[str(i) for i in range(len(codes))], labels=codes,
                  groups=np.array(groups, dtype=object))  # fmt: skip
    names = ("Effusion", "Edema", "Mass", "Hernia")
    return split, StandIn(names, names)


def test_multilabel_folds_keep_patients_whole_and_every_finding_in_every_fold(tmp_path):
    split, task = _patients()
    cfg = CVConfig(folds=5, repeats=2, seed=3)
    assignment = make_folds(split, cfg, task)
    assert assignment.shape == (2, len(split)) and set(np.unique(assignment)) == set(range(5))
    key = task.stratify_key(split.labels)
    for row in assignment:
        for patient in np.unique(split.groups):
            assert len(set(row[split.groups == patient])) == 1  # one fold per patient
        for j in range(3):  # the findings with >= 5 positive patients
            assert all(key[row == k, j].any() for k in range(5)), task.class_names[j]
    assert not np.array_equal(assignment[0], assignment[1])  # repeat r: seed cv.seed + r
    # seeded: the same call gives the same folds; repeat 1 is seed 4's repeat 0
    assert np.array_equal(make_folds(split, cfg, task), assignment)
    again = make_folds(split, CVConfig(folds=5, seed=4), task)
    assert np.array_equal(again[0], assignment[1])


def test_multilabel_folds_spread_each_findings_positive_patients_evenly(tmp_path):
    split, task = _patients(n_patients=200, seed=1)
    key = task.stratify_key(split.labels)
    row = make_folds(split, CVConfig(folds=5), task)[0]
    for j in range(3):
        per_fold = [len(set(split.groups[(row == k) & (key[:, j] == 1)])) for k in range(5)]
        # iterative stratification deals a finding's positive patients out fold by fold
        assert max(per_fold) - min(per_fold) <= 1, (task.class_names[j], per_fold)


def test_ungrouped_multilabel_folds_and_a_lone_finding(tmp_path):
    split, _ = _patients()
    images = Split(ids=split.ids, labels=split.labels[:, :1])  # one finding, no patients
    task = StandIn(("Effusion",), ("Effusion",))
    row = make_folds(images, CVConfig(folds=4), task)[0]
    positives = images.labels[:, 0] == 1
    counts = [int(positives[row == k].sum()) for k in range(4)]
    assert max(counts) - min(counts) <= 1  # the lone finding spread evenly
    sizes = np.bincount(row, minlength=4)
    assert sizes.max() - sizes.min() <= 1


def test_too_few_patients_for_the_folds_is_one_line():
    split = Split(ids=["a", "b", "c"], labels=np.eye(3, dtype=np.float32),
                  groups=np.array(["p1", "p1", "p2"], dtype=object))  # fmt: skip
    with pytest.raises(UserError, match="2 patient groups, fewer than cv.folds=3"):
        make_folds(split, CVConfig(folds=3), StandIn(("a", "b", "c"), ("a", "b", "c")))


def test_fold_warnings_count_a_findings_positives(tmp_path):
    split, task = _patients()
    assignment = make_folds(split, CVConfig(folds=5), task)
    key = task.stratify_key(split.labels)
    warning = thin_validation_folds(key, assignment, list(task.class_names), 5)
    hernia = ", ".join(str(int(key[assignment[0] == k, 3].sum())) for k in range(5))
    assert warning is not None
    assert f"5 of 5 hold fewer than 5 positive images of finding 'Hernia' ({hernia})" in warning


def test_the_test_split_warning_names_a_finding_without_positives(tmp_path):
    lines = ["path,A,B,split"]
    for n in range(8):
        _image(tmp_path / f"{n}.png", n)
        lines.append(f"{n}.png,{n % 2},{int(n == 1)},{'test' if n >= 6 else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    index = scan_source(_config(tmp_path, root=str(tmp_path / "m.csv"), task="multilabel"))
    gaps = gaps_in_test_split(index, MultilabelTask(("A", "B")))
    assert gaps is not None and "has no positive image of finding 'B'" in gaps
    assert "fewer than 5 positive images of finding 'A' (1)" in gaps


def test_a_scored_finding_missing_from_a_fold_stops_the_run():
    """Iterative stratification does not promise a positive in every fold; the check does."""
    from distmed.cv import _check_finding_folds

    positive = np.array([[1, 0]] * 5 + [[0, 1]] * 5, dtype=bool)  # 5 positive patients each
    assignment = np.array([0, 0, 1, 2, 3, 0, 1, 2, 3, 4])  # finding A: none in fold 4
    cfg = CVConfig(folds=5)
    with pytest.raises(UserError, match=r"cv fold 4 has no validation image positive for "
                                        r"finding 'A' \(5 positive"):  # fmt: skip
        _check_finding_folds(
            positive, positive, assignment, cfg, StandIn(("A", "B"), ("A", "B")), 0
        )
    # not scored: its AUC is not in the score, so its folds are not checked
    _check_finding_folds(positive, positive, assignment, cfg, StandIn(("A", "B"), ("B",)), 0)


def test_an_unused_patient_id_column_stops_instead_of_leaking(tmp_path):
    """NIH's 'Patient ID' beside no group column: folds would split a patient's images."""
    sheet = _nih(tmp_path, header="path,label,Patient ID")
    with pytest.raises(UserError, match=r"column 'Patient ID' looks like the patient id"):
        scan_source(_config(tmp_path, root=str(sheet), label_delimiter="|"))
