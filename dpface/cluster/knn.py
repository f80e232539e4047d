"""Checked, L2-normalised embeddings and their kNN graph (faiss, exact inner product)."""
from __future__ import annotations

import numpy as np


class ClusterError(ValueError):
    """Bad clustering input (embeddings, k, a GCN file): the message names the problem."""


def check_embeddings(x, name: str = "embeddings", dim: int | None = None, dim_source: str = "") -> np.ndarray:
    """``x`` as L2-normalised float32 [N, D] (C-contiguous, a copy), or a ClusterError naming
    what is wrong: not 2-D, an empty pool, another dimension than ``dim``, NaN/Inf, zero rows."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ClusterError(f"{name}: expected numeric embeddings, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ClusterError(f"{name}: expected a 2-D array [N, D], got shape {a.shape}")
    if a.shape[0] == 0:
        raise ClusterError(f"{name}: empty pool (0 embeddings): nothing to cluster")
    if dim is not None and a.shape[1] != dim:
        raise ClusterError(f"{name}: embeddings have dimension {a.shape[1]}, "
                           f"{dim_source or 'expected'} {dim}")
    a = a.astype(np.float32)  # a copy: normalised in place below
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise ClusterError(f"{name}: {int(bad.sum())} of {a.shape[0]} embeddings hold NaN or Inf "
                           f"(first: row {int(np.argmax(bad))})")
    norms = np.linalg.norm(a, axis=1)
    if (norms == 0).any():
        raise ClusterError(f"{name}: {int((norms == 0).sum())} embeddings are all zeros "
                           f"(first: row {int(np.argmax(norms == 0))}): no direction to compare")
    a /= norms[:, None]
    return np.ascontiguousarray(a)


def check_k(k, n: int, what: str = "k", pool: str = "the pool") -> int:
    """``k`` neighbours are possible in a pool of ``n`` (each item has n − 1 others)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClusterError(f"{what} must be a positive integer, got {k!r}")
    if k > n - 1:
        raise ClusterError(f"{pool}: {n} embeddings, too few for {what} = {k} nearest neighbours "
                           f"(each has {n - 1} others): use a pool of more than {k} embeddings or a smaller k")
    return int(k)


def knn_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour ids int64 [N, k], cosine similarities float32 [N, k]) of every row, most similar
    first, the row itself excluded. ``x`` must be normalised (:func:`check_embeddings`); the
    search is exact (``faiss.IndexFlatIP``)."""
    import faiss

    n = x.shape[0]
    k = check_k(k, n)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, k + 1)
    # Drop the row itself; where an exact duplicate outranked it, drop the last column instead.
    own = ids == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return ids[keep].reshape(n, k).astype(np.int64), sims[keep].reshape(n, k)
