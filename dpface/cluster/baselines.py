"""Baselines: agglomerative clustering (cosine distance, average linkage) with a distance
threshold tuned on labelled identities, and k-means told the true number of identities."""
from __future__ import annotations

import numpy as np

from .knn import ClusterError, check_embeddings, knn_graph
from .linkage import best_threshold, merge
from .metrics import pairwise

# Average linkage needs the condensed distance matrix (n(n-1)/2 float64): 4e4 points are 6.4 GB.
MAX_AGGLOMERATIVE = 40_000


def _check_size(n: int) -> None:
    if n > MAX_AGGLOMERATIVE:
        gb = n * (n - 1) / 2 * 8 / 1e9
        raise ClusterError(f"agglomerative clustering of {n} embeddings needs O(n²) memory "
                           f"(~{gb:.0f} GB of distances); at most {MAX_AGGLOMERATIVE} here")


def agglomerative(x, threshold: float) -> np.ndarray:
    """sklearn AgglomerativeClustering (metric cosine, linkage average): clusters closer than
    ``threshold`` (cosine distance, 1 − cos) merge."""
    from sklearn.cluster import AgglomerativeClustering

    x = check_embeddings(x)
    _check_size(x.shape[0])
    if x.shape[0] == 1:
        return np.zeros(1, np.int64)
    m = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                distance_threshold=float(threshold))
    return m.fit_predict(x).astype(np.int64)


def tune_agglomerative_threshold(x, labels, candidates: int = 64) -> tuple[float, float]:
    """(threshold, pairwise F at it) maximising pairwise F on labelled embeddings.

    The average-linkage tree is built once (scipy's ``linkage``, the same merges as sklearn's
    AgglomerativeClustering) and cut at ``candidates`` heights between consecutive merge
    distances (quantiles of them), instead of refitting sklearn per threshold."""
    from scipy.cluster.hierarchy import fcluster, linkage

    x = check_embeddings(x, "labelled embeddings")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ClusterError(f"labels: {y.shape} for {x.shape[0]} embeddings")
    _check_size(x.shape[0])
    if x.shape[0] < 2:
        raise ClusterError("tuning a threshold needs at least 2 labelled embeddings")
    z = linkage(x.astype(np.float64), method="average", metric="cosine")
    h = np.unique(z[:, 2])
    mids = np.unique(np.concatenate([[h[0] / 2], (h[1:] + h[:-1]) / 2, [h[-1] + 1e-6]]))
    grid = np.unique(np.quantile(mids, np.linspace(0, 1, candidates)))
    best = (float(grid[0]), -1.0)
    for t in grid:
        # fcluster keeps merges at height <= t; sklearn merges below its threshold: the grid
        # lies between merge heights, where the two agree.
        f = pairwise(fcluster(z, t, criterion="distance"), y)["f"]
        if f > best[1]:
            best = (float(t), f)
    return best


def kmeans(x, k: int, seed: int = 0, n_init: int = 3) -> np.ndarray:
    """sklearn KMeans with the true number of identities on the L2-normalised embeddings."""
    from sklearn.cluster import KMeans

    x = check_embeddings(x)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= x.shape[0]:
        raise ClusterError(f"k-means: k must be an integer in [1, {x.shape[0]}], got {k!r}")
    return KMeans(n_clusters=int(k), n_init=n_init, random_state=seed).fit_predict(x).astype(np.int64)


def knn_threshold(x, threshold: float, k: int = 10, index: str = "auto", progress=None,
                  max_size: int | None = None) -> np.ndarray:
    """The scalable baseline: each embedding joined to those of its ``k`` nearest neighbours
    closer than cosine ``threshold``, clusters the connected components (single linkage on
    the kNN graph: O(N k) memory, any N the kNN index handles); ``max_size`` as in
    :func:`~dpface.cluster.linkage.merge`."""
    x = check_embeddings(x)
    ids, sims = knn_graph(x, min(k, x.shape[0] - 1), index, progress=progress)
    return merge(x.shape[0], np.repeat(np.arange(x.shape[0]), ids.shape[1]), ids.ravel(), sims.ravel(),
                 float(threshold), max_size=max_size)


COSINES = np.round(np.arange(0.05, 0.951, 0.025), 3)  # the kNN threshold's tuning grid


def tune_knn_threshold(x, labels, k: int = 10,
                       graph: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float]:
    """(cosine threshold, pairwise F at it) maximising :func:`knn_threshold`'s pairwise F on
    labelled embeddings over ``COSINES``; ``graph``: their (ids, sims) kNN graph with at
    least ``k`` columns, if already built."""
    x = check_embeddings(x, "labelled embeddings")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or x.shape[0] < 2:
        raise ClusterError(f"labels: {y.shape} for {x.shape[0]} embeddings (at least 2 needed)")
    k = min(k, x.shape[0] - 1)
    ids, sims = knn_graph(x, k) if graph is None else graph
    ids, sims = ids[:, :k], sims[:, :k]
    return best_threshold(np.repeat(np.arange(x.shape[0]), k), ids.ravel(), sims.ravel(), y, COSINES)
