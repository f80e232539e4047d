"""Optional plots; matplotlib is imported only when a plot is asked for (never a hard dependency)."""
from __future__ import annotations

import os

import numpy as np


def roc_plot(fpr, tpr, path, label: str | None = None, log_fpr: bool = True) -> None:
    """Save a ROC curve to ``path`` (format from the extension). FAR on a log axis by default,
    because face-verification operating points (1e-4 … 1e-6) vanish on a linear one."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless: training nodes have no display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("roc_plot needs matplotlib: pip install matplotlib") from e
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1:
        raise ValueError(f"fpr and tpr must be 1-D of equal length, got {fpr.shape}, {tpr.shape}")
    fig, ax = plt.subplots(figsize=(5, 4))
    try:
        if log_fpr:
            keep = fpr > 0  # log axis cannot show FAR = 0
            ax.semilogx(fpr[keep], tpr[keep], label=label)
        else:
            ax.plot(fpr, tpr, label=label)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_ylim(0.0, 1.0)
        ax.grid(True, which="both", alpha=0.3)
        if label:
            ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.fspath(path))
    finally:
        plt.close(fig)
