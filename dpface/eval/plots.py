"""Optional plots; matplotlib is imported only when a plot is asked for (never a hard dependency)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless: training nodes have no display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib (or dpface[all])") from e
    return plt


def _curves(curves: dict) -> dict:
    out = {}
    for label, (x, y) in curves.items():
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"curve {label!r}: x and y must be 1-D of equal length, "
                             f"got {x.shape}, {y.shape}")
        out[label] = (x, y)
    return out


def _save(fig, ax, path, legend: bool) -> Path:
    plt = _pyplot()
    try:
        ax.grid(True, which="both", alpha=0.3)
        if legend:
            ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        path = Path(os.fspath(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def roc_plot(fpr, tpr, path, label: str | None = None, log_fpr: bool = True) -> None:
    """Save a ROC curve to ``path`` (format from the extension). FAR on a log axis by default,
    because face-verification operating points (1e-4 … 1e-6) vanish on a linear one."""
    roc_plots({label: (fpr, tpr)}, path, log_fpr=log_fpr)


def roc_plots(curves: dict, path, log_fpr: bool = True, title: str | None = None) -> Path:
    """Several ROC curves (label → (fpr, tpr)) in one figure; FAR on a log axis by default
    (points at FAR 0 cannot be drawn there and are left out)."""
    curves = _curves(curves)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (fpr, tpr) in curves.items():
        if log_fpr:
            keep = fpr > 0
            ax.semilogx(fpr[keep], tpr[keep], label=label)
        else:
            ax.plot(fpr, tpr, label=label)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0.0, 1.0)
    if title:
        ax.set_title(title, fontsize="medium")
    return _save(fig, ax, path, any(k for k in curves))


def det_plots(curves: dict, path, title: str | None = None) -> Path:
    """Detection-error trade-off: false reject rate (1 − TAR) against false accept rate, both
    on log axes (label → (fpr, tpr)); points where either rate is 0 are left out."""
    curves = _curves(curves)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (fpr, tpr) in curves.items():
        fnr = 1.0 - tpr
        keep = (fpr > 0) & (fnr > 0)
        ax.loglog(fpr[keep], fnr[keep], label=label)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("false reject rate")
    if title:
        ax.set_title(title, fontsize="medium")
    return _save(fig, ax, path, any(k for k in curves))


def cmc_plot(curves: dict, path, title: str | None = None) -> Path:
    """Cumulative match characteristic: identification rate against rank (label → (ranks,
    rates)), ranks on a log axis."""
    curves = _curves(curves)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (ranks, rates) in curves.items():
        ax.semilogx(ranks, rates, marker=".", label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0.0, 1.0)
    if title:
        ax.set_title(title, fontsize="medium")
    return _save(fig, ax, path, any(k for k in curves))


def distractor_plot(counts, rank1, path, title: str | None = None) -> Path:
    """Rank-1 identification rate against the number of distractors in the gallery
    (symmetric-log axis, so 0 distractors is drawn too)."""
    (counts, rank1), = _curves({None: (counts, rank1)}).values()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(counts, rank1, marker="o")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("distractors in the gallery")
    ax.set_ylabel("rank-1 identification rate")
    ax.set_ylim(0.0, 1.0)
    if title:
        ax.set_title(title, fontsize="medium")
    return _save(fig, ax, path, False)
