"""A finished search's results as one readable `report.html` (`distmed.report` is its CLI;
`distmed.tune` writes it at the end of a search).

Reads what the search left in RUN_DIR (summary.json, trials.csv, best_model.pt with its
temperature and operating threshold, the test predictions saved once after the refit, the
best trial's per-fold histories and out-of-fold predictions) and only reads: it trains
nothing, never re-scores the test split, chooses nothing and writes nothing but the page and
its figures. Figures are PNGs (300 dpi, embedded) with SVG and PDF copies in RUN_DIR/report/.

A multi-label run (several findings per image) reads the same files: the search section adds
each finding's CV ROC-AUC over the folds, its policies and whether it is in the score (and
why not); the test split gets the per-finding table with bootstrap intervals and curves per
finding (`scorecard.finding_table`); calibration shows each finding's temperature; Grad-CAM
explains chosen findings.
"""

from __future__ import annotations

import csv
import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distmed import plots
from distmed.artifacts import write_text_atomic
from distmed.calibration import (
    FindingTemperatures,
    TemperatureFit,
    apply_finding_temperatures,
    apply_temperature,
)
from distmed.cvstats import interval, separable
from distmed.errors import UserError
from distmed.failures import write_failure
from distmed.importance import importance_text
from distmed.inference import TEST_PREDICTIONS, TEST_PREDICTIONS_FOLDS, load_inference_model
from distmed.results import read_trial_detail
from distmed.savedmodel import FindingThresholds, SavedModel, Threshold
from distmed.scorecard import (
    Scores,
    figure,
    num,
    render_page,
    scorable_here,
    score,
    scores_section,
    table,
    unscored_reasons,
)
from distmed.summary import DataSummary, RunSummary
from distmed.task.base import Task
from distmed.task.multilabel import MultilabelTask, finding_auc_key

log = logging.getLogger(__name__)
REPORT = "report.html"
FIGURES = "report"
GRADCAM_PER_GROUP = 2  # images per (class, correct/wrong)


@dataclass(frozen=True)
class RunData:
    """Everything the report reads from a finished search, loaded once."""

    run_dir: Path
    summary: RunSummary
    trials: list[dict[str, str]]
    space_keys: list[str]
    model_path: Path
    task: Task
    detail: dict[str, Any] | None  # the best trial's folds (histories, OOF predictions)
    test: dict[str, np.ndarray] | None  # labels, probs, images_path
    calibration: TemperatureFit | None = None  # the temperature saved with the model
    threshold: Threshold | None = None  # the operating threshold saved with the model
    # Multi-label models: thresholds and temperatures per finding, and why each finding
    # outside the score is (`scorecard.unscored_reasons`).
    finding_thresholds: FindingThresholds | None = None
    finding_calibration: FindingTemperatures | None = None
    unscored: dict[str, str] | None = None


def report_after_search(run_dir: Path, experiment_uri: str) -> Path | None:
    """The report at the end of `distmed.tune` (None if it failed; the search is not lost).

    A results folder that cannot be written (full, read-only: `failures.write_failure`) is
    not such a failure: it is raised, as it stops every write after it too (and Ctrl-C, a
    `KeyboardInterrupt`, is never caught here).
    """
    try:
        return build_report(run_dir, experiment_uri)
    except Exception as exc:  # the results are already saved; say how to retry
        if write_failure(exc) is not None:
            raise
        log.warning(
            "report failed (%s: %s); rerun: python -m distmed.report %s",
            type(exc).__name__,
            exc,
            run_dir,
        )
        return None


def build_report(run_dir: Path, experiment_uri: str | None = None, resamples: int = 1000) -> Path:
    """Write `run_dir/report.html` and its PNGs; returns the HTML path.

    `experiment_uri` is where Train runs of the trials live when it is not `run_dir`
    itself (a search with s3:// storage reports from its local staging folder). The
    operating threshold shown is the one saved in best_model.pt (chosen on out-of-fold
    predictions when the search finished: `calibration.oof_threshold`).
    """
    run = load_run(run_dir, experiment_uri)
    figures = run_dir / FIGURES
    figures.mkdir(exist_ok=True)
    threshold = run.threshold
    sections = [
        search_section(run, figures),
        training_section(run, figures),
        test_section(run, figures, threshold, resamples),
        ensemble_section(run, figures, resamples),
        gradcam_section(run, figures, threshold),
    ]
    page = render_page(run.summary.name, sections, run.summary.versions)
    write_text_atomic(run_dir / REPORT, page)
    return run_dir / REPORT


# --------------------------------------------------------------------------- loading


def load_run(run_dir: Path, experiment_uri: str | None = None) -> RunData:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder; pass a search's results folder (runs/NAME)")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir}: no summary.json; is this a distmed.tune results folder?")
    model_path = run_dir / "best_model.pt"
    nothing = (
        f"{run_dir}: no best_model.pt (no trial completed, or the refit did not finish); "
        "nothing to report"
    )
    if not model_path.is_file():
        raise UserError(nothing)
    summary = RunSummary.load(summary_path)
    if summary.best_trial is None:
        raise UserError(nothing)
    saved = SavedModel.load(model_path)
    with (run_dir / "trials.csv").open(newline="") as handle:
        trials = list(csv.DictReader(handle))
    base = experiment_uri or str(run_dir.resolve())
    detail = read_trial_detail(f"{base}/trials/cv-{summary.best_trial}")
    return RunData(
        run_dir=run_dir,
        summary=summary,
        trials=trials,
        space_keys=list(summary.space),
        model_path=model_path,
        task=saved.task,
        detail=detail,
        test=_load_test(run_dir / TEST_PREDICTIONS),
        calibration=saved.calibration,
        threshold=saved.threshold,
        finding_thresholds=saved.finding_thresholds,
        finding_calibration=saved.finding_calibration,
        unscored=_unscored(saved),
    )


def _unscored(saved: SavedModel) -> dict[str, str] | None:
    task = saved.task
    if not isinstance(task, MultilabelTask):
        return None
    return unscored_reasons(task, saved.config.data.score_findings, saved.config.cv.folds)


def _load_test(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


# --------------------------------------------------------------------------- sections


def search_section(run: RunData, figures: Path) -> str:
    summary, trials = run.summary, run.trials  # trials.csv lists them in start order
    aucs = [_float(t["cv_roc_auc"]) for t in trials]
    statuses = [t["status"] for t in trials]
    best = next(i for i, t in enumerate(trials) if t["trial_id"] == summary.best_trial)
    data = summary.data
    counts = summary.trials_by_status
    parts = [
        "<h2>Search</h2>",
        table(
            ["", ""],
            [
                ["experiment", html.escape(summary.name)],
                [
                    "data",
                    html.escape(
                        f"{data.name}: {data.num_images} training images, "
                        f"{_classes_word(run.task)} {', '.join(run.task.class_names)}"
                    ),
                ],
                ["trials", html.escape(", ".join(f"{n} {state}" for state, n in counts.items()))],
                ["best trial", html.escape(str(summary.best_trial))],
                [
                    "best CV ROC-AUC (mean ± std over folds)",
                    f"{num('best_cv_roc_auc', summary.best_cv_roc_auc)} ± "
                    f"{num('best_cv_roc_auc_std', summary.best_cv_roc_auc_std)}",
                ],
                [
                    "best CV ROC-AUC (mean ± corrected standard error, Nadeau & Bengio 2003)",
                    f"{num('best_cv_roc_auc', summary.best_cv_roc_auc)} ± "
                    f"{num('best_cv_roc_auc_se', summary.best_cv_roc_auc_se)}",
                ],
                ["refit epochs", num("refit_epochs", summary.refit_epochs, "{}")],
                ["sampler", html.escape(sampler_text(summary))],
            ],
        ),
        findings_cv_part(run),
        separation_text(run),
        few_images_text(data),
        why_text(summary),
        pareto_part(summary, figures),
        _figure(
            plots.plot_search_progress(
                aucs, statuses, figures / "search_progress.png", "trial (in order started)"
            )
        ),
    ]
    if run.space_keys:
        params = {k: [_param(t[k]) for t in trials] for k in run.space_keys}
        parts.append(_figure(plots.plot_params(params, aucs, best, figures / "params.png")))
        best_params = [[html.escape(k), html.escape(trials[best][k])] for k in run.space_keys]
        parts.append("<h3>Best trial's hyperparameters</h3>" + table(["key", "value"], best_params))
    fold_aucs = summary.best_fold_roc_auc
    parts.append(_figure(plots.plot_fold_aucs(fold_aucs, figures / "fold_aucs.png")))
    parts.append(
        table(
            ["fold", "validation ROC-AUC"],
            [[str(k), num(f"best_fold_roc_auc.{k}", v)] for k, v in enumerate(fold_aucs)],
        )
    )
    return "\n".join(parts)


def _classes_word(task: Task) -> str:
    return "findings" if isinstance(task, MultilabelTask) else "classes"


def findings_cv_part(run: RunData) -> str:
    """A multi-label run: the CV ROC-AUC is the mean over the scored findings; per finding,
    its fold-mean ROC-AUC (the best trial's folds), policies and whether it is in the score
    (and why not). Empty for other tasks."""
    task = run.task
    if not isinstance(task, MultilabelTask):
        return ""
    folds = [f["history"][-1] for f in (run.detail or {}).get("folds", []) if f.get("history")]
    unscored = run.unscored or {}
    rows = []
    for j, name in enumerate(task.class_names):
        aucs = np.array([f.get(f"val_{finding_auc_key(name)}", np.nan) for f in folds], float)
        defined = aucs[np.isfinite(aucs)]
        mean = float(defined.mean()) if defined.size else math.nan
        std = float(defined.std()) if defined.size else math.nan
        rows.append(
            [
                html.escape(name),
                "yes" if name in task.scored else html.escape(f"no: {unscored.get(name, '')}"),
                html.escape(f"{task.uncertain[j]} / {task.missing[j]}"),
                f"{num(f'cv_roc_auc/{name}', mean)} ± {num(f'cv_roc_auc_std/{name}', std)}",
                f"{defined.size} of {len(folds)}",
            ]
        )
    return (
        f"<h3>Findings ({len(task.scored)} of {len(task.class_names)} in the score)</h3>"
        "<p>The CV ROC-AUC above is the mean over the scored findings of each finding's "
        "ROC-AUC over its known labels. Policies: what an uncertain (-1) / a missing (blank) "
        "label became (<i>ignore</i>: left out of loss and metrics).</p>"
        + table(
            [
                "finding",
                "in the score",
                "uncertain / missing",
                "CV ROC-AUC (mean ± std over folds)",
                "folds with a defined AUC",
            ],
            rows,
        )
    )


def few_images_text(data: DataSummary) -> str:
    """The data warnings said before training (`cv.thin_validation_folds`: folds with fewer
    than 5 images of a class; `cv.gaps_in_test_split`), as visible cautions; else ""."""
    notes = [n for n in (data.thin_validation_folds, data.test_split_gaps) if n]
    return "".join(f"<p><b>Caution:</b> {html.escape(note)}</p>" for note in notes)


def sampler_text(summary: RunSummary) -> str:
    """The sampler as built and the warm start, as recorded in summary.json."""
    sampler = summary.sampler
    if not sampler:
        return "not recorded (a search from before the sampler was recorded)"
    text = ", ".join(f"{k} {v}" for k, v in sampler.items())
    warm = summary.warm_start
    if warm:
        text += (
            f"; warm-started with {warm['trials_used']} completed trial(s) of {warm['from']} "
            f"({warm['skipped']} outside this space left out)"
        )
        if warm.get("settings_changed"):  # recorded since 2026-12-06
            text += f", scored with other fixed settings: {'; '.join(warm['settings_changed'])}"
    return text


def why_text(summary: RunSummary) -> str:
    """Parameter importance over the completed trials (`importance.param_importances`)."""
    text = importance_text(summary.param_importance)
    return f"<p>{html.escape(text)}</p>" if text else ""


def pareto_part(summary: RunSummary, figures: Path) -> str:
    """Two objectives: the front as a figure and a table, and the rule for the refit."""
    front = summary.pareto_front
    if front is None:
        return ""
    if not front:
        return "<p>Pareto front: no completed trial, so no front.</p>"
    ids = [p["trial_id"] for p in front]
    chosen = ids.index(summary.best_trial) if summary.best_trial in ids else None
    path = plots.plot_pareto_front(
        [p["num_params"] for p in front],
        [p["cv_roc_auc"] for p in front],
        chosen,
        figures / "pareto_front.png",
    )
    rows = [
        [
            html.escape(p["trial_id"]) + (" (refitted)" if i == chosen else ""),
            num(f"pareto_front.{i}.cv_roc_auc", p["cv_roc_auc"]),
            num(f"pareto_front.{i}.cv_roc_auc_se", p["cv_roc_auc_se"]),
            f"{p['num_params']:,}",
        ]
        for i, p in enumerate(front)
    ]
    return (
        f"<h3>Pareto front: CV ROC-AUC against model size ({len(front)} trial(s))</h3>"
        + _figure(path)
        + table(["trial", "CV ROC-AUC", "corrected SE", "parameters"], rows)
        + f"<p>Refitted: {html.escape(summary.pareto_rule or '')}.</p>"
    )


def separation_text(run: RunData) -> str:
    """A visible sentence when the best trial is not separable from the runner-up; else "".

    Both trials' means and standard errors come from trials.csv, the runner-up's name from
    summary.json (`runner_up_trial`); not separable: their 95% intervals overlap
    (`cvstats.separable`).
    """
    rows = {t["trial_id"]: t for t in run.trials}
    best = rows.get(run.summary.best_trial or "")
    other = rows.get(run.summary.runner_up_trial or "")
    if best is None or other is None:
        return ""
    # trials.csv from before standard errors has no cv_roc_auc_se column: no verdict.
    scores = [(_float(t["cv_roc_auc"]), _float(t.get("cv_roc_auc_se", ""))) for t in (best, other)]
    if separable(*scores) is not False:
        return ""
    (best_low, best_high), (other_low, other_high) = (interval(*s) for s in scores)
    return (
        "<p><b>The best trial is not separable from the runner-up:</b> trial "
        f"{html.escape(best['trial_id'])} scored CV ROC-AUC {scores[0][0]:.4f} (95% interval "
        f"{best_low:.4f} – {best_high:.4f}) and trial {html.escape(other['trial_id'])} "
        f"{scores[1][0]:.4f} ({other_low:.4f} – {other_high:.4f}); the intervals (mean ± "
        "1.96 corrected standard errors) overlap, so this data cannot tell the two "
        "configurations apart.</p>"
    )


def training_section(run: RunData, figures: Path) -> str:
    if not run.detail:
        return "<h2>Training</h2><p>No per-epoch history saved for the best trial.</p>"
    histories = [f["history"] for f in run.detail["folds"]]
    path = plots.plot_training_curves(histories, figures / "training_curves.png")
    note = (
        "<p>Train accuracy and ROC-AUC come from the training steps themselves (augmented "
        "images, model in training mode), so they lag the weights at the epoch's end.</p>"
    )
    return "<h2>Training (best trial, per fold)</h2>" + note + _figure(path)


def test_section(run: RunData, figures: Path, threshold: Threshold | None, resamples: int) -> str:
    if run.test is None:
        return "<h2>Test split</h2><p>This data source has no test split.</p>"
    scores = Scores(run.test["labels"], run.test["probs"], run.task)
    if isinstance(run.task, MultilabelTask):
        scores = scorable_here(scores, run.unscored)
        cuts = run.finding_thresholds
        card = score(scores, np.asarray(cuts.values) if cuts else None, resamples)
        text = _finding_thresholds_text(cuts)
    else:
        card = score(scores, threshold.value if threshold else None, resamples)
        text = _threshold_text(threshold)
    return "\n".join(
        [
            "<h2>Test split (refit model, evaluated once)</h2>",
            text,
            scores_section(scores, card, figures, FIGURES),
        ]
    )


def _finding_thresholds_text(cuts: FindingThresholds | None) -> str:
    if cuts is None:
        return "<p>No thresholds per finding saved: decisions at 0.5.</p>"
    defaulted = (
        f" Left at 0.5 (one class only in the out-of-fold labels): "
        f"{html.escape(', '.join(cuts.defaulted))}."
        if cuts.defaulted
        else ""
    )
    return (
        f"<p>A threshold per finding ({html.escape(cuts.method)}, chosen on "
        f"{html.escape(cuts.chosen_on)}), saved in best_model.pt for distmed.predict; the "
        f"table below gives each with the test split's sensitivity and specificity at it."
        f"{defaulted}</p>"
    )


COMPARED = ("roc_auc", "accuracy", "sensitivity", "specificity", "brier", "ece")


def ensemble_section(run: RunData, figures: Path, resamples: int) -> str:
    """Refit model vs the best trial's fold ensemble on the test split (argmax decisions),
    and the reliability of the refit model's test predictions before and after the
    temperature fitted on out-of-fold predictions. Empty without a test split."""
    if run.test is None:
        return ""
    parts = ["<h2>Refit model, fold ensemble and calibration (test split)</h2>"]
    labels, refit_probs = run.test["labels"], run.test["probs"]
    folds = _load_test(run.run_dir / TEST_PREDICTIONS_FOLDS)
    columns = [("refit model", refit_probs)]
    if folds is not None:
        columns.append(("fold ensemble", folds["probs"]))
    metrics = [run.task.metrics(labels, probs) for _, probs in columns]
    rows = [
        [name]
        + [
            num(f"{title.replace(' ', '_')}.{name}", m[name])
            for (title, _), m in zip(columns, metrics, strict=True)
        ]
        for name in COMPARED
    ]
    auc_ci = [
        "{:.4f} – {:.4f}".format(*run.task.bootstrap(labels, probs, resamples=resamples)["roc_auc"])
        for _, probs in columns
    ]
    rows.append(["ROC-AUC 95% CI", *auc_ci])
    parts.append(
        "<p>Both scored once on the test split; neither was chosen by it. Brier and ECE: "
        "lower is better.</p>" + table(["metric", *(t for t, _ in columns)], rows)
    )
    if isinstance(run.task, MultilabelTask) and run.finding_calibration is not None:
        parts.append(_finding_calibration_part(run, labels, refit_probs, figures))
    calibration = run.calibration
    if calibration is not None:
        temperature = calibration.temperature
        raw = apply_temperature(refit_probs, 1.0 / temperature)  # the saved ones are scaled
        path = _before_after(run, labels, raw, refit_probs, figures)
        if calibration.kept_at_one:  # the saved probabilities are the raw ones
            text = (
                f"<p>Temperature kept at 1 (not fitted on the {calibration.num_samples} "
                f"out-of-fold predictions of the best trial): "
                f"{html.escape(calibration.kept_at_one)}.</p>"
            )
        else:
            text = (
                f"<p>Temperature {num('temperature', temperature, '{:.3f}')} fitted on "
                f"{calibration.num_samples} out-of-fold predictions of the best trial (ECE "
                f"there {calibration.ece_before:.4f} → {calibration.ece_after:.4f}); predict, "
                "evaluate, the app and export apply it. Below: the test split before and "
                "after.</p>"
            )
        parts.append(text + _figure(path))
    return "\n".join(parts)


def _before_after(
    run: RunData, labels: np.ndarray, raw: np.ndarray, refit_probs: np.ndarray, figures: Path
) -> Path:
    """The test split's reliability figure before (`raw`) and after the saved temperature."""
    return plots.plot_calibration(
        labels,
        raw,
        run.task,
        figures / "calibration_before_after.png",
        after_probs=refit_probs,
        title="Test split, refit model",
    )


def _finding_calibration_part(
    run: RunData, labels: np.ndarray, refit_probs: np.ndarray, figures: Path
) -> str:
    """A multi-label model's temperatures, one per finding (fitted on the best trial's
    out-of-fold predictions), and the test split's reliability before and after."""
    fits = run.finding_calibration
    assert fits is not None
    temperatures = fits.temperatures
    raw = apply_finding_temperatures(refit_probs, 1.0 / temperatures)  # saved ones are scaled
    path = _before_after(run, labels, raw, refit_probs, figures)
    rows = []
    for name, fit in zip(run.task.class_names, fits.findings, strict=True):
        if fit is None:
            rows.append([html.escape(name), "1 (not fitted: too few labels or one class)", ""])
            continue
        if fit.kept_at_one:
            rows.append([html.escape(name), f"1 (kept: {html.escape(fit.kept_at_one)})", ""])
            continue
        rows.append(
            [
                html.escape(name),
                num(f"temperature/{name}", fit.temperature, "{:.3f}"),
                f"{fit.ece_before:.4f} → {fit.ece_after:.4f} ({fit.num_samples} predictions)",
            ]
        )
    return (
        "<p>A temperature per finding, fitted on the best trial's out-of-fold predictions "
        "(each sigmoid output is its own binary classifier with its own prevalence); "
        "predict, evaluate, the app and export apply them. Below: the test split before and "
        "after.</p>"
        + table(["finding", "temperature", "out-of-fold ECE before → after"], rows)
        + _figure(path)
    )


def _threshold_text(threshold: Threshold | None) -> str:
    if threshold is None:
        return "<p>Decisions by the most probable class (no binary threshold).</p>"
    return (
        f"<p>Operating threshold on the score of class "
        f"<b>{html.escape(threshold.positive_class)}</b>: "
        f"{num('threshold', threshold.value)} ({html.escape(threshold.method)}, chosen "
        f"on {html.escape(threshold.chosen_on)}, {threshold.num_samples} images; there "
        f"sensitivity {_fixed(threshold.validation_sensitivity)}, specificity "
        f"{_fixed(threshold.validation_specificity)}). Saved in best_model.pt for "
        "distmed.predict.</p>"
    )


def _fixed(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def gradcam_section(run: RunData, figures: Path, threshold: Threshold | None) -> str:
    title = "<h2>Grad-CAM (test split)</h2>"
    if run.test is None:
        return ""
    if not str(run.test["images_path"]):  # `inference.evaluate_test` of a streamed split
        return (
            f"{title}<p>The test split was streamed (data.loader: stream): no decoded copy "
            "is kept to draw from; Grad-CAM skipped (distmed.predict --gradcam DIR draws it for "
            "any file).</p>"
        )
    images_path = Path(str(run.test["images_path"]))
    if not images_path.is_file():
        return (
            f"{title}<p>Decoded test images not found at {html.escape(str(images_path))} "
            "(cache cleared?); Grad-CAM skipped.</p>"
        )
    from distmed.gradcam import FLAT_MAP_NOTE, cam_layer, gradcam_maps, is_flat, overlay

    labels, probs = run.test["labels"], run.test["probs"]
    if isinstance(run.task, MultilabelTask):
        return title + _finding_gradcams(run, images_path, figures)
    decision = run.task.decide(probs, threshold.value if threshold else None)
    chosen = pick_examples(labels, decision, probs, GRADCAM_PER_GROUP)
    images = np.load(images_path, mmap_mode="r")[chosen]
    model, saved = load_inference_model(run.model_path)
    maps = gradcam_maps(model, images, [int(decision[i]) for i in chosen])
    names = list(run.task.class_names)
    tiles = [
        (
            overlay(image, heat),
            f"true {names[labels[i]]}, pred {names[decision[i]]}\n"
            f"p={probs[i, decision[i]]:.2f} ({'right' if labels[i] == decision[i] else 'WRONG'})"
            + (f"\n{FLAT_MAP_NOTE}" if is_flat(heat) else ""),
        )
        for i, image, heat in zip(chosen, images, maps, strict=True)
    ]
    layer = cam_layer(saved.config.model.arch, images.shape[-1])
    path = plots.plot_gradcam_grid(tiles, 2 * GRADCAM_PER_GROUP, layer, figures / "gradcam.png")
    note = (
        "<p>Per true class: the most confident correct and the most confident wrong "
        f"predictions; the heat map explains the predicted class. Maps from {layer}: the "
        "deepest stage whose feature map is at least 4 pixels wide at this image size "
        "(a ResNet's last stage from 128 px up).</p>"
    )
    flat = sum(is_flat(heat) for heat in maps)
    if flat:
        note += (
            f"<p>{flat} of {len(maps)} maps are flat (marked): at {layer} the predicted "
            "class's score had no positive gradient-weighted evidence, so their uniform "
            "colour says nothing about where the model looked.</p>"
        )
    return title + note + _figure(path)


GRADCAM_FINDINGS = 4  # rows of the multi-label Grad-CAM grid: the first scored findings


def _finding_gradcams(run: RunData, images_path: Path, figures: Path) -> str:
    """Grad-CAM of a multi-label model: per finding (the first GRADCAM_FINDINGS scored),
    the most probable known-positive and known-negative test images, explaining that
    finding's logit."""
    from distmed.gradcam import FLAT_MAP_NOTE, cam_layer, gradcam_maps, is_flat, overlay

    assert run.test is not None and isinstance(run.task, MultilabelTask)
    task, labels, probs = run.task, run.test["labels"], run.test["probs"]
    cuts = task.thresholds_of(run.finding_thresholds.values if run.finding_thresholds else None)
    picks = pick_finding_examples(labels, probs, task, GRADCAM_PER_GROUP, GRADCAM_FINDINGS)
    if not picks:
        return "<p>No test image with a known label of a scored finding.</p>"
    chosen = [i for i, _ in picks]
    images = np.load(images_path, mmap_mode="r")[chosen]
    model, saved = load_inference_model(run.model_path)
    maps = gradcam_maps(model, images, [j for _, j in picks])
    tiles = []
    for (i, j), image, heat in zip(picks, images, maps, strict=True):
        truth, p = labels[i, j] == 1, probs[i, j]
        said = p >= cuts[j]
        tiles.append(
            (
                overlay(image, heat),
                f"{task.class_names[j]}: {'positive' if truth else 'negative'}\n"
                f"p={p:.2f} ({'right' if said == truth else 'WRONG'})"
                + (f"\n{FLAT_MAP_NOTE}" if is_flat(heat) else ""),
            )
        )
    layer = cam_layer(saved.config.model.arch, images.shape[-1])
    path = plots.plot_gradcam_grid(
        tiles, 2 * GRADCAM_PER_GROUP, layer, figures / "gradcam.png", "each row's finding"
    )
    note = (
        "<p>Per finding (the first scored ones): the most probable known-positive and "
        "known-negative test images; the heat map explains that finding's logit. Right/WRONG "
        f"at the finding's threshold. Maps from {layer}.</p>"
    )
    return note + _figure(path)


def pick_finding_examples(
    labels: np.ndarray, probs: np.ndarray, task: MultilabelTask, per_group: int, most: int
) -> list[tuple[int, int]]:
    """(image, finding column) pairs: for the first `most` scored findings, the `per_group`
    most probable known-positive and known-negative images of each (ignored labels skipped)."""
    picked: list[tuple[int, int]] = []
    for j in task.scored_index[:most]:
        for value in (1.0, 0.0):
            group = np.flatnonzero(labels[:, j] == value)
            order = group[np.argsort(-probs[group, j], kind="stable")][:per_group]
            picked += [(int(i), int(j)) for i in order]
    return picked


def pick_examples(
    labels: np.ndarray, decision: np.ndarray, probs: np.ndarray, per_group: int
) -> list[int]:
    """Indices: per true class, the `per_group` most confident right and wrong predictions."""
    confidence = probs[np.arange(len(labels)), decision]
    picked: list[int] = []
    for cls in np.unique(labels):
        for right in (True, False):
            group = np.flatnonzero((labels == cls) & ((decision == labels) == right))
            picked += group[np.argsort(-confidence[group], kind="stable")][:per_group].tolist()
    return picked


# --------------------------------------------------------------------------- HTML


def _figure(path: Path) -> str:
    """A figure of RUN_DIR/report/ embedded, with links to its files."""
    return figure(path, FIGURES)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _param(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text
