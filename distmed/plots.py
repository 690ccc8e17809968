"""The report's figures: each function draws one figure from plain arrays and returns the
path of its PNG (300 dpi); vector copies (SVG and PDF, for papers) are written beside it.

Matplotlib with the Agg backend (no display needed); every axis is labelled, and each
figure is closed once saved so a long report does not accumulate memory. Text that comes
from the data (class, file and parameter names, titles) goes through `literal`: it is drawn
as written, never parsed as mathtext.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402

from distmed.task.base import Curve, Task  # noqa: E402

DPI = 300  # print resolution for the PNGs
VECTOR_FORMATS = ("svg", "pdf")
TRAIN_STYLE: dict[str, Any] = {"linestyle": "-", "marker": "o", "markersize": 3}
VAL_STYLE: dict[str, Any] = {"linestyle": "--", "marker": "s", "markersize": 3}
UNIT_MARGIN = 0.02  # room around rate axes (ROC, PR) so curves at 0 or 1 stay visible


def literal(text: Any) -> str:
    """`text` as a label matplotlib draws character for character.

    Matplotlib reads a string with an even number of unescaped `$` as mathtext, so a class
    folder named `$x$` or `a$b$c` would be typeset (or, like `$\\frac$`, crash the figure).
    Escaping every `$` as `\\$` is matplotlib's documented way to a literal dollar sign
    (https://matplotlib.org/stable/users/explain/text/mathtext.html); the text then holds
    no unescaped `$` and `Text` draws it with the escapes removed, i.e. exactly `text`.
    """
    return str(text).replace("$", r"\$")


def _literals(texts: Sequence[Any]) -> list[str]:
    return [literal(t) for t in texts]


def save(fig: plt.Figure, path: Path, tight: bool = True) -> Path:
    """`path` (PNG at DPI) and its vector copies `path`.svg/.pdf; the figure is closed."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    for fmt in VECTOR_FORMATS:
        fig.savefig(path.with_suffix(f".{fmt}"))
    plt.close(fig)
    return path


def vector_copies(path: Path) -> list[Path]:
    return [path.with_suffix(f".{fmt}") for fmt in VECTOR_FORMATS]


# --------------------------------------------------------------------------- the search


def plot_search_progress(
    aucs: Sequence[float], statuses: Sequence[str], path: Path, x_label: str
) -> Path:
    """CV ROC-AUC of each trial in the given order, and the best completed one so far."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    order = np.arange(1, len(aucs) + 1)
    values = np.asarray(aucs, dtype=float)
    for status, marker in (("completed", "o"), ("stopped", "x"), ("errored", "v")):
        pick = np.asarray([s == status for s in statuses])
        if pick.any():
            ax.scatter(order[pick], values[pick], marker=marker, label=status, zorder=3)
    completed = np.where([s == "completed" for s in statuses], values, np.nan)
    if np.isfinite(completed).any():  # no legend entry for a line that is not drawn
        running = np.fmax.accumulate(np.nan_to_num(completed, nan=-np.inf))
        running[np.isinf(running)] = np.nan
        ax.step(order, running, where="post", color="black", label="best completed so far")
    ax.set(xlabel=literal(x_label), ylabel="CV ROC-AUC (mean over folds)")
    ax.set_title("Search progress")
    ax.set_xticks(_integer_ticks(order))
    ax.set_xlim(0.5, len(order) + 0.5)
    cap_auc_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save(fig, path)


def plot_pareto_front(
    num_params: Sequence[int], aucs: Sequence[float], chosen: int | None, path: Path
) -> Path:
    """A two-objective search's Pareto front: CV ROC-AUC against the model's parameter
    count (log scale), the points joined in order; `chosen` (an index) is the refitted one."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    sizes, values = np.asarray(num_params, dtype=float), np.asarray(aucs, dtype=float)
    order = np.argsort(sizes)
    ax.step(sizes[order], values[order], where="post", color="grey", alpha=0.6)
    ax.scatter(sizes, values, marker="o", zorder=3, label="Pareto front (completed trials)")
    if chosen is not None:
        ax.scatter(
            [sizes[chosen]],
            [values[chosen]],
            marker="*",
            s=160,
            color="black",
            zorder=4,
            label="refitted",
        )
    ax.set_xscale("log")
    ax.set(xlabel="model parameters (count, log scale)", ylabel="CV ROC-AUC (mean over folds)")
    ax.set_title("Accuracy against model size")
    cap_auc_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save(fig, path)


def plot_params(
    params: Mapping[str, Sequence[Any]], aucs: Sequence[float], best: int, path: Path
) -> Path:
    """One panel per searched hyperparameter against CV ROC-AUC; the best trial is a star."""
    names = list(params)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    values = np.asarray(aucs, dtype=float)
    for ax, name in zip(axes.flat, names, strict=False):
        x, ticks = _axis_values(params[name])
        ax.scatter(x, values, alpha=0.8)
        ax.scatter([x[best]], [values[best]], marker="*", s=180, color="red", label="best")
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), _literals(ticks))
        elif _spans_decades(x):
            ax.set_xscale("log")
        elif _all_integers(x):  # batch size, unfreeze: no 31/32/33 ticks between choices
            ax.set_xticks(_integer_ticks(np.unique(x[np.isfinite(x)])))
        ax.set(xlabel=literal(name), ylabel="CV ROC-AUC")
        cap_auc_axis(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Hyperparameters against CV ROC-AUC (stopped trials: last value)")
    return save(fig, path)


def _axis_values(raw: Sequence[Any]) -> tuple[np.ndarray, list[str] | None]:
    """Numbers stay numbers; anything else becomes category positions with tick labels."""
    try:
        return np.asarray([float(v) for v in raw]), None
    except (TypeError, ValueError):
        labels = sorted({str(v) for v in raw})
        return np.asarray([labels.index(str(v)) for v in raw], dtype=float), labels


def _all_integers(x: np.ndarray) -> bool:
    finite = x[np.isfinite(x)]
    return bool(len(finite)) and bool(np.all(finite == np.round(finite)))


def _integer_ticks(values: np.ndarray, most: int = 12) -> list[int]:
    """Whole-number ticks at the given values, thinned to at most `most`."""
    ticks = sorted({int(v) for v in values})
    step = max(1, math.ceil(len(ticks) / most))
    return ticks[::step]


def cap_auc_axis(ax: plt.Axes) -> None:
    """ROC-AUC never exceeds 1: the axis stops just above it (room for markers at 1.0)."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, min(high, 1.02))


def _spans_decades(x: np.ndarray) -> bool:
    finite = x[np.isfinite(x)]
    return bool(len(finite) and finite.min() > 0 and finite.max() / finite.min() >= 20)


def plot_fold_aucs(aucs: Sequence[float], path: Path) -> Path:
    """The best trial's validation ROC-AUC per fold, with the mean and ± one std."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    values = np.asarray(aucs, dtype=float)
    mean, std = float(np.mean(values)), float(np.std(values))
    ax.bar(np.arange(len(values)), values, color="tab:blue", alpha=0.8)
    ax.axhline(mean, color="black", label=f"mean {mean:.4f}")
    ax.axhspan(mean - std, mean + std, color="grey", alpha=0.25, label=f"± std {std:.4f}")
    ax.set_xticks(range(len(values)), [f"fold {k}" for k in range(len(values))])
    ax.set(ylabel="validation ROC-AUC", ylim=(max(0.0, values.min() - 0.1), 1.0))
    ax.set_title("Best trial: ROC-AUC per fold")
    ax.legend(fontsize=8, loc="best")
    return save(fig, path)


# --------------------------------------------------------------------------- training curves


def plot_training_curves(histories: Sequence[Sequence[dict[str, float]]], path: Path) -> Path:
    """Loss, accuracy and ROC-AUC per epoch; one colour per fold, train solid, val dashed."""
    panels = (("loss", "loss (cross-entropy)"), ("accuracy", "accuracy"), ("roc_auc", "ROC-AUC"))
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for fold, history in enumerate(histories):
        epochs = [r["epoch"] for r in history]
        colour = colours[fold % len(colours)]
        for ax, (key, _) in zip(axes, panels, strict=True):
            for prefix, style in (("train", TRAIN_STYLE), ("val", VAL_STYLE)):
                values = [r.get(f"{prefix}_{key}", np.nan) for r in history]
                ax.plot(epochs, values, color=colour, **style)
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set(xlabel="epoch", ylabel=label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], color=colours[k % len(colours)], label=f"fold {k}")
        for k in range(len(histories))
    ]
    handles += [
        plt.Line2D([], [], color="black", label="train", **TRAIN_STYLE),
        plt.Line2D([], [], color="black", label="validation", **VAL_STYLE),
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.suptitle("Best trial: training curves per fold")
    fig.set_layout_engine("constrained")
    return save(fig, path, tight=False)


# --------------------------------------------------------------------------- the test split


def plot_roc(
    labels: np.ndarray,
    probs: np.ndarray,
    task: Task,
    path: Path,
    operating_point: tuple[float, float] | None = None,
    title: str = "Test split",
) -> Path:
    """ROC curve of each of the task's curves (`Task.curves`: the positive class of a binary
    task, one-vs-rest per class otherwise), plus their macro average when there are several.

    `title` names the scored set (the report's test split, an external site's images).
    """
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    title = literal(title)
    curves = task.curves(labels, probs)
    for curve in curves:
        fpr, tpr, _ = skm.roc_curve(curve.truth, curve.score)
        label = f"{literal(curve.name)} (AUC {skm.auc(fpr, tpr):.3f})"
        ax.plot(fpr, tpr, label=label, zorder=3 + curve.index)
    if len(curves) > 1:
        # The unweighted mean of one-vs-rest AUCs: scikit-learn's multi_class="ovr" macro.
        macro = float(np.mean([skm.roc_auc_score(c.truth, c.score) for c in curves]))
        grid, mean_tpr = _macro_roc(curves)
        ax.plot(grid, mean_tpr, color="black", linestyle=":", label=f"macro (AUC {macro:.3f})")
    if operating_point is not None:
        fpr_op, tpr_op = operating_point
        ax.scatter([fpr_op], [tpr_op], color="red", zorder=10, label="operating threshold")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate")
    frame_unit_square(ax)
    ax.set_title(f"{title}: ROC curve")
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, path)


def frame_unit_square(ax: plt.Axes) -> None:
    """Both axes over [0, 1] plus UNIT_MARGIN each side: a curve along 0 or 1 (a perfect
    recall or precision, the ROC's corners) is drawn inside the frame, not hidden by it."""
    ax.set_xlim(-UNIT_MARGIN, 1 + UNIT_MARGIN)
    ax.set_ylim(-UNIT_MARGIN, 1 + UNIT_MARGIN)


def _macro_roc(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray]:
    grid = np.linspace(0, 1, 201)
    rates = []
    for curve in curves:
        fpr, tpr, _ = skm.roc_curve(curve.truth, curve.score)
        rates.append(np.interp(grid, fpr, tpr))
    return grid, np.mean(rates, axis=0)


def plot_confusion(
    matrix: np.ndarray,
    class_names: Sequence[str],
    decision: str,
    path: Path,
    title: str = "Test split",
) -> Path:
    """Counts and row-normalised (share of each true class) confusion matrices."""
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.4))
    class_names, title, decision = _literals(class_names), literal(title), literal(decision)
    rates = matrix / np.clip(matrix.sum(axis=1, keepdims=True), 1, None)
    for ax, data, panel, fmt in (
        (axes[0], matrix, "counts", "{:d}"),
        (axes[1], rates, "row-normalised", "{:.2f}"),
    ):
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if fmt == "{:.2f}" else None)
        fig.colorbar(image, ax=ax, fraction=0.046)
        for (i, j), value in np.ndenumerate(data):
            colour = "white" if value > data.max() / 2 else "black"
            ax.text(j, i, fmt.format(value), ha="center", va="center", color=colour)
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45 if len(class_names) > 4 else 0)
        ax.set_yticks(ticks, class_names)
        ax.set(xlabel="predicted class", ylabel="true class", title=panel)
    fig.suptitle(f"{title}: confusion matrix ({decision})")
    return save(fig, path)


def plot_precision_recall(
    labels: np.ndarray,
    probs: np.ndarray,
    task: Task,
    path: Path,
    title: str = "Test split",
) -> Path:
    """Precision against recall of the positive class (binary) or each class one-vs-rest."""
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    title = literal(title)
    for c in task.curves(labels, probs):
        precision, recall, _ = skm.precision_recall_curve(c.truth, c.score)
        ap = skm.average_precision_score(c.truth, c.score)
        name = literal(c.name)
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f}, prevalence {c.truth.mean():.2f})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision")
    frame_unit_square(ax)
    ax.set_title(f"{title}: precision-recall curve")
    ax.legend(fontsize=8, loc="lower left")
    return save(fig, path)


def plot_calibration(
    labels: np.ndarray,
    probs: np.ndarray,
    task: Task,
    path: Path,
    bins: int = 10,
    after_probs: np.ndarray | None = None,
    title: str = "Test split",
) -> Path:
    """Reliability diagram: observed frequency per quantile bin of predicted probability.

    With `after_probs` (N, K), the same predictions after temperature scaling are drawn over
    `probs` (N, K), dashed, in the same colour per class; the legend gives the ECE of each
    (`Task.calibration_error`: 15 equal-width bins).
    """
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    title = literal(title)
    if after_probs is None:
        for c in task.curves(labels, probs):
            observed, predicted = calibration_curve(
                c.truth, c.score, n_bins=bins, strategy="quantile"
            )
            ax.plot(predicted, observed, marker="o", label=literal(c.name))
        heading = f"{title}: calibration (quantile bins)"
    else:
        _draw_before_after(ax, labels, (probs, after_probs), task, bins)
        heading = f"{title}: calibration before and after\ntemperature scaling (quantile bins)"
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(heading)
    ax.legend(fontsize=8, loc="upper left")
    return save(fig, path)


def _draw_before_after(ax, labels, versions, task: Task, bins: int) -> None:
    """One colour per class, one line style per version; style entries name each ECE."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    states = ("uncalibrated", "temperature-scaled")
    styles = ({"linestyle": "-", "marker": "o"}, {"linestyle": "--", "marker": "s"})
    for state, style, scores in zip(states, styles, versions, strict=True):
        for c in task.curves(labels, scores):
            observed, predicted = calibration_curve(
                c.truth, c.score, n_bins=bins, strategy="quantile"
            )
            # Classes are named once (by colour); the styles get entries of their own below.
            label = literal(c.name) if state == states[0] else None
            colour = colours[c.index % len(colours)]
            ax.plot(predicted, observed, color=colour, label=label, **style)
        ece = task.calibration_error(labels, scores)
        ax.plot([], [], color="black", label=f"{state} (ECE {ece:.3f})", **style)


def plot_gradcam_grid(
    tiles: Sequence[tuple[np.ndarray, str]],
    columns: int,
    layer: str,
    path: Path,
    explains: str = "the predicted class",
) -> Path:
    """Grad-CAM overlays (uint8 RGB) with a caption each, `columns` per row; `explains`
    says whose score the maps explain (in the title)."""
    rows = math.ceil(len(tiles) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.3 * columns, 2.8 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, caption) in zip(axes.flat, tiles, strict=False):
        ax.imshow(picture, interpolation="bilinear")
        ax.set_title(literal(caption), fontsize=8)
    fig.suptitle(f"Test split: Grad-CAM ({literal(layer)}) for {literal(explains)}")
    return save(fig, path, tight=False)
