"""The model card the web page shows beside its predictions, as HTML.

Built from `best_model.pt` (architecture, classes, threshold) and, when present next to it,
the run's `summary.json` (CV ROC-AUC, test metrics, training data) and the saved test
predictions (bootstrap CIs computed exactly as `distmed.report` does). A multi-label model's
card lists its findings with their policies, thresholds and whether each is in the score, and
the test split's ROC-AUC per finding with its interval.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from distmed.errors import UserError
from distmed.inference import TEST_PREDICTIONS
from distmed.metrics import CI_METRICS
from distmed.savedmodel import SavedModel, Threshold
from distmed.summary import RunSummary
from distmed.task.base import Task
from distmed.task.multilabel import MultilabelTask, finding_auc_key

NOTICE = "Research tool, not for clinical use."
CI_RESAMPLES = 1000  # as report.html's intervals, so the two pages quote the same numbers


def model_card(model_path: Path, saved: SavedModel) -> str:
    """The card's HTML; sections whose source file is missing (or unreadable) say so instead."""
    summary, problem = _read_summary(model_path.parent / "summary.json")
    parts = [
        f"<h3>Model card</h3><p class='notice'><b>{NOTICE}</b></p>",
        _model_table(saved),
        _data_text(summary, problem),
        _cv_text(summary),
        _test_table(summary, model_path.parent / TEST_PREDICTIONS, saved.task),
    ]
    return f"<div class='distmed-card'>{''.join(parts)}</div>"


def _read_summary(path: Path) -> tuple[RunSummary | None, str]:
    """The summary, or None and why; a bad summary.json does not stop the page serving."""
    if not path.is_file():
        return None, "No summary.json next to the model"
    try:
        return RunSummary.load(path), ""
    except UserError as exc:
        return None, f"summary.json unreadable ({exc})"


def _input_text(saved: SavedModel) -> str:
    prep = saved.preprocessing
    shape = {"stretch": "stretched", "pad": "padded", "center_crop": "centre-cropped"}
    text = f"{prep.image_size} px square, resized bilinearly ({shape[prep.resize]})"
    return f"{text}; 16-bit/DICOM intensity: {prep.intensity}"


def _model_table(saved: SavedModel) -> str:
    model = saved.config.model
    rows = [
        ("architecture", f"{model.arch} ({model.head} head)"),
        ("input", _input_text(saved)),
        ("classes", ", ".join(saved.class_names)),
    ]
    if saved.positive_class is not None:
        rows.append(("positive class", saved.positive_class))
        rows.append(("threshold", _threshold_text(saved.threshold)))
    task = saved.task
    if isinstance(task, MultilabelTask):
        rows[2] = ("findings", f"{len(task.class_names)}, a sigmoid each")
        return _table([], [[html.escape(k), html.escape(v)] for k, v in rows]) + _findings(saved)
    return _table([], [[html.escape(k), html.escape(v)] for k, v in rows])


def _findings(saved: SavedModel) -> str:
    """Per finding: in the score, uncertain/missing policy, saved threshold."""
    task = saved.task
    assert isinstance(task, MultilabelTask)
    cuts = saved.finding_thresholds
    rows = [
        [
            html.escape(name),
            "yes" if name in task.scored else "no",
            html.escape(f"{task.uncertain[j]} / {task.missing[j]}"),
            "0.5 (none saved)" if cuts is None else f"{cuts.values[j]:.4f}",
        ]
        for j, name in enumerate(task.class_names)
    ]
    how = (
        f"<p>Thresholds: {html.escape(cuts.method)}, on {html.escape(cuts.chosen_on)}.</p>"
        if cuts
        else ""
    )
    return _table(["finding", "in the score", "uncertain / missing", "threshold"], rows) + how


def _threshold_text(threshold: Threshold | None) -> str:
    if threshold is None:
        return "none saved (resume its search with distmed.tune --resume to choose one)"
    return f"{threshold.value:.4f} ({threshold.method}, on {threshold.chosen_on})"


def _data_text(summary: RunSummary | None, problem: str) -> str:
    if summary is None:
        return f"<p>{html.escape(problem)}: training data and scores unknown.</p>"
    return (
        f"<p>Trained on <b>{html.escape(summary.data.name)}</b>: "
        f"{summary.data.num_images} images in the cross-validation pool.</p>"
    )


def _cv_text(summary: RunSummary | None) -> str:
    if summary is None or summary.best_cv_roc_auc is None:
        return ""
    std = summary.best_cv_roc_auc_std
    text = (
        f"<p>CV ROC-AUC (mean ± std over folds): <span class='cv-auc'>"
        f"{summary.best_cv_roc_auc:.4f} ± {std if std is not None else float('nan'):.4f}"
        "</span>"
    )
    if summary.best_cv_roc_auc_se is not None:  # absent from summaries before cv.repeats
        text += (
            "; standard error of the mean, corrected for overlapping training sets (Nadeau "
            f"& Bengio 2003): <span class='cv-se'>{summary.best_cv_roc_auc_se:.4f}</span>"
        )
    return text + "</p>"


def _test_table(summary: RunSummary | None, predictions: Path, task: Task) -> str:
    if summary is None or summary.test_metrics is None:
        return "<p>No test-split metrics in summary.json.</p>"
    test = summary.test_metrics
    intervals = _intervals(predictions, task)
    rows = []
    names = list(CI_METRICS)
    multilabel = isinstance(task, MultilabelTask)
    if isinstance(task, MultilabelTask):  # each finding's ROC-AUC after the means
        names += [finding_auc_key(n) for n in task.class_names if finding_auc_key(n) in test]
    for name in names:
        ci = "not saved" if intervals is None else "{:.4f} – {:.4f}".format(*intervals[name])
        rows.append([html.escape(name), f"{test[name]:.4f}", ci])
    decisions = (
        "decisions at 0.5 per finding; the first rows are means over the scored findings"
        if multilabel
        else "argmax decisions"
    )
    caption = (
        f"<p>Test split, {test.get('num_samples', '?')} images, evaluated once "
        f"({decisions}; 95% bootstrap CI, {CI_RESAMPLES} resamples):</p>"
    )
    return caption + _table(["metric", "value", "95% CI"], rows)


def _intervals(path: Path, task: Task) -> dict[str, tuple[float, float]] | None:
    """CIs from the saved test predictions (absent for runs made before they were saved)."""
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return task.bootstrap(saved["labels"], saved["probs"], resamples=CI_RESAMPLES)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = f"<tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"
