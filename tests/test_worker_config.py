"""distmed.worker.WorkerConfig: the typed plan a Train worker gets, a dict only inside Ray."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from distmed.config import ExperimentConfig
from distmed.task import BinaryTask
from distmed.worker import FoldIndices, WorkerConfig


def _plan(**changes) -> WorkerConfig:
    fields = dict(
        config=ExperimentConfig.model_validate({"train": {"epochs": 3}}),
        images_path="/cache/pool.npy",
        labels=[0, 1, 1, 0],
        task=BinaryTask(("neg", "pos")),
        folds=[FoldIndices(train=[0, 1], val=[2, 3]), FoldIndices(train=[0, 1, 2, 3])],
        folds_per_repeat=2,
        threads=1,
        detail_uri="/runs/x/detail",
    )
    return WorkerConfig(**{**fields, **changes})


def test_the_plan_crosses_as_plain_data_and_comes_back_equal():
    plan = _plan()
    loop_config = plan.to_loop_config()
    json.dumps(loop_config)  # nothing but plain values (the ObjectRef is None here)
    assert loop_config["config"]["train"]["epochs"] == 3
    back = WorkerConfig.from_loop_config(loop_config)
    assert back == plan
    assert back.folds[1].val is None and back.config.train.epochs == 3


def test_the_object_store_reference_passes_through_untouched():
    ref = object()  # stands for a ray.ObjectRef, which Ray itself carries across
    assert WorkerConfig.from_loop_config(_plan(images_ref=ref).to_loop_config()).images_ref is ref


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda d: d.pop("threads"), "threads"),
        (lambda d: d.update(detail_url="/x"), "detail_url"),
        (lambda d: d["folds"][0].update(valid=[1]), "valid"),
        (lambda d: d["config"]["train"].update(epochs=0), "epochs"),
        (lambda d: d["task"].update(class_names=["only"]), "task"),
        (lambda d: d["task"].update(kind="ordinal"), "task"),
    ],
)
def test_a_wrong_plan_is_refused_on_the_worker_side_by_name(change, named):
    loop_config = _plan().to_loop_config()
    change(loop_config)
    with pytest.raises(ValidationError, match=named):
        WorkerConfig.from_loop_config(loop_config)
