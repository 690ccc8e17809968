"""Scored predictions -> metrics with bootstrap intervals -> HTML (a table and the figures).

One place for what the report shows of a search's test split and what `distmed.evaluate`
shows of another site's images, so both read alike: `score` computes the numbers once (for
the page and for JSON), `scores_section` renders them with the ROC, confusion,
precision-recall and calibration figures; `figure`, `table` and `num` are the page's pieces
and `render_page` its shell (style, title, footer). A multi-label task (several findings
per image) gets a table per finding instead of the confusion matrix: its policies, whether
it is in the mean and why not, prevalence, ROC-AUC with its interval, and sensitivity and
specificity at its threshold; its curves are drawn per finding.
"""

from __future__ import annotations

import base64
import html
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from distmed import __version__, plots
from distmed.metrics import CI_METRICS
from distmed.task.base import Task
from distmed.task.multilabel import MultilabelTask
from distmed.task.single import BinaryTask


@dataclass(frozen=True)
class Scores:
    """One scored set: true labels (N,), class probabilities (N, K), and the task.

    Multi-label: targets (N, L) of 1, 0 and NaN (ignored) and probabilities (N, L);
    `unscored` says, per finding left out of the task's mean, why (`scorable_here`).
    """

    labels: np.ndarray
    probs: np.ndarray
    task: Task
    unscored: dict[str, str] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return list(self.task.class_names)

    def absent_classes(self) -> list[str]:
        """Names of the classes without a single true example in this set (multi-label:
        the findings without a known positive or without a known negative)."""
        if isinstance(self.task, MultilabelTask):
            return [
                name
                for name, (truth, _) in zip(
                    self.class_names, self.task.columns(self.labels, self.probs), strict=True
                )
                if truth.all() or not truth.any()
            ]
        present = set(np.unique(self.labels).tolist())
        return [name for k, name in enumerate(self.class_names) if k not in present]


NOT_SCORED_BY_MODEL = "not scored by the model"


def unscored_reasons(
    task: MultilabelTask, score_findings: Sequence[str] | None, folds: int
) -> dict[str, str]:
    """Why each finding outside the model's score is there: not named in
    `data.score_findings`, or too rare in the CV pool to score in every fold
    (`task.multilabel_task`'s rule, against `cv.folds` = `folds`)."""
    named = set(score_findings or ())
    return {
        n: "not in data.score_findings"
        if score_findings and n not in named
        else f"fewer than cv.folds={folds} positive or negative images in the CV pool after "
        "its uncertain/missing policy"
        for n in task.class_names
        if n not in task.scored
    }


ONE_CLASS_HERE = "no known {} image in this set: its ROC-AUC is undefined"


def scorable_here(scores: Scores, why_unscored: dict[str, str] | None = None) -> Scores:
    """A multi-label set whose task's mean covers only the model's scored findings that
    have known positive and negative images here; `unscored` says why each other finding is
    left out (`why_unscored`: the model's own reasons, else NOT_SCORED_BY_MODEL). Other
    tasks: `scores` unchanged. When no scored finding is left, the model's scored findings
    stay (the mean is then undefined, and says so)."""
    task = scores.task
    if not isinstance(task, MultilabelTask):
        return scores
    reasons = {
        n: (why_unscored or {}).get(n, NOT_SCORED_BY_MODEL)
        for n in task.class_names
        if n not in task.scored
    }
    columns = dict(zip(task.class_names, task.columns(scores.labels, scores.probs), strict=True))
    for name in task.scored:
        truth = columns[name][0]
        if not truth.any() or truth.all():
            reasons[name] = ONE_CLASS_HERE.format("positive" if not truth.any() else "negative")
    kept = tuple(n for n in task.scored if n not in reasons) or task.scored
    return replace(scores, task=replace(task, scored=kept), unscored=reasons)


@dataclass(frozen=True)
class Estimate:
    """Point estimates of `METRIC_NAMES` and 95% intervals of `CI_METRICS` (low, high)."""

    point: dict[str, float]
    ci: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Scorecard:
    """The metrics of one set at argmax and, for binary tasks given one, at `threshold`.

    Multi-label: "argmax" is each finding's decision at 0.5, `threshold` the (L,) vector of
    per-finding thresholds; the `CI_METRICS` are means over the scored findings, each
    finding's own under "<metric>/<finding>" in the intervals (`MultilabelTask.bootstrap`).
    """

    argmax: Estimate
    at_threshold: Estimate | None
    threshold: float | np.ndarray | None
    resamples: int
    num_samples: int
    multilabel: bool = False


def score(scores: Scores, threshold: float | np.ndarray | None, resamples: int) -> Scorecard:
    """Metrics by argmax (and at `threshold`), with percentile bootstrap intervals.

    Intervals resample cases (`Task.bootstrap`, seed 0). A metric undefined on the
    set (ROC-AUC with a class absent) is NaN, and so are its interval's ends.
    A multi-label task: at 0.5 and at the (L,) per-finding `threshold`.
    """
    labels, probs, task = scores.labels, scores.probs, scores.task
    multilabel = isinstance(task, MultilabelTask)
    if isinstance(task, MultilabelTask) and threshold is not None:
        threshold = task.thresholds_of(threshold)
    with warnings.catch_warnings():
        # Every resample lacks an absent class: numpy warns of the all-NaN AUC column.
        warnings.simplefilter("ignore", RuntimeWarning)
        argmax = Estimate(
            _point(task, labels, probs, None), task.bootstrap(labels, probs, None, resamples)
        )
        at = None
        if threshold is not None and isinstance(task, BinaryTask | MultilabelTask):
            at = Estimate(
                _point(task, labels, probs, threshold),
                task.bootstrap(labels, probs, threshold, resamples),  # type: ignore[arg-type]
            )
    return Scorecard(argmax, at, threshold if at else None, resamples, len(labels), multilabel)


def _point(
    task: Task, labels: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray | None
) -> dict[str, float]:
    """Point estimates: argmax (None) or at `threshold`; a multi-label task's also per
    finding under "<metric>/<finding>" (`CI_METRICS`, as its intervals are keyed)."""
    if isinstance(task, MultilabelTask):
        point = task.metrics_at(labels, probs, threshold)
        for name, values in zip(
            task.class_names, task.finding_metrics(labels, probs, threshold), strict=True
        ):
            point.update({f"{metric}/{name}": values[metric] for metric in CI_METRICS})
        return point
    if threshold is None:
        return task.metrics(labels, probs)
    assert isinstance(task, BinaryTask)
    return task.metrics_at(labels, probs, float(threshold))


def scorecard_json(card: Scorecard) -> dict[str, Any]:
    """The scorecard as JSON types; NaN (undefined) becomes null."""

    def estimate(e: Estimate | None) -> dict[str, Any] | None:
        if e is None:
            return None
        return {
            "metrics": {k: _finite(v) for k, v in e.point.items()},
            "ci95": {k: [_finite(a), _finite(b)] for k, (a, b) in e.ci.items()},
        }

    cut = card.threshold
    return {
        "num_samples": card.num_samples,
        "bootstrap_resamples": card.resamples,
        "threshold": cut.tolist() if isinstance(cut, np.ndarray) else cut,
        "argmax": estimate(card.argmax),
        "at_threshold": estimate(card.at_threshold),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- HTML


def scores_section(
    scores: Scores,
    card: Scorecard,
    figures: Path,
    link: str,
    title: str = "Test split",
    keys: tuple[str, str] = ("test_metrics", "test_at_threshold"),
) -> str:
    """The metrics table and the ROC, confusion, PR and calibration figures (in `figures`).

    `link` is the figures folder as the page links to it; `title` names the set on the
    figures ("Test split"); `keys` prefix the table cells' `data-key` for the argmax and
    the threshold column. Curves need examples of every
    class: with one absent only the confusion matrix is drawn, and the page says why.
    """
    if isinstance(scores.task, MultilabelTask):
        return findings_section(scores, card, figures, link, title, keys)
    names, task, cut = scores.class_names, scores.task, card.threshold
    assert not isinstance(cut, np.ndarray)  # one threshold: binary
    decision = task.decide(scores.probs, cut)
    matrix = skm.confusion_matrix(scores.labels, decision, labels=np.arange(len(names)))
    how = f"threshold {cut:.4f}" if cut is not None else "argmax"
    parts = [
        metrics_table(card, keys),
        figure(plots.plot_confusion(matrix, names, how, figures / "confusion.png", title), link),
    ]
    absent = scores.absent_classes()
    if absent:
        parts.insert(1, _absent_text(absent, task.thresholded))
        return "\n".join(parts)
    labels, probs, out = scores.labels, scores.probs, figures
    operating = None
    if cut is not None and isinstance(task, BinaryTask):
        operating = operating_point(labels, decision, task)
    roc = plots.plot_roc(labels, probs, task, out / "roc.png", operating, title)
    pr = plots.plot_precision_recall(labels, probs, task, out / "pr.png", title)
    calib = plots.plot_calibration(labels, probs, task, out / "calib.png", title=title)
    parts.insert(1, figure(roc, link))
    parts += [figure(pr, link), figure(calib, link)]
    return "\n".join(parts)


def findings_section(
    scores: Scores,
    card: Scorecard,
    figures: Path,
    link: str,
    title: str,
    keys: tuple[str, str],
) -> str:
    """A multi-label set: the mean metrics table, the per-finding table, and the ROC, PR and
    calibration curves of every finding with known positives and negatives here."""
    parts = [metrics_table(card, keys), finding_table(scores, card, keys)]
    absent = scores.absent_classes()
    drawable = [n for n in scores.class_names if n not in absent]
    if absent:
        shown = ", ".join(html.escape(n) for n in absent)
        parts.append(
            f"<p>No curve for finding(s) {shown}: no known positive or no known negative "
            "image in this set.</p>"
        )
    if not drawable:
        return "\n".join(parts)
    labels, probs, task, out = scores.labels, scores.probs, scores.task, figures
    keep = [scores.class_names.index(n) for n in drawable]
    assert isinstance(task, MultilabelTask)
    sub = MultilabelTask(
        tuple(drawable),
        tuple(task.uncertain[i] for i in keep),
        tuple(task.missing[i] for i in keep),
    )
    labels, probs = np.asarray(labels)[:, keep], np.asarray(probs)[:, keep]
    parts.append(figure(plots.plot_roc(labels, probs, sub, out / "roc.png", None, title), link))
    parts.append(
        figure(plots.plot_precision_recall(labels, probs, sub, out / "pr.png", title), link)
    )
    calib = plots.plot_calibration(labels, probs, sub, out / "calib.png", title=title)
    parts.append(figure(calib, link))
    return "\n".join(parts)


def finding_table(scores: Scores, card: Scorecard, keys: tuple[str, str]) -> str:
    """One row per finding: its uncertain/missing policies, in the mean or why not, known
    images, prevalence, ROC-AUC with its 95% interval, and (at its threshold, else 0.5) the
    threshold, sensitivity and specificity with intervals; then the mean over the scored
    findings. Cells keep exact values in `data-key` "<key>.<metric>/<finding>"."""
    task = scores.task
    assert isinstance(task, MultilabelTask)
    estimate = card.at_threshold or card.argmax
    key = keys[1] if card.at_threshold is not None else keys[0]
    cuts = task.thresholds_of(card.threshold if card.at_threshold is not None else None)
    columns = task.columns(scores.labels, scores.probs)
    rows = []
    for name, (truth, _), cut in zip(task.class_names, columns, cuts, strict=True):
        j = task.class_names.index(name)
        status = "yes" if name in task.scored else f"no: {scores.unscored.get(name, '')}"
        prevalence = float(truth.mean()) if truth.size else math.nan
        row = [
            html.escape(name),
            html.escape(status),
            html.escape(f"{task.uncertain[j]} / {task.missing[j]}"),
            num(f"{key}.known/{name}", int(truth.size), "{}"),
            num(f"{key}.prevalence/{name}", prevalence),
        ]
        for metric in ("roc_auc", "sensitivity", "specificity"):
            row += [
                num(f"{key}.{metric}/{name}", estimate.point.get(f"{metric}/{name}", math.nan)),
                _interval(estimate.ci.get(f"{metric}/{name}", (math.nan, math.nan))),
            ]
        row.insert(7, num(f"{key}.threshold/{name}", float(cut)))
        rows.append(row)
    mean = ["<b>mean over scored findings</b>", html.escape(f"{len(task.scored)} finding(s)")]
    mean += ["", "", ""]
    for metric in ("roc_auc", "sensitivity", "specificity"):
        mean += [num(f"{key}.{metric}", estimate.point[metric]), _interval(estimate.ci[metric])]
    mean.insert(7, "")
    rows.append(mean)
    header = [
        "finding",
        "in the mean",
        "uncertain / missing",
        "known images",
        "prevalence",
        "ROC-AUC",
        "95% CI",
        "threshold",
        "sensitivity",
        "95% CI",
        "specificity",
        "95% CI",
    ]
    where = (
        "at each finding's threshold"
        if card.at_threshold is not None
        else "at 0.5 (no thresholds saved)"
    )
    note = (
        "<p>Per finding, over its known labels (an uncertain or missing label with policy "
        "<i>ignore</i> is left out; <i>ones</i>/<i>zeros</i> make it a label). Prevalence: "
        f"the share of positives among them; sensitivity and specificity {where}. The score "
        "is the mean ROC-AUC over the findings in the mean.</p>"
    )
    return note + table(header, rows)


def _interval(ci: tuple[float, float]) -> str:
    low, high = ci
    return f"{low:.4f} – {high:.4f}" if math.isfinite(low + high) else "–"


def _absent_text(absent: list[str], binary: bool) -> str:
    names = ", ".join(html.escape(n) for n in absent)
    auc = (
        "ROC-AUC needs images of both classes, so it is undefined here (–), and "
        "sensitivity or specificity (whichever counts the absent class) is 0 by convention"
        if binary
        else "macro ROC-AUC needs images of every class, so it is undefined here (–)"
    )
    return (
        f"<p><b>No image of class {names} in this set.</b> {auc}; the ROC, "
        "precision-recall and calibration curves are left out.</p>"
    )


def metrics_table(card: Scorecard, keys: tuple[str, str]) -> str:
    """Point estimates (argmax; and at the threshold) with their 95% intervals."""
    multilabel = card.multilabel
    first = "at 0.5 per finding" if multilabel else "argmax"
    columns = [(first, keys[0], card.argmax)]
    if card.at_threshold is not None:
        assert card.threshold is not None  # set together by `score`
        second = (
            "at each finding's threshold"
            if isinstance(card.threshold, np.ndarray)
            else f"at threshold {card.threshold:.4f}"
        )
        columns.append((second, keys[1], card.at_threshold))
    header = ["metric"]
    cells: dict[str, list[str]] = {name: [name] for name in CI_METRICS}
    for title, key, estimate in columns:
        header += [title, "95% CI"]
        for name in CI_METRICS:
            low, high = estimate.ci[name]
            interval = f"{low:.4f} – {high:.4f}" if math.isfinite(low + high) else "–"
            cells[name] += [num(f"{key}.{name}", estimate.point[name]), interval]
    note = (
        f"<p>{card.num_samples} images; 95% percentile bootstrap intervals over "
        f"{card.resamples} case resamples (seed 0). ROC-AUC does not depend on the threshold. "
        + (
            "Several findings per image: every metric is the mean over the scored findings "
            "(per finding below).</p>"
            if multilabel
            else "Multi-class sensitivity, specificity and F1 are macro averages.</p>"
        )
    )
    return note + table(header, list(cells.values()))


def operating_point(
    labels: np.ndarray, decision: np.ndarray, task: BinaryTask
) -> tuple[float, float]:
    """(false positive rate, true positive rate) of binary decisions (class indices, N)."""
    truth, said = task.truth(labels), decision == task.positive
    return float(said[~truth].mean()), float(said[truth].mean())


def figure(path: Path, folder: str) -> str:
    """The PNG embedded (opens offline, one file to share) plus links to it and its copies.

    `folder`: where the page finds the figure files, relative to the page itself.
    """
    data = base64.b64encode(path.read_bytes()).decode()
    link = f"{folder}/{path.name}"
    vectors = " ".join(
        f"<a href='{folder}/{v.name}'>{v.suffix[1:].upper()}</a>"
        for v in plots.vector_copies(path)
        if v.is_file()
    )
    return (
        f"<figure><img src='data:image/png;base64,{data}' alt='{link}'>"
        f"<figcaption><a href='{link}'>{link}</a> {vectors}</figcaption></figure>"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are HTML already (escape text before)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def num(key: str, value: Any, fmt: str = "{:.4f}") -> str:
    """A number shown rounded, its exact value kept in `data-value` (tests compare those).

    None and NaN (undefined) show as a dash.
    """
    if value is None:
        return "–"
    if isinstance(value, np.floating | float):
        value = float(value)  # repr of numpy scalars would read np.float64(...)
        if math.isnan(value):
            return f"<span data-key='{key}' data-value='nan'>–</span>"
    return f"<span data-key='{key}' data-value='{value!r}'>{fmt.format(value)}</span>"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; }
figcaption { font-size: 0.8em; color: #666; }
footer { font-size: 0.8em; color: #666; border-top: 1px solid #ccc; margin-top: 2em; }
"""


def render_page(
    name: str,
    sections: list[str],
    versions: Mapping[str, str] | None = None,
    generated: datetime | None = None,
) -> str:
    """The whole HTML page: the sections, then a footer with when and with what it was made.

    `versions`: the run's software versions (`RunSummary.versions`: distmed, python, torch,
    ...), as recorded by the search; `generated`: the report's time (default: now), shown
    in UTC as ISO 8601.
    """
    body = "\n".join(s for s in sections if s)
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>distmed report: {html.escape(name)}</title><style>{STYLE}</style></head>\n"
        f"<body><h1>distmed report: {html.escape(name)}</h1>\n{body}\n"
        f"{_footer(versions or {}, generated or datetime.now(timezone.utc))}\n</body></html>\n"
    )


def _footer(versions: Mapping[str, str], generated: datetime) -> str:
    when = generated.astimezone(timezone.utc).isoformat(timespec="seconds")
    made_with = ", ".join(f"{html.escape(k)} {html.escape(v)}" for k, v in versions.items())
    run = f"; search run with {made_with}" if made_with else ""
    return f"<footer><p>Report generated {when} by distmed {__version__}{run}.</p></footer>"
