"""Linkage merging: weighted edges → clusters.

Edges (p, q) with weights in [0, 1] (the GCN's linkage probabilities) are symmetrised (the
mean of (p, q) and (q, p) where both were scored), the ones above ``threshold`` are kept
and the clusters are the connected components (scipy's). With ``max_size`` this is the
paper's pseudo label propagation (after Zhan et al.'s CDP): a component larger than
``max_size`` is split again with the threshold raised by ``step``, repeatedly, until every
part fits or the threshold passes the largest weight (such a part is kept whole). Near the
largest weight the step halves the remaining gap instead: the GCN scores many edges within
1e-3 of 1, which fixed steps would jump over.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .knn import ClusterError
from .metrics import pairwise


def symmetric_edges(src, dst, weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (i < j) with the mean weight of their directed copies; self-loops dropped."""
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    w = np.asarray(weight, np.float64)
    if not (src.shape == dst.shape == w.shape) or src.ndim != 1:
        raise ClusterError(f"edges: src, dst and weight must be equal-length 1-D arrays, got "
                           f"{src.shape}, {dst.shape}, {w.shape}")
    if not np.isfinite(w).all():
        raise ClusterError("edges: non-finite edge weights")
    keep = src != dst
    a, b, w = np.minimum(src, dst)[keep], np.maximum(src, dst)[keep], w[keep]
    if a.size == 0:
        return a, b, w
    n = int(b.max()) + 1
    pairs, inv = np.unique(a * n + b, return_inverse=True)
    mean = np.bincount(inv, weights=w) / np.bincount(inv)
    return pairs // n, pairs % n, mean


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label of each of the n nodes given undirected edges (a, b)."""
    g = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    return connected_components(g, directed=False)[1].astype(np.int64)


def canonical_labels(labels) -> np.ndarray:
    """Cluster ids renumbered by size (largest first; ties: the one with the smaller first member)."""
    labels = np.asarray(labels)
    _, first, inv, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))  # rank of each old cluster
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inv.ravel()].astype(np.int64)


def merge(n: int, src, dst, weight, threshold: float, max_size: int | None = None,
          step: float = 0.05) -> np.ndarray:
    """Cluster labels [n] (canonical: 0 is the largest cluster) of the nodes 0..n-1 linked by
    edges with weight > ``threshold``; unlinked nodes are singletons."""
    if n < 1:
        raise ClusterError("empty pool: nothing to cluster")
    if max_size is not None and (isinstance(max_size, bool) or int(max_size) < 1):
        raise ClusterError(f"max_size must be a positive integer or None, got {max_size!r}")
    if not step > 0:
        raise ClusterError(f"step must be > 0, got {step!r}")
    a, b, w = symmetric_edges(src, dst, weight)
    if a.size and int(b.max()) >= n:
        raise ClusterError(f"edges: node {int(b.max())} outside the pool of {n}")
    keep = w > threshold
    a, b, w = a[keep], b[keep], w[keep]
    labels = components(n, a, b)
    if max_size is None:
        return canonical_labels(labels)
    top = w.max() if w.size else threshold
    t = float(threshold)
    while True:
        sizes = np.bincount(labels)
        big = sizes[labels] > max_size
        if not big.any():
            break
        nxt = t + step if t + step < top else (t + top) / 2
        if nxt - t < 1e-7:  # no edge is left to cut: keep the remaining big parts whole
            break
        t = nxt
        # Re-split only inside the oversized components, at the raised threshold.
        inside = big[a] & (w > t)
        sub = components(n, a[inside], b[inside])
        labels = np.unique(np.where(big, sub + labels.max() + 1, labels), return_inverse=True)[1].ravel()
        kept = inside | ~big[a]
        a, b, w = a[kept], b[kept], w[kept]
    return canonical_labels(labels)


def best_threshold(src, dst, weight, labels, grid) -> tuple[float, float]:
    """(threshold, pairwise F) of the ``grid`` value whose :func:`merge` of these edges best
    matches ``labels``: the middle of the best plateau, not its first point (ties are common
    on small sets, and the lowest tied threshold is the one most likely to over-merge unseen
    identities)."""
    y = np.asarray(labels)
    f = np.array([pairwise(merge(y.size, src, dst, weight, float(t)), y)["f"] for t in grid])
    best = np.nonzero(f >= f.max() - 1e-9)[0]
    k = best[len(best) // 2]
    return float(grid[k]), float(f[k])
