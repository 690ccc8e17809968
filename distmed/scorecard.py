"""Scored predictions -> metrics with bootstrap intervals -> HTML (a table and the figures).

One place for what the report shows of a search's test split and what `distmed.evaluate`
shows of another site's images, so both read alike: `score` computes the numbers once (for
the page and for JSON), `scores_section` renders them with the ROC, confusion,
precision-recall and calibration figures; `figure`, `table` and `num` are the page's pieces
and `render_page` its shell (style, title, footer).
"""

from __future__ import annotations

import base64
import html
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from distmed import __version__, plots
from distmed.metrics import CI_METRICS
from distmed.task import BinaryTask, Task


@dataclass(frozen=True)
class Scores:
    """One scored set: true labels (N,), class probabilities (N, K), and the task."""

    labels: np.ndarray
    probs: np.ndarray
    task: Task

    @property
    def class_names(self) -> list[str]:
        return list(self.task.class_names)

    def absent_classes(self) -> list[str]:
        """Names of the classes without a single true example in this set."""
        present = set(np.unique(self.labels).tolist())
        return [name for k, name in enumerate(self.class_names) if k not in present]


@dataclass(frozen=True)
class Estimate:
    """Point estimates of `METRIC_NAMES` and 95% intervals of `CI_METRICS` (low, high)."""

    point: dict[str, float]
    ci: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Scorecard:
    """The metrics of one set at argmax and, for binary tasks given one, at `threshold`."""

    argmax: Estimate
    at_threshold: Estimate | None
    threshold: float | None
    resamples: int
    num_samples: int


def score(scores: Scores, threshold: float | None, resamples: int) -> Scorecard:
    """Metrics by argmax (and at `threshold`), with percentile bootstrap intervals.

    Intervals resample cases (`Task.bootstrap`, seed 0). A metric undefined on the
    set (ROC-AUC with a class absent) is NaN, and so are its interval's ends.
    """
    labels, probs, task = scores.labels, scores.probs, scores.task
    with warnings.catch_warnings():
        # Every resample lacks an absent class: numpy warns of the all-NaN AUC column.
        warnings.simplefilter("ignore", RuntimeWarning)
        argmax = Estimate(
            task.metrics(labels, probs), task.bootstrap(labels, probs, None, resamples)
        )
        at = None
        if threshold is not None and isinstance(task, BinaryTask):
            at = Estimate(
                task.metrics_at(labels, probs, threshold),
                task.bootstrap(labels, probs, threshold, resamples),
            )
    return Scorecard(argmax, at, threshold if at else None, resamples, len(labels))


def scorecard_json(card: Scorecard) -> dict[str, Any]:
    """The scorecard as JSON types; NaN (undefined) becomes null."""

    def estimate(e: Estimate | None) -> dict[str, Any] | None:
        if e is None:
            return None
        return {
            "metrics": {k: _finite(v) for k, v in e.point.items()},
            "ci95": {k: [_finite(a), _finite(b)] for k, (a, b) in e.ci.items()},
        }

    return {
        "num_samples": card.num_samples,
        "bootstrap_resamples": card.resamples,
        "threshold": card.threshold,
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
    names, task, cut = scores.class_names, scores.task, card.threshold
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
    columns = [("argmax", keys[0], card.argmax)]
    if card.at_threshold is not None:
        assert card.threshold is not None  # set together by `score`
        columns.append((f"at threshold {card.threshold:.4f}", keys[1], card.at_threshold))
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
        "Multi-class sensitivity, specificity and F1 are macro averages.</p>"
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
