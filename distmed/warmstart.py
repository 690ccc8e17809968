"""`--warm-start RUN_DIR`: an earlier search's completed trials, told to the new sampler.

The earlier search's `trials.csv` gives each completed trial's parameters and CV ROC-AUC;
its `search_space.json` gives the images it ran on (`searchfile.images_hash`), and other
images are refused before Ray starts: a score on other data says nothing about this one.
A trial is left out (counted in `skipped`) when one of its values lies outside the new
space's distributions, when it lacks a key the new space searches, or when it searched a key
the new space fixes at another value than the trial's. The others go into the Optuna study
as completed trials before the first new trial is sampled (`search.CVOptunaSearch`); they
count toward TPE's random start-up like any finished trial.

Fixed settings may differ (a longer schedule, more folds, a larger image size: the issue's
"second search on a bigger budget"), but then the earlier scores are on another scale than
the new ones; `WarmStart.changed` names them and the search warns, as it does when no trial
was usable.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from distmed.artifacts import read_text_uri
from distmed.data import DataIndex
from distmed.errors import UserError, shorten
from distmed.searchfile import IMAGES_KEY, SEARCH_FILE, images_hash, search_record
from distmed.space import SearchSpaceFile, optuna_distributions

TRIALS_FILE = "trials.csv"
# trials.csv's columns after the parameters (`results.write_trials_csv`)
_FIRST_SCORE_COLUMN = "cv_roc_auc"
# Fixed settings whose change keeps scores comparable: other draws of the same procedure.
_COMPARABLE_ANYWAY = ("base.train.seed", "base.cv.seed")


@dataclass(frozen=True)
class WarmStart:
    """Trials for the new study: parameters and their objective values, in the new space."""

    source: str
    params: list[dict[str, Any]] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)  # one value per objective
    skipped: int = 0
    # fixed settings that differ from the earlier search's, as "key old -> new"
    changed: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """What summary.json keeps of it."""
        return {
            "from": self.source,
            "trials_used": len(self.params),
            "skipped": self.skipped,
            "settings_changed": list(self.changed),
        }

    def warnings(self) -> list[str]:
        """One line per thing the user should know before trusting the warm start."""
        out = []
        if not self.params:
            out.append(
                f"--warm-start {self.source}: no completed trial of it fits this space "
                f"({self.skipped} left out); this search starts cold"
            )
        if self.changed:
            out.append(
                f"--warm-start {self.source}: its trials were scored with other fixed "
                f"settings ({'; '.join(self.changed)}); the sampler takes their CV ROC-AUC as "
                "if comparable with this search's"
            )
        return out


def load_warm_start(
    run_dir: str,
    spec: SearchSpaceFile,
    index: DataIndex,
    model_size: Callable[[dict[str, Any]], int] | None = None,
) -> WarmStart:
    """The completed trials of the search at `run_dir` (a results folder or URI) that fit
    `spec`'s space. `model_size`: the second objective's value of a trial's parameters,
    with two objectives.

    Raises:
        UserError: `run_dir` has no trials.csv or search record, or ran on other images.
    """
    uri = run_dir if "://" in run_dir else str(Path(run_dir).resolve())
    record_text = read_text_uri(f"{uri}/{SEARCH_FILE}")
    trials_text = read_text_uri(f"{uri}/{TRIALS_FILE}")
    if record_text is None or trials_text is None:
        raise UserError(
            f"--warm-start {run_dir}: no {SEARCH_FILE} and {TRIALS_FILE} there; give the "
            "results folder of an earlier distmed.tune search (e.g. runs/NAME)"
        )
    try:
        record = json.loads(record_text)
        before = record.get(IMAGES_KEY)
    except (ValueError, AttributeError) as exc:
        raise UserError(f"--warm-start {run_dir}: {SEARCH_FILE} is not a search record") from exc
    if before != images_hash(index):
        raise UserError(
            f"--warm-start {run_dir}: that search ran on other images (file names, labels, "
            f"sizes or classes differ from --data {index.name}); warm-start only from a "
            "search on the same data"
        )
    warm = _fitting_trials(run_dir, trials_text, spec, model_size)
    return replace(warm, changed=changed_settings(record, spec))


def changed_settings(record: dict[str, Any], spec: SearchSpaceFile) -> tuple[str, ...]:
    """Fixed settings (`base.*` of the search records) that differ between the earlier
    search and `spec`, as "key old -> new". Left out: keys either search searched (their
    base value is not what the trials ran with), the seeds, and keys only one record has (a
    setting one distmed version lacks)."""
    now = search_record(spec)
    # "space.optim.lr.loguniform" -> "optim.lr"
    searched = {
        k[len("space.") :].rsplit(".", 1)[0] for k in (*record, *now) if k.startswith("space.")
    }
    out = []
    for key in sorted(set(record) & set(now)):
        name = key[len("base.") :]
        if not key.startswith("base.") or key in _COMPARABLE_ANYWAY:
            continue
        if any(name == s or name.startswith(f"{s}.") for s in searched):
            continue
        if record[key] != now[key]:
            out.append(f"{name} {shorten(record[key])} -> {shorten(now[key])}")
    return tuple(out)


def _fitting_trials(
    source: str,
    text: str,
    spec: SearchSpaceFile,
    model_size: Callable[[dict[str, Any]], int] | None,
) -> WarmStart:
    distributions = optuna_distributions(spec.space)
    base = spec.base.model_dump(mode="json")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if "trial_id" not in header or _FIRST_SCORE_COLUMN not in header:
        raise UserError(f"--warm-start {source}: {TRIALS_FILE} is not a distmed trials table")
    old_keys = list(header)[header.index("trial_id") + 1 : header.index(_FIRST_SCORE_COLUMN)]
    params_out, values_out, skipped = [], [], 0
    for row in reader:
        score = _number(row.get(_FIRST_SCORE_COLUMN))
        if row.get("status") != "completed" or score is None:
            continue  # not a result: stopped early, errored, diverged
        params = _params_in_space(row, old_keys, distributions, base)
        if params is None:
            skipped += 1
            continue
        values = [score] + ([float(model_size(params))] if model_size else [])
        params_out.append(params)
        values_out.append(values)
    return WarmStart(source, params_out, values_out, skipped)


def _params_in_space(
    row: dict[str, str], old_keys: list[str], distributions: dict[str, Any], base: dict[str, Any]
) -> dict[str, Any] | None:
    """The row's values typed for `distributions`; None when a value does not fit."""
    if not set(distributions) <= set(old_keys):
        return None
    for key in set(old_keys) - set(distributions):  # searched then, fixed now
        if row[key] != str(_dotted(base, key)):
            return None
    params: dict[str, Any] = {}
    for key, dist in distributions.items():
        value = _typed(row[key], dist)
        if value is None:
            return None
        params[key] = value
    try:  # Optuna's own check that every value lies in its distribution
        optuna.trial.create_trial(params=params, distributions=distributions, value=0.0)
    except ValueError:
        return None
    return params


def _typed(text: str, dist: Any) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        matches = [c for c in dist.choices if str(c) == text]
        return matches[0] if matches else None
    number = _number(text)
    if number is None:
        return None
    if isinstance(dist, optuna.distributions.IntDistribution):
        return int(number) if float(number).is_integer() else None
    return number


def _number(text: str | None) -> float | None:
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def model_size_of(spec: SearchSpaceFile, num_classes: int) -> Callable[[dict[str, Any]], int]:
    """`pareto.ModelSize` for `spec`'s base config (imported here: it builds models)."""
    from distmed.pareto import ModelSize

    return ModelSize(spec.base.model_dump(mode="json"), num_classes)
