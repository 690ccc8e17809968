"""--resume restores only Tune state this machine recorded its search writing: a crafted
`tuner.pkl` (or any edited or added state file) is refused before Ray unpickles it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from distmed import tune
from distmed.errors import UserError
from distmed.searchfile import SEARCH_FILE, search_record
from distmed.space import load_space
from distmed.tunestate import (
    RecordTuneState,
    check_state,
    record_path,
    remember,
    sha256_bytes,
)

SPACE = str(Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml")


class _Payload:
    """Unpickling this creates `marker`: what a hostile tuner.pkl could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted_tuner_pkl(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))


def _record_tune_state(staging: Path, experiment: str) -> None:
    """What RecordTuneState does in the driver when Tune has saved into `staging`."""
    trials = [SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=staging))]
    RecordTuneState(experiment).on_step_end(0, trials)


def test_a_crafted_tuner_pkl_is_refused_and_never_unpickled(tmp_path: Path):
    exp = tmp_path / "runs" / "shared"
    marker = tmp_path / "payload-ran"
    _crafted_tuner_pkl(exp, marker)
    with pytest.raises(UserError, match="no record of the Tune state") as caught:
        check_state(str(exp))
    assert "\n" not in str(caught.value) and "new --name" in str(caught.value)
    remember(str(exp), {"tuner.pkl": sha256_bytes(b"what Tune wrote")})  # a record, other bytes
    with pytest.raises(UserError, match=r"shared/tuner.pkl is not Tune state this search wrote"):
        check_state(str(exp))
    assert not marker.exists()


def test_cli_resume_refuses_a_crafted_tuner_pkl_before_ray(tmp_path: Path, capsys):
    storage, marker = tmp_path / "runs", tmp_path / "payload-ran"
    exp = storage / "shared"
    _crafted_tuner_pkl(exp, marker)  # beside the record of a search started with this space
    (exp / SEARCH_FILE).write_text(json.dumps(search_record(load_space(SPACE, []))))
    argv = ["--space", SPACE, "--storage", str(storage), "--name", "shared", "--resume"]
    assert tune.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "running any code in it" in err
    assert out == "" and not marker.exists()  # refused before the data or Ray


def test_state_tune_wrote_is_accepted_and_an_edit_or_addition_refused(tmp_path: Path):
    staging, exp = tmp_path / "staging", tmp_path / "runs" / "mine"
    staging.mkdir()
    exp.mkdir(parents=True)
    state = "experiment_state-2026-01-01_00-00-00.json"
    (staging / state).write_text('{"v": 1}')
    _record_tune_state(staging, str(exp))
    (staging / state).write_text('{"v": 22}')  # Tune's next save; storage may hold either
    _record_tune_state(staging, str(exp))
    remember(str(exp), {"tuner.pkl": sha256_bytes(b"tuner")})
    (exp / "tuner.pkl").write_bytes(b"tuner")
    (exp / "search_space.json").write_text("{}")  # distmed's own file: not Tune state
    for version in ('{"v": 1}', '{"v": 22}'):  # a driver killed mid-upload left the older
        (exp / state).write_text(version)
        check_state(str(exp))
    (exp / state).write_text('{"v": 333}')
    with pytest.raises(UserError, match=state):
        check_state(str(exp))
    (exp / state).write_text('{"v": 22}')
    (exp / "searcher-state-x.pkl").write_bytes(b"added")  # Ray would read it too
    with pytest.raises(UserError, match="searcher-state-x.pkl"):
        check_state(str(exp))


def test_an_unreadable_record_is_one_line_saying_how_to_start_fresh(tmp_path: Path):
    exp = tmp_path / "runs" / "torn"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"x")
    record_path(str(exp)).parent.mkdir(parents=True, exist_ok=True)
    record_path(str(exp)).write_text("{not json")
    with pytest.raises(UserError, match="cannot be read.*new --name"):
        check_state(str(exp))


def test_records_live_outside_the_storage_folder(tmp_path: Path):
    exp = str(tmp_path / "runs" / "x")
    assert not record_path(exp).is_relative_to(tmp_path / "runs")
