"""Figures of a training run: learning curves and the transformer's work.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so
nothing depends on a display or on pyplot's global state.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._io import atomic_write

__all__ = ["Curve", "plot_curves", "plot_epochs", "plot_recovered", "plot_rotation_curves",
           "plot_snapshots", "plot_transforms"]


def _save(fig, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic, as every file of a run: a kill mid-write leaves the old figure or none.
    fmt = path.suffix[1:].lower() or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=100, bbox_inches="tight"))


def plot_curves(history: list[dict], path) -> None:
    """Loss and accuracy per epoch, train and test, side by side."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split in ("train", "test"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], "o-", label=split)
        ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], "o-", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_transforms(model, X: np.ndarray, path) -> None:
    """Inputs (top row) above the spatial transformer's outputs (bottom row).

    Parameters
    ----------
    model : Model
        An ``stn`` model (:func:`stn_numpy.build_model`); its :meth:`~Model.transform`
        gives the bottom row, of shape ``(n, 1, H_o, W_o)``.
    X : ndarray, shape (n, 1, H, W), float in [0, 1]
        The images, one column each.
    path : str or Path
        The image file to write (PNG by its suffix); missing folders are created.
    """
    from matplotlib.figure import Figure

    V = model.transform(X)
    n = len(X)
    fig = Figure(figsize=(1.2 * n, 2.7))
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        for row, images in enumerate((X, V)):
            axes[row, i].imshow(images[i, 0], cmap="gray", vmin=0, vmax=1)
            axes[row, i].set_axis_off()
    axes[0, 0].set_title("input U", loc="left", fontsize=9)
    axes[1, 0].set_title("transformed V", loc="left", fontsize=9)
    _save(fig, path)


def plot_snapshots(X: np.ndarray, images: np.ndarray, epochs, path, title=None) -> None:
    """Test digits (top row) and the transformer's output for them after each epoch.

    Parameters
    ----------
    X : ndarray, shape (n, 1, H, W), float in [0, 1]
        The inputs, one column each.
    images : ndarray, shape (E, n, H_o, W_o)
        The transformer's outputs after each of ``E`` epochs.
    epochs : sequence of int, length E
        The epoch of each row, shown at its left.
    path : str or Path
        The image file to write.
    title : str, optional
    """
    from matplotlib.figure import Figure

    n_rows, n = len(images) + 1, len(X)
    fig = Figure(figsize=(0.9 * n + 0.8, 0.9 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, n, squeeze=False)
    for i in range(n):
        axes[0, i].imshow(X[i, 0], cmap="gray", vmin=0, vmax=1)
        for e in range(len(images)):
            axes[e + 1, i].imshow(images[e, i], cmap="gray", vmin=0, vmax=1)
    for r, label in enumerate(["input"] + [f"epoch {e}" for e in epochs]):
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


_RECOVERED_LABELS = {"rotation": ("applied angle (deg)", "recovered angle (deg)"),
                     "scale": ("applied scale", "window side (digit frames)"),
                     "translation": ("applied offset (px)", "window centre (px)")}


def plot_recovered(measures: dict, path, title=None) -> None:
    """Recovered against applied distortion, one panel per measure, with the fitted line.

    Parameters
    ----------
    measures : dict
        ``name -> {"applied", "recovered", "slope", "intercept", "r2", ...}`` as
        :func:`stn_numpy.measures.transformer_measures` returns them (``"rotation"``,
        ``"scale"``, ``"translation"``).
    path : str or Path
        The image file to write.
    title : str, optional
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(measures), 3.4), layout="constrained")
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, (name, m) in zip(axes, measures.items(), strict=True):
        x, y = np.ravel(m["applied"]), np.ravel(m["recovered"])
        ax.scatter(x, y, s=3, alpha=0.3)
        line = np.array([x.min(), x.max()])
        ax.plot(line, m["slope"] * line + m["intercept"], "r-",
                label=f"slope {m['slope']:+.2f}, R² {m['r2']:.2f}")
        xlabel, ylabel = _RECOVERED_LABELS.get(name, ("applied", "recovered"))
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


class Curve(NamedTuple):
    """One run's values after each epoch, for :func:`plot_epochs`."""

    label: str  # the legend's text
    color: int  # index into the colour cycle (one colour per model)
    style: int  # index into the line styles (one style per seed)
    epochs: list
    errors: list  # test error (%)
    measure: list | None = None  # the transformer's measure (NaN: not measured), or None


_STYLES = ("-", "--", ":", "-.")


_MIN_MEASURE_SPAN = 0.1  # the least y range of a measure panel


def plot_epochs(columns, path, title=None) -> None:
    """Test error (top row) and a transformer measure (bottom row) against epoch.

    Parameters
    ----------
    columns : sequence of (str, list of Curve, str or None, sequence of (float, str))
        One per column (dataset): its title, its runs, the measure's axis label (None: the
        column has no measure and its bottom panel stays empty) and reference values drawn
        as labelled horizontal lines (a target, the ideal).
    path : str or Path
        The image file to write.
    title : str, optional
    """
    from matplotlib.figure import Figure

    measured = any(label is not None for _, _, label, _ in columns)
    n_rows = 2 if measured else 1
    fig = Figure(figsize=(3.4 * len(columns), 3.0 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, len(columns), squeeze=False)
    for j, (name, curves, label, refs) in enumerate(columns):
        top = axes[0, j]
        for c in curves:
            top.plot(c.epochs, c.errors, marker="o", ms=3, color=f"C{c.color}",
                     ls=_STYLES[c.style % len(_STYLES)], label=c.label)
        top.set(title=name, xlabel="epoch", ylabel="test error (%)")
        top.legend(fontsize=7)
        if measured:
            _plot_measure(axes[1, j], curves, label, refs)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _plot_measure(ax, curves, label, refs) -> None:
    if label is None:
        ax.set_axis_off()
        return
    for c in curves:
        if c.measure is not None:
            ax.plot(c.epochs, c.measure, marker="o", ms=3, color=f"C{c.color}",
                    ls=_STYLES[c.style % len(_STYLES)])
    for k, (value, text) in enumerate(refs):
        ax.axhline(value, color="0.4", lw=1, ls=_STYLES[1 + k % 3], label=text)
    ax.set(xlabel="epoch", ylabel=label)
    # Plain tick labels and a span of at least _MIN_MEASURE_SPAN: a measure that stays
    # within 1e-4 of 1 would otherwise fill the panel and read as large swings.
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    low, high = ax.get_ylim()
    if high - low < _MIN_MEASURE_SPAN:
        middle = (low + high) / 2
        ax.set_ylim(middle - _MIN_MEASURE_SPAN / 2, middle + _MIN_MEASURE_SPAN / 2)
    if refs:
        ax.legend(fontsize=7)


def plot_rotation_curves(curves, path, targets=(-0.5, -0.8), title=None) -> None:
    """How much rotation each run undoes, epoch by epoch: slope, R^2 and test error.

    Parameters
    ----------
    curves : sequence of (str, list, list, list, list)
        One per run: its label, the epochs, the rotation slope (recovered against applied;
        -1 undoes every rotation), the fit's R^2 and the test error (%) after each.
    path : str or Path
        The image file to write.
    targets : sequence of float
        Slopes drawn as reference lines.
    title : str, optional
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4), layout="constrained")
    slope_ax, r2_ax, error_ax = fig.subplots(1, 3)
    for k, (label, epochs, slope, r2, errors) in enumerate(curves):
        style = {"color": f"C{k}", "marker": "o", "ms": 3, "label": label}
        slope_ax.plot(epochs, slope, **style)
        r2_ax.plot(epochs, r2, **style)
        error_ax.plot(epochs, errors, **style)
    for j, value in enumerate((0.0, *targets, -1.0)):
        slope_ax.axhline(value, color="0.4", lw=1, ls=_STYLES[1 + j % 3])
    slope_ax.set(ylabel="rotation slope (-1: all undone)", ylim=(-1.1, 0.1))
    r2_ax.set(ylabel="R² of the fit", ylim=(0, 1))
    error_ax.set(ylabel="test error (%)")
    error_ax.set_yscale("log")
    for ax in (slope_ax, r2_ax, error_ax):
        ax.set(xlabel="epoch")
        ax.grid(alpha=0.3)
    slope_ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
