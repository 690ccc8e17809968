"""`best_model.pt` as a type: `SavedModel` (what rebuilding and predicting need) plus weights.

The file is a `torch.save`d dict: this model's fields (JSON types only) and `model_state`.
Loading validates every field against the experiment config's own bounds (the config is an
`ExperimentConfig`; `preprocessing` is the config's `DecodeSettings` and the normalisation),
so a tampered or damaged file is one `UserError` line naming it, never a 22 GB allocation or a
KeyError.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeGuard

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from distmed import __version__
from distmed.artifacts import atomic_path, read_torch_file
from distmed.calibration import FindingTemperatures, TemperatureFit
from distmed.config import DataConfig, ExperimentConfig, ModelConfig, format_validation_error
from distmed.data import IMAGENET_MEAN, IMAGENET_STD
from distmed.data.settings import RESIZE_MODES, DecodeSettings
from distmed.errors import UserError
from distmed.model import input_normalization
from distmed.task.base import Task
from distmed.task.multilabel import MISSING_POLICIES, UNCERTAIN_POLICIES, MultilabelTask
from distmed.task.single import BinaryTask, MulticlassTask

# 2: a multi-label model (`SavedModel.multilabel`); single-label files are still written as 1,
# so a distmed that predates multi-label reads them, and refuses a multi-label one in one line
# instead of taking its findings for exclusive classes.
MODEL_FORMAT = 2
SINGLE_LABEL_FORMAT = 1
WEIGHTS_KEY = "model_state"
# The best trial's fold models (weights only): the CV estimate's own models, for
# `--ensemble folds`. Absent from files written before they were kept.
FOLD_WEIGHTS_KEY = "fold_states"
MAX_FOLD_MODELS = 1_000  # cv.folds (50) x cv.repeats (20) at most
MAX_CLASSES = 10_000  # the head is built before the weights load: bound what it allocates
ClassName = Annotated[str, Field(min_length=1, max_length=256)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]


class _Record(BaseModel):
    # Unknown keys are refused like a config typo; a newer format is caught by `format`.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(_Record, DecodeSettings):
    """How training fed the network: decoded as its `DecodeSettings` say -> /255 ->
    normalised per channel by `mean` and `std`.

    `best_model.pt` keeps the layout it has always had: the resize mode under `resize_mode`,
    the text `resize_text` under `resize` (`_from_file`, `_to_file`). A file written before
    the decode settings were kept has none of them and decoded 16-bit images min-max,
    stretched: it loads so.
    """

    field_prefix: ClassVar[str] = "preprocessing."

    channels_in_cache: Literal[1, 3]
    mean: tuple[UnitFloat, UnitFloat, UnitFloat]
    std: tuple[
        Annotated[float, Field(gt=0, le=1)],
        Annotated[float, Field(gt=0, le=1)],
        Annotated[float, Field(gt=0, le=1)],
    ]
    resize_text: str = "bilinear, to a square image_size x image_size"
    scale: str = "uint8 / 255; 16-bit and float images min-max scaled per image"

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: Any) -> Any:
        # A file's `resize` is the text (never a mode name); code passes the mode as `resize`.
        if not isinstance(data, dict) or (
            "resize_mode" not in data and data.get("resize", "stretch") in RESIZE_MODES
        ):
            return data
        data = dict(data)
        if "resize" in data:
            data["resize_text"] = data.pop("resize")
        if "resize_mode" in data:
            data["resize"] = data.pop("resize_mode")
        data.setdefault("intensity", "minmax")  # what files without the settings decoded
        return data

    @model_serializer(mode="wrap")
    def _to_file(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if "resize" in out:
            out["resize_mode"] = out.pop("resize")
        if "resize_text" in out:
            out["resize"] = out.pop("resize_text")
        return out


class Threshold(_Record):
    """The binary operating point `distmed.report` chose on out-of-fold validation scores."""

    value: UnitFloat = Field(description="positive-class probability at or above: positive")
    method: str = Field(max_length=200)
    positive_class: ClassName
    chosen_on: str = Field(max_length=500)
    num_samples: int = Field(ge=0)
    # Written since the report shows them; older files lack them.
    validation_sensitivity: UnitFloat | None = None
    validation_specificity: UnitFloat | None = None


class Multilabel(_Record):
    """A multi-label model's label policies and scored findings (`task.MultilabelTask`), one
    entry per finding in `class_names` order (`scored`: a subset, in that order)."""

    uncertain: list[Literal[UNCERTAIN_POLICIES]] = Field(max_length=MAX_CLASSES)  # type: ignore[valid-type]
    missing: list[Literal[MISSING_POLICIES]] = Field(max_length=MAX_CLASSES)  # type: ignore[valid-type]
    scored: list[ClassName] = Field(min_length=1, max_length=MAX_CLASSES)


class FindingThresholds(_Record):
    """A multi-label model's operating thresholds, one per finding (`class_names` order),
    chosen on out-of-fold validation scores (`calibration.oof_finding_thresholds`)."""

    values: list[UnitFloat] = Field(max_length=MAX_CLASSES, description="present at or above")
    method: str = Field(max_length=200)
    chosen_on: str = Field(max_length=500)
    num_samples: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_CLASSES)
    validation_sensitivity: list[UnitFloat] = Field(max_length=MAX_CLASSES)
    validation_specificity: list[UnitFloat] = Field(max_length=MAX_CLASSES)
    # findings whose out-of-fold predictions held one class: threshold 0.5, not chosen
    defaulted: list[ClassName] = Field(default_factory=list, max_length=MAX_CLASSES)


class FoldModels(_Record):
    """Where the fold models in `best_model.pt` came from (their weights sit beside it)."""

    trial: str = Field(max_length=100, description="the search trial whose folds they are")
    num_models: int = Field(ge=2, le=MAX_FOLD_MODELS)
    stop_epochs: list[Annotated[int, Field(ge=1)]] = Field(max_length=MAX_FOLD_MODELS)


class SavedModel(_Record):
    """Everything in `best_model.pt` except the weights."""

    format: int = Field(SINGLE_LABEL_FORMAT, ge=1)  # a multilabel model: MODEL_FORMAT
    distmed_version: str | None = Field(None, max_length=100)
    source: str | None = Field(None, max_length=300, description="refit run that made it")
    config: ExperimentConfig
    # At least 2 classes for a single-label model, 1 finding for a multi-label one (one
    # sigmoid output: unusual, but what a one-finding sheet asks for; `_consistent`).
    class_names: list[ClassName] = Field(min_length=1, max_length=MAX_CLASSES)
    positive_index: int | None = Field(None, ge=0, description="binary tasks: the scored class")
    preprocessing: Preprocessing
    threshold: Threshold | None = None
    fold_models: FoldModels | None = None
    # Temperature scaling fitted on the best trial's out-of-fold predictions; predict, the
    # app, evaluate and export divide the logits by it (`distmed.inference`).
    calibration: TemperatureFit | None = None
    # Multi-label models (format 2): policies and scored findings, a threshold and a
    # temperature per finding (the single-label `threshold` and `calibration` stay None).
    multilabel: Multilabel | None = None
    finding_thresholds: FindingThresholds | None = None
    finding_calibration: FindingTemperatures | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value > MODEL_FORMAT:
            raise ValueError(f"{value} is newer than this distmed reads ({MODEL_FORMAT}); upgrade")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SavedModel:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names repeat a name")
        if self.multilabel is None and len(self.class_names) < 2:
            raise ValueError("class_names: a single-label model has at least 2 classes")
        if (self.positive_index is not None) != self.binary:  # as task.task_for sets it
            raise ValueError("positive_index must be set for two classes, and only then")
        if self.positive_index is not None and self.positive_index >= len(self.class_names):
            raise ValueError(f"positive_index {self.positive_index} is not a class")
        if self.preprocessing.image_size != self.config.data.image_size:
            raise ValueError("preprocessing.image_size differs from config.data.image_size")
        self._consistent_findings()
        return self

    def _consistent_findings(self) -> None:
        thresholds, temperatures = self.finding_thresholds, self.finding_calibration
        if self.multilabel is None:
            if thresholds is not None or temperatures is not None:
                raise ValueError("finding_thresholds/finding_calibration need a multilabel model")
            return
        if self.format < MODEL_FORMAT or self.threshold or self.calibration:
            raise ValueError("a multilabel model is format 2, without threshold/calibration")
        lists: dict[str, Sequence[object]] = {
            "multilabel.uncertain": self.multilabel.uncertain,
            "multilabel.missing": self.multilabel.missing,
        }
        if temperatures is not None:
            lists["finding_calibration.findings"] = temperatures.findings
        if thresholds is not None:
            for key in (
                "values",
                "num_samples",
                "validation_sensitivity",
                "validation_specificity",
            ):
                lists[f"finding_thresholds.{key}"] = getattr(thresholds, key)
        count = len(self.class_names)
        for key, values in lists.items():
            if len(values) != count:
                raise ValueError(f"{key} holds {len(values)} entries for {count} findings")
        if not set(self.multilabel.scored) <= set(self.class_names):
            raise ValueError("multilabel.scored names a finding not in class_names")

    @property
    def binary(self) -> bool:
        return self.multilabel is None and len(self.class_names) == 2

    @property
    def positive_class(self) -> str | None:
        return None if self.positive_index is None else self.class_names[self.positive_index]

    @property
    def task(self) -> Task:
        """The task the model was trained for (`distmed.task`)."""
        names = tuple(self.class_names)
        if self.multilabel is not None:
            record = self.multilabel
            return MultilabelTask(
                names, tuple(record.uncertain), tuple(record.missing), tuple(record.scored)
            )
        if self.positive_index is None:
            return MulticlassTask(names)
        return BinaryTask(names, self.positive_index)

    def save(
        self,
        path: Path,
        state: dict[str, torch.Tensor],
        fold_states: Sequence[dict[str, torch.Tensor]] = (),
    ) -> None:
        """Write `best_model.pt` atomically (a kill leaves the old file or the new one).

        `fold_states` (as many as `fold_models.num_models`) are the fold models' weights.
        """
        expected = self.fold_models.num_models if self.fold_models else 0
        if len(fold_states) != expected:
            raise ValueError(f"{len(fold_states)} fold states for {expected} fold models")
        payload = {**self.model_dump(mode="json"), WEIGHTS_KEY: state}
        if fold_states:
            payload[FOLD_WEIGHTS_KEY] = list(fold_states)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: Path) -> SavedModel:
        """The validated fields of `path` (weights read and checked, then dropped)."""
        return cls.load_with_weights(path)[0]

    @classmethod
    def load_with_weights(cls, path: Path) -> tuple[SavedModel, dict[str, torch.Tensor]]:
        """The fields and the refit model's state dict (parameter name -> tensor)."""
        saved, state, _ = cls.load_all(path)
        return saved, state

    @classmethod
    def load_all(
        cls, path: Path
    ) -> tuple[SavedModel, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Read and validate `best_model.pt` safely (`weights_only=True`).

        Returns:
            The fields, the refit model's state dict (parameter name -> tensor), and the
            fold models' state dicts (empty when the file keeps none).

        Raises:
            UserError: no such file, empty, truncated, random bytes, pickled objects, a
                missing or out-of-bounds field, weights that are not a state dict, fold
                weights that do not match `fold_models`; one line naming `path`.
        """
        if not path.is_file():
            raise UserError(f"--model {path}: no such file (a best_model.pt from distmed.tune)")
        payload = read_torch_file(path, "--model")
        if not isinstance(payload, dict):
            kind = type(payload).__name__
            raise UserError(f"--model {path}: holds a {kind}, not a best_model.pt")
        fields = {k: v for k, v in payload.items() if k not in (WEIGHTS_KEY, FOLD_WEIGHTS_KEY)}
        if fields and all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise UserError(
                f"--model {path}: a bare state dict (weights only), not a best_model.pt; "
                "give it to training as model.weights instead"
            )
        state = payload.get(WEIGHTS_KEY)
        if not _is_state_dict(state):
            raise UserError(f"--model {path}: '{WEIGHTS_KEY}' is missing or not a state dict")
        try:
            saved = cls.model_validate(fields)
        except ValidationError as exc:
            raise UserError(f"--model {path}: {_problems(exc)}") from exc
        folds = payload.get(FOLD_WEIGHTS_KEY, [])
        expected = saved.fold_models.num_models if saved.fold_models else 0
        if not isinstance(folds, list) or len(folds) != expected:
            raise UserError(
                f"--model {path}: '{FOLD_WEIGHTS_KEY}' does not hold the {expected} fold "
                "models its fold_models field announces; a damaged file?"
            )
        if not all(_is_state_dict(fold) for fold in folds):
            raise UserError(f"--model {path}: '{FOLD_WEIGHTS_KEY}' holds a non-state dict")
        return saved, state, folds


def _is_state_dict(value: object) -> TypeGuard[dict[str, torch.Tensor]]:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _problems(exc: ValidationError) -> str:
    text = format_validation_error(exc)
    if any(e["type"] == "missing" for e in exc.errors()):  # say what the file is, too
        text += "; not a best_model.pt written by distmed.tune, or a damaged one"
    return text


RESIZE_TEXT = {
    "stretch": "bilinear, stretched to a square image_size x image_size",
    "pad": "bilinear, the long side to image_size, centred on black (aspect ratio kept)",
    "center_crop": "bilinear, the short side to image_size, the middle kept (aspect ratio kept)",
}


def preprocessing_for(
    image_size: int,
    channels: int,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
) -> Preprocessing:
    """What a model trained at `image_size` px from a cache of `channels` (1 or 3) expects.

    `data` (the training config's data section) adds its decoding settings; without it the
    settings are the config's defaults. `model` gives the normalisation its weights were
    trained with (`model.input_normalization`); without it, ImageNet's.
    """
    data = data or DataConfig()
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if model is None else input_normalization(model)
    scale = {
        "minmax": "min-max scaled per image",
        "percentile": f"scaled per image between percentiles {list(data.percentiles)}",
        "window": f"scaled by the window [center, width] {list(data.window or [])}",
    }[data.intensity]
    return Preprocessing(
        **{**data.decode_settings().model_dump(), "image_size": image_size},
        channels_in_cache=channels,
        mean=mean,
        std=std,
        resize_text=RESIZE_TEXT[data.resize],
        scale=f"uint8 / 255; 16-bit, float and DICOM pixels {scale} (a DICOM file's own "
        "window first unless intensity is window); EXIF orientation applied; "
        "MONOCHROME1 inverted",
    )


def save_model(
    path: Path,
    state: dict[str, torch.Tensor],
    cfg: ExperimentConfig,
    task: Task,
    channels: int,
    source: str,
    folds: FoldModels | None = None,
    fold_states: Sequence[dict[str, torch.Tensor]] = (),
    calibration: TemperatureFit | FindingTemperatures | None = None,
    threshold: Threshold | FindingThresholds | None = None,
) -> None:
    """Write `best_model.pt` atomically: weights plus what rebuilding and predicting need.

    `source` names the refit run that produced it, so a resumed search can reuse the file.
    `folds`/`fold_states`: the best trial's fold models (for `--ensemble folds`);
    `calibration`: the temperature fitted on that trial's out-of-fold predictions;
    `threshold`: the binary operating threshold chosen on them (`calibration.oof_threshold`).
    A multi-label `task` is saved with its policies and scored findings (format 2), its
    `calibration` a `FindingTemperatures` and its `threshold` a `FindingThresholds`.
    """
    multilabel = None
    if isinstance(task, MultilabelTask):
        multilabel = Multilabel(
            uncertain=list(task.uncertain), missing=list(task.missing), scored=list(task.scored)
        )
    saved = SavedModel(
        format=MODEL_FORMAT if multilabel else SINGLE_LABEL_FORMAT,
        distmed_version=__version__,
        source=source,
        config=cfg,
        class_names=list(task.class_names),
        positive_index=task.positive if isinstance(task, BinaryTask) else None,
        preprocessing=preprocessing_for(cfg.data.image_size, channels, cfg.data, cfg.model),
        fold_models=folds,
        multilabel=multilabel,
        **_calibration_fields(calibration),
        **_threshold_fields(threshold),
    )
    saved.save(path, state, fold_states)


def _calibration_fields(calibration: TemperatureFit | FindingTemperatures | None) -> dict:
    if isinstance(calibration, FindingTemperatures):
        return {"finding_calibration": calibration}
    return {"calibration": calibration}


def _threshold_fields(threshold: Threshold | FindingThresholds | None) -> dict:
    if isinstance(threshold, FindingThresholds):
        return {"finding_thresholds": threshold}
    return {"threshold": threshold}


def saved_source(path: Path) -> str | None:
    """The refit run a saved `best_model.pt` came from (None when there is no such file)."""
    return SavedModel.load(path).source if path.is_file() else None


def save_threshold(path: Path, threshold: Threshold | FindingThresholds | dict[str, Any]) -> None:
    """Record the operating threshold (chosen on validation data) in `best_model.pt`: the
    binary one, or a multi-label model's per-finding ones.

    `predict` then labels new images at that threshold with the checkpoint alone.
    """
    saved, state, fold_states = SavedModel.load_all(path)
    update: dict[str, Threshold | FindingThresholds] = (
        {"finding_thresholds": FindingThresholds.model_validate(threshold)}
        if saved.multilabel is not None
        else {"threshold": Threshold.model_validate(threshold)}
    )
    saved.model_copy(update=update).save(path, state, fold_states)
