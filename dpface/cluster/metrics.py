"""Clustering metrics: pairwise and BCubed precision / recall / F-score, NMI.

All work from the contingency table of (predicted cluster, true identity) counts, so they
cost O(n log n), not O(n²). Conventions: with no predicted same-cluster pair pairwise
precision is 1 (nothing claimed, nothing wrong); with no true pair its recall is 1.
"""
from __future__ import annotations

import numpy as np

from .knn import ClusterError


def _check(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred).ravel(), np.asarray(true).ravel()
    if p.shape != t.shape:
        raise ClusterError(f"predicted labels ({p.size}) and true labels ({t.size}) differ in length")
    if p.size == 0:
        raise ClusterError("no labels: an empty pool has no clustering to score")
    return np.unique(p, return_inverse=True)[1].ravel(), np.unique(t, return_inverse=True)[1].ravel()


def _contingency(p: np.ndarray, t: np.ndarray):
    """(cell counts n_ij, the cell's cluster i, its identity j) over the non-empty cells."""
    cells, counts = np.unique(p * (int(t.max()) + 1) + t, return_counts=True)
    return counts.astype(np.float64), cells // (int(t.max()) + 1), cells % (int(t.max()) + 1)


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def pairwise(pred, true) -> dict:
    """Precision / recall / F over same-cluster pairs (unordered pairs of distinct items)."""
    p, t = _check(pred, true)
    nij, _, _ = _contingency(p, t)
    tp = float((nij * (nij - 1) / 2).sum())
    a, b = np.bincount(p).astype(np.float64), np.bincount(t).astype(np.float64)
    pred_pairs, true_pairs = float((a * (a - 1) / 2).sum()), float((b * (b - 1) / 2).sum())
    prec = tp / pred_pairs if pred_pairs else 1.0
    rec = tp / true_pairs if true_pairs else 1.0
    return {"precision": prec, "recall": rec, "f": _f(prec, rec)}


def bcubed(pred, true) -> dict:
    """BCubed (Bagga & Baldwin): per item, the share of its cluster with its identity (precision)
    and the share of its identity in its cluster (recall), averaged over items."""
    p, t = _check(pred, true)
    nij, ci, cj = _contingency(p, t)
    a, b = np.bincount(p).astype(np.float64), np.bincount(t).astype(np.float64)
    n = p.size
    prec = float((nij * nij / a[ci]).sum() / n)
    rec = float((nij * nij / b[cj]).sum() / n)
    return {"precision": prec, "recall": rec, "f": _f(prec, rec)}


def nmi(pred, true) -> float:
    """Normalised mutual information (sklearn, arithmetic normalisation)."""
    from sklearn.metrics import normalized_mutual_info_score

    p, t = _check(pred, true)
    return float(normalized_mutual_info_score(t, p))


def all_metrics(pred, true) -> dict:
    """Flat dict: pairwise_{precision,recall,f}, bcubed_{…}, nmi, num_clusters."""
    out = {f"pairwise_{k}": v for k, v in pairwise(pred, true).items()}
    out.update({f"bcubed_{k}": v for k, v in bcubed(pred, true).items()})
    out["nmi"] = nmi(pred, true)
    out["num_clusters"] = int(np.unique(np.asarray(pred)).size)
    return out
