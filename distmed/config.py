"""The one typed experiment config: YAML in, validated, dotted overrides, dict out.

Every section is a frozen pydantic model that forbids unknown keys, so a typo is an error
that names its dotted path before any work starts. Dicts exist only at process boundaries
(Ray, checkpoints, results); the other side re-validates with `ExperimentConfig.model_validate`.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Collection, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from distmed.artifacts import write_text_atomic
from distmed.data.settings import MIN_IMAGE_SIZE as MIN_IMAGE_SIZE
from distmed.data.settings import DecodeSettings
from distmed.errors import UserError, did_you_mean, shorten
from distmed.model import ARCHS
from distmed.shipped import not_found_hint, space_path
from distmed.uris import check_config
from distmed.yamlfile import NotYaml, load_yaml, read_yaml_file

# `model.arch`'s values, and the stages `model.unfreeze` counts, come from model.py's table.
DEFAULT_ARCH = "resnet18"


class _Section(BaseModel):
    # coerce_numbers_to_str: YAML reads a class named 0 or a folder named 2024 as an int.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        coerce_numbers_to_str=True,
        allow_inf_nan=False,  # nan passes no bound check with a message that fits it
    )


class AugmentConfig(_Section):
    """Training augmentation (drawn per image on the device, `data.transforms`) and the
    test-time augmentation of validation and every prediction (`distmed.tta`)."""

    hflip: bool = Field(True, description="flip each training image left-right with p=0.5")
    vflip: bool = Field(
        False,
        description="flip each training image upside down with p=0.5; off by default: "
        "anatomy has an up",
    )
    rotation: float = Field(10.0, ge=0, le=180, description="max rotation in degrees")
    policy: Literal["none", "randaugment", "trivialaugment"] = Field(
        "none",
        description="per-image operation policy (kornia) over medical-safe candidates "
        "(docs/training.md): RandAugment's policy_ops ops at policy_magnitude, or "
        "TrivialAugment's one op at a random magnitude",
    )
    policy_ops: int = Field(2, ge=1, le=11, description="RandAugment: operations per image (N)")
    policy_magnitude: int = Field(
        9, ge=1, le=29, description="RandAugment: magnitude of every operation (M, out of 30)"
    )
    crop_scale: float = Field(
        1.0,
        ge=0.08,
        le=1,
        description="random resized crop: smallest share of the image area kept, resized back "
        "(aspect 3/4 to 4/3); 1: no crop",
    )
    brightness: float = Field(
        0.0, ge=0, le=0.5, description="max added brightness, +/- on the 0-1 intensity scale"
    )
    contrast: float = Field(0.0, ge=0, lt=1, description="contrast factor drawn in 1 +/- this")
    gamma: float = Field(0.0, ge=0, lt=1, description="gamma drawn in 1 +/- this")
    tta: Literal["none", "flips", "policy"] = Field(
        "none",
        description="test-time augmentation averaging probabilities: 'flips' (the flips "
        "training uses), 'policy' (the unaugmented image and tta_draws training draws)",
    )
    tta_draws: int = Field(4, ge=1, le=64, description="tta=policy: augmented draws per image")

    @model_validator(mode="after")
    def _tta_has_views(self) -> AugmentConfig:
        if self.tta == "flips" and not (self.hflip or self.vflip):
            raise ValueError(
                "tta=flips averages the flips training uses, but hflip and vflip are off; "
                "set data.augment.hflip=true or data.augment.tta=none"
            )
        if self.tta == "policy" and not self.random:
            raise ValueError(
                "tta=policy averages draws of the training augmentation, but all of it is "
                "off; turn one on (e.g. data.augment.policy=trivialaugment) or set tta=none"
            )
        return self

    @property
    def random(self) -> bool:
        """Whether training draws anything at all (otherwise `augment_batch` is the identity)."""
        return bool(
            self.hflip
            or self.vflip
            or self.rotation > 0
            or self.policy != "none"
            or self.crop_scale < 1
            or self.brightness > 0
            or self.contrast > 0
            or self.gamma > 0
        )


# How an uncertain (-1) or a blank cell of a finding becomes a target (the CheXpert paper's
# U-Ignore / U-Ones / U-Zeros; blanks as CheXpert's competition code (zeros) or
# torchxrayvision (ignore) read them).
FindingPolicy = Literal["ignore", "ones", "zeros"]
MissingPolicy = Literal["ignore", "zeros"]


class DataConfig(_Section, DecodeSettings):
    """The data section. Its decoding keys (image_size, intensity, window, percentiles,
    resize, max_pixels) are `DecodeSettings`' fields, declared there once."""

    field_prefix: ClassVar[str] = "data."

    root: str | None = Field(
        None,
        description="image folder, MedMNIST .npz, 'medmnist:NAME', or 'demo' (built-in data)",
    )
    positive_class: str | None = Field(
        None, description="binary tasks: class whose score is the ROC-AUC score (default: 2nd)"
    )
    group_csv: str | None = Field(
        None, description="CSV with columns 'path' and 'group' (patient id) for grouped folds"
    )
    group_regex: str | None = Field(
        None, description="regex whose first group, applied to the file name, is the patient id"
    )
    cache_dir: str | None = Field(
        None, description="decoded-image cache (default ~/.cache/distmed)"
    )
    skip_invalid: bool = Field(
        False,
        description="skip unreadable image files (counted in the results) instead of stopping",
    )
    on_duplicates: Literal["warn", "error"] = Field(
        "warn",
        description="identical images across splits or classes: warn at start, or stop",
    )
    manifest: str | None = Field(
        None,
        description="CSV of labels: columns path,label and optional group, split "
        "(train/val/test); paths relative to the CSV (data.root may be the CSV instead); the "
        "CSV and its paths may be s3:// or gs:// URIs",
    )
    label_key: str | None = Field(
        None,
        description="labels sheet keyed by this DICOM attribute (e.g. AccessionNumber) instead "
        "of a path column: each row labels every DICOM image below the sheet's folder with that "
        "value in its header (PatientID and StudyInstanceUID columns are found without it)",
    )
    group_from: Literal["PatientID"] | None = Field(
        None, description="PatientID: the patient id from each DICOM file's header"
    )
    decode_workers: int | None = Field(
        None, ge=1, le=1024, description="processes decoding the cache (default: every CPU)"
    )
    normalize_labels: bool = Field(
        False,
        description="labels (or class folders) that differ only in case or spaces "
        "('Normal', 'normal ', ' NORMAL') are one class, named by the most common spelling; "
        "default: stop and list the spellings",
    )
    class_names: list[str] | None = Field(
        None,
        description="MedMNIST .npz sources: a name per label 0, 1, ... (saved with the model); "
        "folder sources are named by their class folders",
    )
    # Several findings per image (multi-label; docs/data.md "Several findings per image"). The
    # finding names in `uncertain`, `missing` and `score_findings` are checked against the
    # source once it is scanned (`distmed.data.findings.check_finding_keys`).
    task: Literal["auto", "multilabel"] = Field(
        "auto",
        description="auto: several findings per image when label_columns or label_delimiter is "
        "set, or an .npz's labels are (N, L>1) of 0/1; else one label per image",
    )
    label_columns: list[str] | None = Field(
        None,
        description="manifest columns, one per finding, cells 1/0/-1 (uncertain)/blank "
        "(CheXpert); with task: multilabel and none named, every column but path, group, "
        "split and CheXpert's Sex, Age, Frontal/Lateral, AP/PA",
    )
    label_delimiter: str | None = Field(
        None,
        description="one column (label, or the one in label_columns) holds each image's "
        "findings joined by this (NIH ChestX-ray14: '|'); findings are the union, sorted",
    )
    no_finding: str | None = Field(
        None,
        description="with label_delimiter: the value meaning no finding at all ('No Finding')",
    )
    uncertain: FindingPolicy | dict[str, FindingPolicy] = Field(
        "ignore",
        description="cells -1: ignore (masked from loss and metrics), ones or zeros "
        "(CheXpert's U-Ignore, U-Ones, U-Zeros); a dict gives one per finding",
    )
    missing: MissingPolicy | dict[str, MissingPolicy] = Field(
        "ignore",
        description="blank cells: ignore (masked) or zeros; a dict gives one per finding",
    )
    score_findings: list[str] | None = Field(
        None, description="findings whose mean ROC-AUC is the score (default: all)"
    )
    loader: Literal["cache", "stream"] = Field(
        "cache",
        description="cache: decode once on the driver's node into a memory-mapped file (data "
        "that fits one node); stream: decode in Ray Data tasks on every node, each epoch "
        "(docs/data.md 'Streaming')",
    )
    stream_decode_cpus: float = Field(
        1.0, gt=0, le=64, description="loader: stream; CPUs each Ray Data decoding task reserves"
    )
    augment: AugmentConfig = AugmentConfig()

    @field_validator("uncertain", "missing", mode="wrap")
    @classmethod
    def _one_policy_message(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        # pydantic reports a union's failure once per member, in its own type names: too
        # long and too odd for a line. Say what is allowed instead.
        try:
            return handler(value)
        except ValidationError:
            uncertain = info.field_name == "uncertain"
            allowed = typing.get_args(FindingPolicy if uncertain else MissingPolicy)
            raise ValueError(
                f"give one of {'/'.join(allowed)}, or a mapping finding -> one of them "
                f"(e.g. {{Edema: {allowed[1]}}})"
            ) from None

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if sum(bool(x) for x in (self.group_csv, self.group_regex, self.group_from)) > 1:
            raise ValueError("set at most one of group_csv, group_regex and group_from")
        self._consistent_findings()
        return self

    def _consistent_findings(self) -> None:
        for key in ("label_columns", "score_findings"):
            names = getattr(self, key)
            if names is not None and not names:
                raise ValueError(f"{key} is empty; name at least one finding or unset it")
            if names is not None and len(set(names)) < len(names):
                raise ValueError(f"{key} names a finding twice: {names}")
        if self.label_delimiter is not None:
            if not self.label_delimiter:
                raise ValueError("label_delimiter is empty; give the separator, e.g. '|'")
            if self.label_columns is not None and len(self.label_columns) != 1:
                raise ValueError(
                    "with label_delimiter, label_columns names the ONE column holding the sets "
                    f"(got {len(self.label_columns)}); or unset label_delimiter"
                )
        if self.positive_class is not None and self.multilabel_requested:
            raise ValueError(
                "positive_class is for binary tasks; with several findings per image every "
                "finding is scored (choose them with score_findings)"
            )

    @property
    def multilabel_requested(self) -> bool:
        """Whether the config asks for several findings per image (an .npz of (N, L>1) 0/1
        labels is multi-label too, found when it is read)."""
        return (
            self.task == "multilabel"
            or self.label_columns is not None
            or self.label_delimiter is not None
        )


class ModelConfig(_Section):
    arch: Literal[tuple(ARCHS)] = Field(  # type: ignore[valid-type]
        DEFAULT_ARCH, description="a row of the architecture table (docs/architectures.md)"
    )
    weights: str = Field(
        "imagenet", description="'imagenet' (torchvision), 'none' (random init) or a .pt/.pth path"
    )
    weights_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{8,64}$",
        description="sha256 of a local weights file, checked before it is loaded (a prefix "
        "of 8 or more hex digits is enough)",
    )
    stem: Literal["imagenet", "small"] = Field(
        "imagenet",
        description="small: 3x3 stride-1 first conv and no max-pool, for 28-64 px images "
        "(the archs with a small stem: docs/architectures.md)",
    )
    head: Literal["linear", "mlp"] = Field(
        "linear", description="linear: a new final Linear; mlp: Linear-ReLU-Dropout-Linear"
    )
    head_hidden: int = Field(256, ge=1, description="head: mlp: width of its hidden layer")
    head_dropout: float = Field(0.2, ge=0, lt=1, description="head: mlp: its dropout rate")
    unfreeze: Annotated[int, Field(ge=0)] | Literal["all"] = Field(
        ARCHS[DEFAULT_ARCH].depth,
        # the upper bound is the arch's depth: `_unfreeze_fits_arch`
        description="0: head only; k: head + the last k stages, head end first ("
        + ", ".join(ARCHS[DEFAULT_ARCH].stage_names)
        + f" for {DEFAULT_ARCH}); all: every stage of whichever arch (a search over "
        "model.arch); default: the arch's depth, everything trains",
    )

    @model_validator(mode="before")
    @classmethod
    def _unfreeze_defaults_to_everything(cls, data: Any) -> Any:
        # The depth differs per row (5 for a ResNet, 9 for an EfficientNet): an unset
        # `unfreeze` means "train everything" for whichever arch is chosen.
        if isinstance(data, dict) and "unfreeze" not in data:
            arch = ARCHS.get(str(data.get("arch", DEFAULT_ARCH)))
            if arch is not None:
                return {**data, "unfreeze": arch.depth}
        return data

    @field_validator("arch", mode="wrap")
    @classmethod
    def _arch_in_table(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # pydantic's own Literal error quotes all rows with their quotes: too long for a line.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"unknown arch; use one of {'/'.join(ARCHS)}") from None

    # Field validators (`arch` is declared, so validated, first): the error names the field
    # and quotes its value, like a bound that were the same for every arch.
    @field_validator("unfreeze")
    @classmethod
    def _unfreeze_fits_arch(cls, unfreeze: int | str, info: ValidationInfo) -> int | str:
        arch = ARCHS.get(info.data.get("arch", ""))
        if arch is not None and isinstance(unfreeze, int) and unfreeze > arch.depth:
            raise ValueError(
                f"{arch.name} has {arch.depth} stages; set model.unfreeze to at most {arch.depth}"
            )
        return unfreeze

    @field_validator("stem")
    @classmethod
    def _stem_fits_arch(cls, stem: str, info: ValidationInfo) -> str:
        arch = ARCHS.get(info.data.get("arch", ""))
        if stem == "small" and arch is not None and arch.small_stem is None:
            without = ", ".join(name for name, row in ARCHS.items() if row.small_stem is None)
            raise ValueError(
                f"{arch.name} has no small stem (archs without one: {without}); set "
                "model.stem=imagenet or choose another model.arch"
            )
        return stem

    @property
    def stages_trained(self) -> int:
        """`unfreeze` as a count: `all` is the arch's depth (every stage and the stem)."""
        return ARCHS[self.arch].depth if self.unfreeze == "all" else int(self.unfreeze)

    @property
    def min_image_size(self) -> int:
        """The smallest `data.image_size` this arch and stem accept (the table's `min_size`)."""
        return ARCHS[self.arch].min_size if self.stem == "imagenet" else MIN_IMAGE_SIZE


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = Field("adamw", description="the optimiser")
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate (after the warm-up)")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="L2 penalty (decoupled for adamw)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only: momentum")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="per-step cosine decay after the warm-up, or a constant rate"
    )
    warmup_epochs: int = Field(1, ge=0, description="epochs of linear learning-rate warm-up")
    layer_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="layer-wise lr decay: the head trains at lr, the k-th stage below it at "
        "lr * layer_decay**k (stages of the architecture table); 1: one lr for all",
    )


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1, le=65536, description="global batch, split across workers")
    epochs: int = Field(10, ge=1, le=10000, description="maximum epochs per fold")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="mixed precision; auto: bf16 on GPUs and CPUs that support it, else fp16 "
        "on GPUs, else fp32 (see Performance)",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="balanced: weight the loss by inverse class frequency of the training fold",
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle",
        description="balanced: draw training images with replacement, each class equally "
        "often (one stream shared by the DDP ranks); single-label tasks only",
    )
    patience: int | None = Field(
        None, ge=1, description="stop a fold after this many epochs without val ROC-AUC gain"
    )
    seed: int = Field(0, description="seeds weight initialisation, shuffling and augmentation")
    checkpoint_every: int = Field(
        1,
        ge=1,
        description="checkpoint all folds every this many epochs (the last epoch always); "
        "a restarted or resumed run repeats the epochs since the last checkpoint",
    )
    # The recipe (docs/training.md); every default is the plain loop of before.
    loss: Literal["cross_entropy", "focal"] = Field(
        "cross_entropy", description="focal: focal loss with train.focal_gamma (Lin et al. 2017)"
    )
    focal_gamma: float = Field(2.0, ge=0, le=10, description="focal loss's gamma; 0 is CE")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="target (1-e)·y + e/K")
    mixup_alpha: float = Field(0.0, ge=0, le=10, description="mixup's Beta(a, a); 0: off")
    cutmix_alpha: float = Field(0.0, ge=0, le=10, description="cutmix's Beta(a, a); 0: off")
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="EMA of the weights per optimiser step, validated and saved; 0: off",
    )
    accumulate_steps: int = Field(
        1, ge=1, le=1024, description="batches whose gradients add up to one optimiser step"
    )
    compile: bool = Field(
        False, description="torch.compile the model (docs/performance.md: measured cost)"
    )
    precise_bn_images: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="precise BN: before each validation and save, recompute the trainable "
        "BatchNorm layers' running statistics under the current weights from this many "
        "un-augmented training images of the fold (one forward pass, no backward); 0: off; "
        "no effect on models without BatchNorm (ConvNeXt, Swin); needs data.loader: cache",
    )

    @field_validator("precise_bn_images")
    @classmethod
    def _precise_bn_batch(cls, value: int) -> int:
        # Training-mode BatchNorm needs two values per channel: one image breaks a 1x1 map.
        if value == 1:
            raise ValueError("1 image is too few for BatchNorm statistics; use 0 (off) or >= 2")
        return value

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off_is_false(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as False; take it to mean what the user wrote.
        return "off" if value is False else value


class CVConfig(_Section):
    folds: int = Field(5, ge=2, le=50, description="k of the stratified (grouped) k-fold")
    seed: int = Field(0, description="the folds are identical for every run with the same seed")
    repeats: int = Field(
        1,
        ge=1,
        le=20,
        description="repeated k-fold for small data: repeat r reshuffles with seed cv.seed + r; "
        "every trial trains repeats x folds models (repeats times the compute)",
    )


class ScalingSection(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) per run")
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto: GPU when Ray sees one")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="default: the node's CPUs shared between the workers (streamed GPU worker: 2)",
    )
    gpus_per_worker: float = Field(
        1.0, gt=0, le=8, description="GPUs per worker; a fraction packs trials onto one GPU"
    )
    max_failures: int = Field(
        2, ge=0, description="worker-group restarts from the last checkpoint after a crash"
    )


class WandbConfig(_Section):
    project: str | None = Field(None, description="W&B project; unset: no W&B code runs")
    entity: str | None = Field(None, description="W&B team or user (default: your default)")
    mode: Literal["online", "offline"] | None = Field(
        None, description="default: $WANDB_MODE, else online (offline needs no API key)"
    )


class MlflowConfig(_Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI, e.g. http://mlflow.lab:5000; unset: no MLflow code "
        "runs. Credentials belong in MLFLOW_TRACKING_TOKEN (or _USERNAME/_PASSWORD), not here",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment the trials' runs go to (default: the search's --name)"
    )
    # MLflow's term (`registered_model_name`); `register` would shadow pydantic's ABC method.
    registered_model: str | None = Field(
        None,
        max_length=256,
        description="register the best model under this name in MLflow's model registry, as "
        "a pyfunc model (uint8 images in, class probabilities out, preprocessing inside): "
        "mlflow.pyfunc.load_model('models:/NAME/1'); needs tracking.mlflow.uri; unset: not "
        "registered",
    )


class TrackingConfig(_Section):
    wandb: WandbConfig = WandbConfig()
    mlflow: MlflowConfig = MlflowConfig()


class ExperimentConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    cv: CVConfig = CVConfig()
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _image_fits_arch(self) -> ExperimentConfig:
        least = self.model.min_image_size
        if self.data.image_size < least:
            raise ValueError(
                f"data.image_size={self.data.image_size}: {self.model.arch} with "
                f"model.stem={self.model.stem} needs at least {least} px; set data.image_size "
                f">= {least}" + (" or model.stem=small" if self.model.stem == "imagenet" else "")
            )
        return self

    @model_validator(mode="after")
    def _precise_bn_needs_cache(self) -> ExperimentConfig:
        # The streamed loader reads the pool in passes; it has no reader of a fold's chosen
        # training images yet (distmed.sharedpass), so the combination is refused.
        if self.train.precise_bn_images > 0 and self.data.loader == "stream":
            raise ValueError(
                "train.precise_bn_images needs data.loader: cache; set "
                "train.precise_bn_images=0 or data.loader=cache"
            )
        return self


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a config (or a search-space file's `base`), apply `section.key=value` overrides.

    Raises:
        UserError: unreadable file, unknown key, wrong type or out-of-range value; the
            message names the file and the dotted key.
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = space_path(path)  # a shipped search space by name: `--config demo`
        source = str(path)
        raw = _read_yaml_mapping(path)
        # A search-space file carries the experiment config under `base`.
        if "space" in raw or "base" in raw:
            raw = raw.get("base") or {}
            if not isinstance(raw, dict):
                raise UserError(f"{source}: 'base' must be a mapping of config sections")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source, overrides)


def validate_config(
    raw: dict[str, Any], source: str = "config", overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Validate a plain dict into the typed config, with one readable line per problem.
    `overrides` are the `--set KEY=VALUE` items already applied to `raw`: a problem at a
    key one of them set is blamed on it, not on `source` (`blamed_source`).

    Raises:
        UserError: a problem, or credentials in a URI (`uris.check_config`).
    """
    check_config(raw, source)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        where = blamed_source(exc, source, overrides)
        raise UserError(f"{where}: {format_validation_error(exc, config_names())}") from exc


def blamed_source(exc: ValidationError, source: str, overrides: Sequence[str]) -> str:
    """Where the rejected values came from: `--set KEY=VALUE` when every problem lies at
    (or under) a key an override set, or is an unknown section an override made; `source`
    with those overrides when only some do, or when a problem of a whole section (`cv`) may
    come from one set in it; else `source`.
    Why: a value typed on the command line is not in the file; naming the file sends the
    user to look for it there."""
    by_key = {item.partition("=")[0].strip(): item for item in overrides}
    exact: list[str] = []
    involved: list[str] = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        hit = [item for k, item in by_key.items() if key == k or key.startswith(k + ".")]
        inside = [item for k, item in by_key.items() if k.startswith(key + ".") or not key]
        if err["type"] == "extra_forbidden":  # an unknown section only the --set made
            hit = hit or inside[:1]
        exact += hit[:1]
        involved += hit[:1] or inside
    blamed = ", ".join(f"--set {shorten_item(item)}" for item in dict.fromkeys(involved))
    if exact and len(exact) == len(exc.errors()):
        return blamed
    return f"{source} with {blamed}" if blamed else source


def shorten_item(item: str) -> str:
    """A `--set` item as typed, cut short when huge (a hostile value stays one line)."""
    return item if len(item) <= 80 else shorten(item)


@cache
def config_names() -> frozenset[str]:
    """Every dotted config name, sections included (`train`, `train.epochs`, ...)."""
    names: set[str] = set()
    for field in config_fields():
        parts = field.split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(names)


def format_validation_error(exc: ValidationError, known: Collection[str] = ()) -> str:
    """Flatten pydantic's errors into `dotted.key: problem (got value)` parts; an unknown
    key gets the closest of the `known` dotted names at its depth (`errors.did_you_mean`).

    The rejected value is quoted cut short (`errors.shorten`): it may be a huge string or
    list from a hostile file, and an error must stay one readable line.
    """
    parts = []
    for err in _union_members_merged(exc.errors()):
        message = _message(err)
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        key = key if len(key) <= 80 else shorten(key)  # a hostile --set or YAML key
        if err["type"] == "extra_forbidden":
            alike = [name for name in known if name.count(".") == key.count(".")]
            hint = did_you_mean([key], alike)
            parts.append(f"{key}: unknown key (check the spelling; see docs/config.md){hint}")
        elif err["type"] == "missing" or not err["loc"]:
            # The input here is the whole enclosing mapping: quoting it helps nobody.
            parts.append(f"{key}: required, missing" if err["loc"] else message)
        else:
            parts.append(f"{key}: {message} (got {shorten(err.get('input'))})")
    return "; ".join(parts)


# The last part of an error's location when pydantic tried each member of a union field
# (`int | Literal['all']`): 'constrained-int', "literal['all']", 'function-after[...]'.
_UNION_MEMBER = re.compile(r"^(constrained-)?(int|float|str|bool)$|^[a-z-]+\[.*\]$")


def _message(err: Any) -> str:
    # A validator's own ValueError is our sentence: without pydantic's "Value error, ".
    return str(err["ctx"]["error"]) if err["type"] == "value_error" else str(err["msg"])


def _union_members_merged(errors: list[Any]) -> list[Any]:
    """pydantic's errors with each union field's members folded into one error at the
    field's own key: `model.unfreeze: Input should be greater than or equal to 0 or 'all'`,
    not one line per member under pydantic's names for them."""
    merged: dict[tuple[Any, ...], Any] = {}
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        if not (loc and isinstance(loc[-1], str) and _UNION_MEMBER.match(loc[-1])):
            out.append(err)
            continue
        field_loc = loc[:-1]
        if field_loc in merged:
            first = merged[field_loc]
            first["msg"] = f"{first['msg']} or {_message(err).removeprefix('Input should be ')}"
            continue
        merged[field_loc] = {**err, "loc": field_loc, "type": "union", "msg": _message(err)}
        out.append(merged[field_loc])
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `section.key=value` in a nested dict.

    The value of a string-typed field is kept as typed (`yes`, `01`, a path with `#` or `: `);
    any other value is parsed as YAML (`3`, `true`, `[a, b]`).
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {shorten(item)}: expected section.key=value, e.g. train.epochs=3")
    dotted = key.strip()
    source = f"--set {dotted if len(dotted) <= 80 else shorten(dotted)}"
    set_value(raw, dotted, _parse_value(text, source, keep_text=dotted in text_fields()), item)


def set_value(raw: dict[str, Any], dotted: str, value: Any, item: str | None = None) -> None:
    """Put `value` at a dotted path of a nested dict, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {shorten(item or dotted)}: {shorten(part)} is not a section")
        node = child
    node[leaf] = value


def _parse_value(text: str, source: str, keep_text: bool = False) -> Any:
    """`3` -> int, `true` -> bool, `[a, b]` -> list; anything that is not YAML stays text.

    With `keep_text` the text itself is the value; only a fully quoted value is unquoted
    (`"01"` -> `01`), so quoting as in YAML still works.

    Raises:
        UserError: the value is YAML but too large or alias-heavy (`yamlfile.load_yaml`).
    """
    if not text.strip():
        return None
    if keep_text and not _is_quoted(text):
        return text
    try:
        return load_yaml(text, source)
    except NotYaml:
        return text  # e.g. a regex such as [A-Z]+_


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""


@cache
def text_fields() -> frozenset[str]:
    """Dotted names of the string-typed config fields (str, optional str, string literals).

    Their YAML scalars and `--set` values are taken as text: `yes`, `no`, `on`, `01`, `1e3`
    or a date-like folder name stay what the user typed.
    """
    return frozenset(
        name
        for name, annotation in _leaf_annotations(ExperimentConfig, "")
        if _is_text_annotation(annotation)
    )


def _leaf_annotations(model: type[BaseModel], prefix: str):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_annotations(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation


def _is_text_annotation(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return bool(kinds) and all(_is_text_annotation(a) for a in kinds)
    return False


def config_keeps_text(path: tuple[str, ...]) -> bool:
    """For `load_yaml` on an experiment config (also a space file's `base`)."""
    if path and path[0] == "base":
        path = path[1:]
    return ".".join(path) in text_fields()


def config_fields() -> set[str]:
    """Every dotted leaf name of the config (for search spaces and docs)."""
    return set(_leaf_paths(ExperimentConfig, ""))


def _leaf_paths(model: type[BaseModel], prefix: str):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_paths(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML that `load_config` reads back unchanged."""
    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} not found: check --config; {not_found_hint()}")
    raw = read_yaml_file(path, "config", keeps_text=config_keeps_text)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config sections at the top level")
    return raw
