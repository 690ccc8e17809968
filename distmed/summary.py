"""`summary.json` as a type: `RunSummary`, what a search found, written by `distmed.tune`.

Written in stages (the trials; then the best trial, before the refit; then the refit and
the test split), so everything after the data is optional. Readers (report, model card,
benchmarks) use attributes; `load` names the file in one line when it is not a summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from distmed.artifacts import write_json_atomic
from distmed.config import ExperimentConfig, format_validation_error
from distmed.errors import UserError

MAX_BYTES = 64 << 20  # a summary is a few kB (skipped-file lists can grow); refuse a huge one

# A score that may be undefined: NaN in memory, `null` in the file (strict JSON has no NaN,
# `artifacts.json_text`); a `null` read back is NaN again, so readers see one convention.
Score = Annotated[float, BeforeValidator(lambda v: math.nan if v is None else v)]


class DataSummary(BaseModel):
    """The training data as `data.describe_index` describes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    layout: str | None = Field(None, description="how the source was read, e.g. split folder")
    classes: list[str]
    multilabel: bool = Field(False, description="several findings per image: classes are findings")
    num_images: int = Field(ge=0, description="images in the cross-validation pool")
    num_test_images: int = Field(0, ge=0)
    skipped_invalid: int = Field(0, ge=0)
    skipped_files: dict[str, str] = Field(default_factory=dict, description="id -> reason")
    ignored_files: int = Field(0, ge=0, description="clutter and non-image files left out")
    inspection: dict[str, Any] | None = Field(
        None, description="`python -m distmed.data`'s summary: counts, formats, duplicates"
    )
    thin_validation_folds: str | None = Field(
        None, description="warning: validation folds with fewer than 5 images of a class"
    )
    test_split_gaps: str | None = Field(
        None, description="warning: the test split lacks a class or holds few images of one"
    )


class RunSummary(BaseModel):
    """One search's result. Scores are ROC-AUC in [0, 1]; times in s.

    An undefined score (NaN: a fold without both classes, a diverged fold) is `null` in the
    file; in the lists and metric tables below a `null` reads back as NaN.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    num_trials: int = Field(ge=0)
    trials_by_status: dict[str, int]
    search: dict[str, Any] = Field(default_factory=dict, description="the search settings")
    space: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    data: DataSummary
    versions: dict[str, str] = Field(default_factory=dict)
    # A Ctrl-C ended the search: no refit yet; `--resume` continues it.
    interrupted: bool = False
    # Once a trial completed:
    best_trial: str | None = None
    best_cv_roc_auc: float | None = None
    best_cv_roc_auc_std: float | None = None
    best_cv_roc_auc_se: float | None = Field(
        None, description="corrected standard error of best_cv_roc_auc (Nadeau & Bengio)"
    )
    runner_up_trial: str | None = Field(None, description="the best other completed trial")
    best_separable_from_runner_up: bool | None = Field(
        None,
        description="the 95% intervals (mean ± 1.96 SE) of best and runner-up do not overlap; "
        "null without a runner-up or a finite SE",
    )
    best_fold_roc_auc: list[Score] = Field(default_factory=list)
    best_config: ExperimentConfig | None = None
    # After the refit (test metrics only where the data has a test split):
    refit_epochs: int | None = Field(None, ge=1)
    test_metrics: dict[str, int | Score] | None = None  # num_samples is an int
    # The best trial's fold models averaged (`--ensemble folds`), on the same test split.
    test_metrics_folds: dict[str, int | Score] | None = None
    # Why best_model.pt has no fold ensemble (the best trial's final checkpoint was gone,
    # e.g. deleted before a --resume): `--ensemble folds` is unavailable. null when it has one.
    fold_models_missing: str | None = None
    calibration_note: str | None = Field(
        None,
        description="why the refit model's temperature was kept at 1 instead of fitted "
        "(e.g. separable out-of-fold predictions); null when fitted or not applicable",
    )
    wall_time_s: float | None = Field(None, ge=0)
    # The sampler as built (`search.resolve_sampler`: `auto` decided), the warm start, why
    # this configuration (`importance.param_importances`), and with two objectives the
    # Pareto front (`pareto.FrontPoint`s, by descending CV ROC-AUC) and the refit rule.
    sampler: dict[str, Any] | None = None
    warm_start: dict[str, Any] | None = None
    param_importance: dict[str, Any] | None = None
    pareto_front: list[dict[str, Any]] | None = None
    pareto_rule: str | None = None

    def save(self, path: Path) -> None:
        """Write atomically as strict JSON (NaN as `null`, `artifacts.json_text`)."""
        write_json_atomic(path, self.model_dump(mode="json"))  # unset fields as null

    @classmethod
    def load(cls, path: Path) -> RunSummary:
        """Read and validate `path`.

        Raises:
            UserError: missing, too large, not JSON, or a field missing or of the wrong
                type; one line naming `path`.
        """
        if not path.is_file():
            raise UserError(f"{path}: no such file; is this a distmed.tune results folder?")
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"{path}: over {MAX_BYTES >> 20} MiB, not a distmed summary.json")
        try:
            raw = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({type(exc).__name__}); damaged?") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            missing = any(e["type"] == "missing" for e in exc.errors())
            hint = "; not a summary.json written by distmed.tune, or a damaged one"
            raise UserError(
                f"{path}: {format_validation_error(exc)}{hint if missing else ''}"
            ) from exc
