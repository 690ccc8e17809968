"""Search-space files: a base config, search settings, and dotted keys -> distributions.

Every space key must name a real config field and every distribution must be valid, and
each value a distribution can produce (its bounds, every choice) must pass the config's own
validation; all of it is checked before Ray starts. `to_tune_domains` turns the space into
Ray Tune sampling domains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from distmed.config import (
    ExperimentConfig,
    apply_override,
    config_fields,
    config_keeps_text,
    format_validation_error,
    set_value,
    text_fields,
    validate_config,
)
from distmed.errors import UserError, did_you_mean, shorten
from distmed.shipped import not_found_hint, space_path
from distmed.yamlfile import read_yaml_file

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "qloguniform", "randint", "choice")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SchedulerSettings(_Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(
        1, ge=1, description="epochs every trial gets before it can be stopped"
    )
    reduction_factor: float = Field(2.0, gt=1)


class SamplerSettings(_Strict):
    """TPE's settings (`search.sampler`); `auto` is resolved by `distmed.search.resolve_sampler`
    from the trial budget and the concurrency. Ignored by `algorithm: random`."""

    n_startup_trials: int | Literal["auto"] = Field(
        "auto", description="random trials before TPE models the results; auto: budget // 4, 3..10"
    )
    constant_liar: bool | Literal["auto"] = Field(
        "auto", description="treat running trials as poor results; auto: on when trials overlap"
    )
    multivariate: bool = Field(True, description="model the parameters jointly, not one by one")
    group: bool = Field(True, description="model each set of parameters drawn together apart")

    @field_validator("n_startup_trials")
    @classmethod
    def _at_least_one(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("n_startup_trials must be auto or >= 1")
        return value

    @model_validator(mode="after")
    def _group_needs_multivariate(self) -> SamplerSettings:
        if self.group and not self.multivariate:
            raise ValueError("group: true needs multivariate: true (set both, or group: false)")
        return self


# What each trial can be scored on: the fold-averaged ROC-AUC (higher is better) and the
# model's trainable-parameter count (lower is better; deterministic, so free to measure).
OBJECTIVE_MODES = {"cv_roc_auc": "max", "num_params": "min"}


class SearchSettings(_Strict):
    metric: Literal["cv_roc_auc"] = "cv_roc_auc"
    mode: Literal["max"] = "max"
    num_samples: int = Field(20, ge=1)
    seed: int = 0
    max_concurrent: int = Field(4, ge=1)
    algorithm: Literal["tpe", "random"] = Field(
        "tpe", description="Optuna's sampler: TPE, or random search as a baseline"
    )
    scheduler: SchedulerSettings = SchedulerSettings()
    sampler: SamplerSettings = SamplerSettings()
    objectives: tuple[Literal["cv_roc_auc", "num_params"], ...] = Field(
        ("cv_roc_auc",),
        description="[cv_roc_auc] or [cv_roc_auc, num_params]: a Pareto front of both",
    )

    @field_validator("objectives")
    @classmethod
    def _roc_auc_first(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if value not in (("cv_roc_auc",), ("cv_roc_auc", "num_params")):
            raise ValueError("objectives must be [cv_roc_auc] or [cv_roc_auc, num_params]")
        return value

    @model_validator(mode="after")
    def _asha_needs_one_objective(self) -> SearchSettings:
        if len(self.objectives) > 1 and self.scheduler.type == "asha":
            raise ValueError(
                "scheduler: asha stops trials on one score and cannot rank two objectives; "
                "set scheduler.type: none with two objectives"
            )
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


class Distribution(_Strict):
    """One of: loguniform/uniform [low, high], quniform/qloguniform [low, high, q],
    randint [low, high] (high inclusive), choice [values...]."""

    kind: Literal[DISTRIBUTIONS]  # type: ignore[valid-type]
    args: tuple[Any, ...]

    def probe_values(self) -> list[Any]:
        """Values the config must accept: every choice, or the bounds plus an interior value.

        The interior value is deliberately not a whole number for continuous distributions
        (and one q step in for quantized ones), so a float distribution on an integer field
        is caught here rather than failing every trial.
        """
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return [low, high]
        if self.kind.startswith("q"):
            return [low, high, low + self.args[2]]
        return [low, high, low + (high - low) * 0.3719]


class SearchSpaceFile(_Strict):
    base: ExperimentConfig
    search: SearchSettings
    space: dict[str, Distribution]

    def space_as_dict(self) -> dict[str, dict[str, list[Any]]]:
        """The space in its file form, `{key: {kind: [args]}}` (for summaries and --dry-run)."""
        return {key: {dist.kind: list(dist.args)} for key, dist in self.space.items()}

    def drawn(self, key: str, base: Any) -> list[Any]:
        """The values of dotted `key` the trials can take (`Distribution.probe_values`), or
        `base` (the base's value) when the space does not search it."""
        return list(self.space[key].probe_values()) if key in self.space else [base]

    def with_search(self, **updates: Any) -> SearchSpaceFile:
        """A copy with search settings replaced (CLI flags), validated like the file."""
        try:
            search = SearchSettings.model_validate(self.search.model_dump() | updates)
        except ValidationError as exc:
            raise UserError(f"search: {format_validation_error(exc)}") from exc
        return self.model_copy(update={"search": search})


def load_space(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SearchSpaceFile:
    """Read and validate a search-space file (a path, or a shipped name such as `demo`:
    `shipped.space_path`); `overrides` apply to its base config."""
    path = space_path(path)
    if not path.is_file():
        raise UserError(f"search space {path} not found: check --space; {not_found_hint()}")
    raw = read_yaml_file(path, "search space", keeps_text=_space_keeps_text) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected keys base, search, space at the top level")
    unknown = set(raw) - {"base", "search", "space"}
    if unknown:
        raise UserError(
            f"{path}: unknown top-level key(s) {shorten(sorted(map(str, unknown)))}; "
            "use base, search, space"
        )
    base_raw = raw.get("base") or {}
    for item in overrides:
        apply_override(base_raw, item)
    _unset_unfreeze_trains_every_arch(base_raw, raw.get("space"))
    base = validate_config(base_raw, f"{path}: base", overrides)
    try:
        search = SearchSettings.model_validate(raw.get("search") or {})
    except ValidationError as exc:
        raise UserError(f"{path}: search.{format_validation_error(exc)}") from exc
    space = {
        key: parse_distribution(path, key, spec) for key, spec in (raw.get("space") or {}).items()
    }
    if not space:
        raise UserError(f"{path}: 'space' is empty; map config keys to distributions")
    _refuse_overrides_of_searched_keys(path, overrides, space)
    arch_choices = _arch_choices(space)
    for key, dist in space.items():
        for arch in arch_choices if key != ARCH_KEY else [None]:
            _check_values_fit(path, base, key, dist, arch)
    return SearchSpaceFile(base=base, search=search, space=space)


def _refuse_overrides_of_searched_keys(
    path: Path, overrides: list[str] | tuple[str, ...], space: dict[str, Distribution]
) -> None:
    """`--set KEY=...` sets the base, which a key the space searches never uses: the value
    would be silently ignored. Say so and where to change it instead."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in space:
            raise UserError(
                f"--set {key}: {path} searches {key} (space.{key}), which replaces the base "
                f"value in every trial; edit space.{key} in a copy of the space file (a choice "
                "of one value fixes it) or remove it from space"
            )


def _space_keeps_text(path: tuple[str, ...]) -> bool:
    """String-typed fields keep their text in `base` and as `choice` values in `space`."""
    if path[:1] == ("space",) and len(path) == 4 and path[2:] == ("choice", "*"):
        return path[1] in text_fields()
    return path[:1] == ("base",) and config_keeps_text(path)


def parse_distribution(path: Path, key: str, spec: Any) -> Distribution:
    where = f"{path}: space.{key if len(str(key)) <= 80 else shorten(key)}"
    if key not in config_fields():
        raise UserError(
            f"{where}: not a config field; see docs/config.md for the dotted names"
            f"{did_you_mean([key], config_fields())}"
        )
    if fixed_for_the_search(key):
        raise UserError(
            f"{where}: fixed for the whole search (data, folds, workers and loggers are set "
            "up once, before the first trial); set it under base, or run one search per value"
        )
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}")
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(
            f"{where}: unknown distribution {shorten(kind)}; use one of {', '.join(DISTRIBUTIONS)}"
        )
    if not isinstance(args, list):
        raise UserError(f"{where}: {kind} needs a list, e.g. {kind}: [1.0e-4, 1.0e-2]")
    _check_args(where, kind, args)
    return Distribution(kind=kind, args=tuple(args))


# Read once per search, before the first trial: the decoded cache and the folds (data, cv),
# every trial's workers and resources (scaling), the loggers (tracking).
FIXED_FOR_THE_SEARCH = ("cv.", "data.", "scaling.", "tracking.")


def fixed_for_the_search(key: str) -> bool:
    """Whether a dotted config key is read once per search, not per trial: FIXED_FOR_THE_SEARCH
    but `data.augment.*`. A trial's own value would be ignored, or worse, the image size or
    worker layout recorded for the refit unlike what the trials used."""
    return key.startswith(FIXED_FOR_THE_SEARCH) and not key.startswith("data.augment.")


def _check_args(where: str, kind: str, args: list[Any]) -> None:
    if kind == "choice":
        if not args:
            raise UserError(f"{where}: choice is empty; list at least one value")
        return
    expected = 3 if kind.startswith("q") else 2
    if len(args) != expected or not all(_is_number(a) for a in args):
        shape = "[low, high, q]" if expected == 3 else "[low, high]"
        raise UserError(f"{where}: {kind} needs {shape} numbers, got {shorten(args)}")
    low, high = args[0], args[1]
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise UserError(f"{where}: randint bounds must be integers, got {shorten(args)}")
    if low >= high:
        raise UserError(f"{where}: {kind} low {low} must be below high {high}")
    if "log" in kind and low <= 0:
        raise UserError(f"{where}: {kind} bounds must be > 0 (got low {low})")
    if expected == 3:
        q = args[2]
        if q <= 0:
            raise UserError(f"{where}: {kind} step q must be > 0 (got {q})")
        off_grid = [b for b in (low, high) if not math.isclose(b / q, round(b / q))]
        if off_grid:
            raise UserError(f"{where}: {kind} bounds must be multiples of q={q} (got {off_grid})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The one conditional in a space: bounds that depend on the architecture (`unfreeze` up to
# its depth, `stem: small` where it has one, the smallest image size) are checked for every
# arch the space can draw, each value against each arch, before the first trial.
ARCH_KEY = "model.arch"


def _arch_choices(space: dict[str, Distribution]) -> list[str | None]:
    """The archs every other key's values must fit: the space's choices, or just the base's."""
    dist = space.get(ARCH_KEY)
    return [None] if dist is None else list(dist.probe_values())


def _unset_unfreeze_trains_every_arch(base_raw: Any, space_raw: Any) -> None:
    """A search over `model.arch` whose base leaves `model.unfreeze` unset trains every stage
    of each arch (`unfreeze: all`), not the base arch's depth in every other arch."""
    if not (isinstance(base_raw, dict) and isinstance(space_raw, dict)):
        return
    if ARCH_KEY not in space_raw or "model.unfreeze" in space_raw:
        return
    model = base_raw.get("model")
    if model is None or (isinstance(model, dict) and "unfreeze" not in model):
        base_raw["model"] = {**(model or {}), "unfreeze": "all"}


def _check_values_fit(
    path: Path, base: ExperimentConfig, key: str, dist: Distribution, arch: str | None = None
) -> None:
    for value in dist.probe_values():
        raw = base.model_dump(mode="json")
        set_value(raw, key, value)
        if arch is not None:
            set_value(raw, ARCH_KEY, arch)
        try:
            ExperimentConfig.model_validate(raw)
        except ValidationError as exc:
            with_arch = f" with model.arch={arch}" if arch is not None else ""
            # The randint hint only where a continuous range can draw a fraction.
            hint = {
                "choice": "list only values the config takes",
                "randint": "use bounds the config takes",
            }.get(dist.kind, "for whole numbers use randint or choice")
            every = ", for every arch in the space" if with_arch else ""
            raise UserError(
                f"{path}: space.{key} can produce {shorten(value)}{with_arch}, which the config "
                f"rejects ({format_validation_error(exc)}); {hint}{every}"
            ) from exc


def to_tune_domains(space: dict[str, Distribution]) -> dict[str, Any]:
    """Ray Tune sampling domains keyed by dotted config path."""
    from ray import tune

    domains: dict[str, Any] = {}
    for key, dist in space.items():
        args = dist.args
        if dist.kind == "choice":
            domains[key] = tune.choice(list(args))
        elif dist.kind == "randint":
            domains[key] = tune.randint(int(args[0]), int(args[1]) + 1)  # Tune's high is exclusive
        else:
            domains[key] = getattr(tune, dist.kind)(*args)
    return domains


def apply_params(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The base config with a trial's sampled values set at their dotted paths, re-validated."""
    raw = base.model_dump(mode="json")
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value.item() if hasattr(value, "item") else value  # numpy scalars
    return validate_config(raw, "trial config")


def optuna_distributions(space: dict[str, Distribution]) -> dict[str, Any]:
    """Optuna distributions keyed by dotted config path, exactly as Ray's OptunaSearch
    converts `to_tune_domains(space)` (importance and warm start must match the sampler)."""
    from ray.tune.search.optuna import OptunaSearch

    return dict(OptunaSearch.convert_search_space(to_tune_domains(space)))
