"""--resume continues the search a name was started with, or refuses (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_image_folder

from distmed import tune
from distmed.data import scan_source
from distmed.errors import UserError
from distmed.searchfile import (
    NEWER_KEYS,
    SEARCH_FILE,
    check_new_search,
    check_same_images,
    check_same_search,
    record_search,
)
from distmed.space import load_space

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def _record(exp: str, overrides: tuple[str, ...] = ()) -> None:
    spec = load_space(DEMO, list(overrides))
    record_search(exp, spec, scan_source(spec.base.data))


def test_a_resume_with_other_trial_settings_is_refused_naming_them(tmp_path):
    exp = str(tmp_path / "exp")
    _record(exp)
    check_same_search(exp, load_space(DEMO))  # the same file: fine
    # Where the images sit, how many workers, which loggers: may change on resume.
    moved = ["data.root=/elsewhere", "scaling.num_workers=2", "tracking.wandb.project=p"]
    check_same_search(exp, load_space(DEMO, moved))
    with pytest.raises(UserError) as info:
        check_same_search(exp, load_space(DEMO, ["train.epochs=40"]))
    message = str(info.value)
    assert "base.train.epochs was 8, now 40" in message and "new --name" in message
    assert len(message.splitlines()) == 1


def test_an_edited_range_or_trial_count_is_a_different_search(tmp_path):
    exp = str(tmp_path / "exp")
    spec = load_space(DEMO)
    _record(exp)
    with pytest.raises(UserError, match="search.num_samples"):
        check_same_search(exp, spec.with_search(num_samples=spec.search.num_samples + 1))
    edited = tmp_path / "edited.yaml"
    edited.write_text(DEMO.read_text().replace("loguniform: [3.0e-4", "loguniform: [2.0e-4"))
    with pytest.raises(UserError, match="space.optim.lr"):
        check_same_search(exp, load_space(edited))


def test_a_new_search_under_a_used_name_is_refused_and_nothing_is_not_resumed(tmp_path):
    exp = str(tmp_path / "exp")
    check_new_search(exp)  # nothing there yet
    with pytest.raises(UserError, match="no search to continue at"):
        check_same_search(exp, load_space(DEMO))
    _record(exp)
    with pytest.raises(UserError, match="exists; continue it with --resume"):
        check_new_search(exp)
    assert (tmp_path / "exp" / SEARCH_FILE).is_file()


def test_a_plain_search_is_not_resumed_as_a_nested_one_nor_back(tmp_path):
    plain, nested = str(tmp_path / "plain"), str(tmp_path / "nested")
    _record(plain)
    spec = load_space(DEMO)
    record_search(nested, spec, scan_source(spec.base.data), nested=3)
    with pytest.raises(UserError, match="nested was None, now 2"):
        check_same_search(plain, spec, nested=2)
    with pytest.raises(UserError, match="nested was 3, now None"):
        check_same_search(nested, spec)
    with pytest.raises(UserError, match="nested was 3, now 2"):
        check_same_search(nested, spec, nested=2)
    check_same_search(nested, spec, nested=3)


def test_the_cli_refuses_before_any_work(tmp_path, capsys):
    _record(str(tmp_path / "runs" / "demo-1"))
    argv = ["--space", str(DEMO), "--storage", str(tmp_path / "runs"), "--name", "demo-1"]
    assert tune.main([*argv, "--resume", "--set", "train.epochs=3"]) == 2  # base: 8
    assert "base.train.epochs was" in capsys.readouterr().err
    assert tune.main(argv) == 2
    assert "exists; continue it with --resume" in capsys.readouterr().err


def test_a_resume_on_other_images_is_refused_and_a_moved_folder_is_not(tmp_path):
    first = write_image_folder(tmp_path / "a", {"neg": 4, "pos": 4})
    exp = str(tmp_path / "exp")
    _record(exp, (f"data.root={first}",))

    def resume_on(root: Path) -> None:  # as distmed.tune does: the settings, then the images
        spec = load_space(DEMO, [f"data.root={root}"])
        check_same_images(exp, check_same_search(exp, spec), scan_source(spec.base.data))

    moved = tmp_path / "moved"
    first.rename(moved)  # the same files elsewhere: data.root may change on resume
    resume_on(moved)
    # The same file names and labels, other images; then one image more.
    other = write_image_folder(tmp_path / "other", {"neg": 4, "pos": 4}, size=20)
    with pytest.raises(UserError, match="was started on other images"):
        resume_on(other)
    grown = write_image_folder(tmp_path / "grown", {"neg": 4, "pos": 5})
    with pytest.raises(UserError, match="was started on other images"):
        resume_on(grown)


def test_a_resume_with_another_sampler_setting_is_refused(tmp_path):
    # Tune restores the pickled sampler: a changed setting would silently not apply.
    exp = str(tmp_path / "exp")
    _record(exp)
    edited = tmp_path / "edited.yaml"
    edited.write_text(
        DEMO.read_text().replace(
            "  max_concurrent: 2\n",
            "  max_concurrent: 2\n  sampler:\n    multivariate: false\n    group: false\n",
        )
    )
    with pytest.raises(UserError, match="search.sampler.group was True, now False"):
        check_same_search(exp, load_space(edited))


def test_a_search_recorded_before_sampler_settings_existed_still_resumes(tmp_path):
    exp = tmp_path / "exp"
    _record(str(exp))
    record = json.loads((exp / SEARCH_FILE).read_text())
    old = {k: v for k, v in record.items() if not k.startswith(NEWER_KEYS)}
    (exp / SEARCH_FILE).write_text(json.dumps(old))
    check_same_search(str(exp), load_space(DEMO))  # its restored study keeps its own sampler


def test_a_setting_added_since_the_search_started_resumes_at_its_default_only(tmp_path):
    # A search recorded by an older distmed has no entry for a key added since; at its
    # default the key keeps the old behaviour, so the resume goes on. A value the old
    # search never ran with is refused, naming the key.
    exp = tmp_path / "exp"
    _record(str(exp))
    record = json.loads((exp / SEARCH_FILE).read_text())
    key = "base.train.precise_bn_images"
    assert record.pop(key) == 0
    (exp / SEARCH_FILE).write_text(json.dumps(record))
    check_same_search(str(exp), load_space(DEMO))
    with pytest.raises(UserError, match=rf"{key} was None, now 512"):
        check_same_search(str(exp), load_space(DEMO, ["train.precise_bn_images=512"]))
    # A searched parameter the record lacks is a new search, whatever its values.
    searched = next(k for k in record if k.startswith("space."))
    record.pop(searched)
    (exp / SEARCH_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match=rf"{searched} was None"):
        check_same_search(str(exp), load_space(DEMO))
