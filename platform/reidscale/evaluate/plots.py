"""PNG plots of evaluation results: distance histograms, CMC curves, ROC curves.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting needs no
display, does not change the process-wide backend and is safe from worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    # the legend's texts also go into the PNG's text chunk "Legend" (one per line), so a test or a
    # script can tell which curves a figure holds (every model of an overlay) without reading pixels
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    fig.savefig(path, dpi=120, metadata={"Legend": "\n".join(legends)} if legends else None)
    return path


def legend_texts(path: str | Path) -> list[str]:
    """The legend entries a figure written here was drawn with (from its PNG text chunk)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get("Legend", "")
    return text.splitlines()


def plot_distance_histograms(genuine: np.ndarray, impostor: np.ndarray, path: str | Path, *,
                             bins: int = 100, title: str = "Pair distances", impostor_total: int | None = None) -> Path:
    """Overlaid density histograms of genuine (same identity) and impostor pair distances.

    ``impostor_total``: how many impostor pairs ``impostor`` was sampled from (the legend says so).
    """
    genuine, impostor = np.ravel(genuine), np.ravel(impostor)
    both = np.concatenate([genuine, impostor])
    edges = np.histogram_bin_edges(both[np.isfinite(both)], bins=bins)  # shared, so areas compare
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    sampled = f" sampled of {impostor_total:,}" if impostor_total and impostor_total > len(impostor) else ""
    ax.hist(impostor, bins=edges, density=True, alpha=0.55, color="tab:red",
            label=f"impostor (n={len(impostor):,}{sampled})")
    ax.hist(genuine, bins=edges, density=True, alpha=0.55, color="tab:blue",
            label=f"genuine (n={len(genuine):,})")
    ax.set(xlabel="distance", ylabel="density", title=title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_cmc(cmc: np.ndarray | Sequence[np.ndarray], path: str | Path,
             label: str | Sequence[str] | None = None, *, title: str = "CMC") -> Path:
    """CMC curve(s): accuracy at rank k = 1..len(cmc). One curve with ``label: str``, or a list
    of curves with a list of labels."""
    curves = [np.asarray(cmc)] if np.ndim(cmc[0]) == 0 else [np.asarray(c) for c in cmc]
    labels = [label] * len(curves) if label is None or isinstance(label, str) else list(label)
    if len(labels) != len(curves):
        raise ValueError(f"{len(curves)} curves but {len(labels)} labels")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for curve, name in zip(curves, labels):
        ranks = np.arange(1, len(curve) + 1)
        text = f"{name}: " if name else ""
        ax.plot(ranks, curve, marker="." if len(curve) <= 50 else None,
                label=f"{text}rank-1 {curve[0]:.3f}")
    ax.set(xlabel="rank", ylabel="matching rate", title=title, ylim=(0, 1.01), xlim=(1, None))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(far, tar, path: str | Path, *, label: str | Sequence[str] | None = None,
             title: str = "ROC", mark_fars: Sequence[float] = (1e-4, 1e-3, 1e-2)) -> Path:
    """TAR against FAR on a log FAR axis (points with FAR = 0 cannot be shown and are dropped);
    dotted lines mark ``mark_fars``. One curve (arrays, ``label: str``) or several (lists of
    arrays and a list of labels), overlaid."""
    several = np.ndim(far[0]) > 0
    fars = [np.asarray(f) for f in far] if several else [np.asarray(far)]
    tars = [np.asarray(t) for t in tar] if several else [np.asarray(tar)]
    labels = [label] * len(fars) if label is None or isinstance(label, str) else list(label)
    if not len(fars) == len(tars) == len(labels):
        raise ValueError(f"{len(fars)} FAR arrays, {len(tars)} TAR arrays and {len(labels)} labels")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for f, t, name in zip(fars, tars, labels):
        shown = f > 0
        ax.step(f[shown], t[shown], where="post", label=name)
    for f in mark_fars:
        ax.axvline(f, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set(xlabel="false accept rate (FAR)", ylabel="true accept rate (TAR)", title=title, ylim=(0, 1.01))
    ax.grid(alpha=0.3, which="both")
    if any(labels):
        ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)
