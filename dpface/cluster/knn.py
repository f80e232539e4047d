"""Checked, L2-normalised embeddings and their kNN graph (faiss): exact (``flat``) or
approximate (``ivf``: inverted lists over k-means cells; ``hnsw``: a navigable small-world
graph), built and searched in chunks of queries with bounded memory, the queries optionally
sharded over the ranks of a process group.

``auto`` is exact up to ``FLAT_MAX`` embeddings (O(N²) inner products) and HNSW above: on
pools shaped like face embeddings (a few near neighbours of the same identity, the rest at the
tail of a cosine-~0 impostor distribution) HNSW keeps recall at k = 80 near 0.95 where IVF,
probing cells of the space, needs to scan a large share of it for the same recall
(benchmarks/RESULTS.md, "Clustering at scale"). Before anything is built the index's memory
is estimated and refused, with the estimate, when it exceeds what the machine has available.
"""
from __future__ import annotations

import math
import time

import numpy as np

INDEXES = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX = 100_000  # auto: exact search up to here
QUERY_CHUNK = 8192  # queries per search call: results held at once are chunk × (k + 1) × 12 bytes
HNSW_M = 32


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


def ivf_lists(n: int) -> int:
    """IVF cells for n embeddings: ≈ 4·√n (faiss's guidance), at least 1, at most n / 39 (k-means
    needs ~39 training points per centroid)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def index_bytes(kind: str, n: int, d: int) -> int:
    """Estimated memory of an index over n d-dimensional float32 embeddings (vectors + structure)."""
    vectors = 4 * n * d
    if kind == "flat":
        return vectors
    if kind == "ivf":
        return vectors + 8 * n + 4 * ivf_lists(n) * d
    if kind == "hnsw":
        return vectors + int(4 * n * 2 * HNSW_M * 1.1)  # level-0 links (2M per node) + upper levels
    raise ClusterError(f"index must be one of {', '.join(INDEXES[1:])}, got {kind!r}")


def available_bytes() -> int | None:
    """MemAvailable of this machine (Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pick_index(index: str, n: int) -> str:
    if index not in INDEXES:
        raise ClusterError(f"index must be one of {', '.join(INDEXES)}, got {index!r}")
    return index if index != "auto" else ("flat" if n <= FLAT_MAX else "hnsw")


def build_index(x: np.ndarray, kind: str, nprobe: int | None = None, ef_search: int | None = None,
                k: int = 80, seed: int = 0):
    """A faiss inner-product index over normalised ``x``."""
    import faiss

    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # the same cells on every rank and every run
        train = x if n <= 256 * nlist else x[np.random.default_rng(seed).choice(n, 256 * nlist, replace=False)]
        index.train(train)
        # Default: an eighth of the cells, at least 8, and enough cells to hold ~4(k+1) candidates.
        index.nprobe = int(nprobe or min(nlist, max(8, math.ceil(nlist / 8), math.ceil(4 * (k + 1) * nlist / n))))
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        # 5(k + 1) candidates: recall at k = 80 0.914 with 2(k + 1), 0.961 with 5(k + 1) on face-like
        # pools of 10⁵ (benchmarks/RESULTS.md, "Clustering at scale"), the search ~2.4× longer.
        index.hnsw.efSearch = int(ef_search or max(5 * (k + 1), 128))
    else:
        raise ClusterError(f"index must be one of {', '.join(INDEXES)}, got {kind!r}")
    for start in range(0, n, 1 << 18):  # added in chunks: no second copy of the pool
        index.add(x[start:start + (1 << 18)])
    return index


def knn_graph(x: np.ndarray, k: int, index: str = "auto", *, nprobe: int | None = None,
              ef_search: int | None = None, group=None, progress=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour ids int64 [N, k], cosine similarities float32 [N, k]) of every row, most similar
    first, the row itself excluded. ``x`` must be normalised (:func:`check_embeddings`).

    ``index``: ``flat`` (exact), ``ivf`` / ``hnsw`` (approximate), ``auto`` (exact up to
    ``FLAT_MAX``). Queries are searched ``QUERY_CHUNK`` at a time (``progress(done, total, s)``
    after each); given a process ``group`` (every rank of it calls), every rank searches a
    contiguous slice of the queries and the slices are all-gathered, so each returns the whole graph."""
    n, d = x.shape
    k = check_k(k, n)
    kind = pick_index(index, n)
    # The index and the [N, k] graph it produces, estimated before anything is built.
    need, avail = index_bytes(kind, n, d) + 12 * n * k, available_bytes()
    if avail is not None and need > avail:
        raise ClusterError(f"a {kind} index over {n:,} embeddings of dimension {d} and its k = {k} graph need "
                           f"about {need / 2**30:.1f} GiB, and {avail / 2**30:.1f} GiB are available: use fewer "
                           f"embeddings or a smaller k{'' if kind == 'ivf' else ', or index ivf'}")
    idx = build_index(x, kind, nprobe=nprobe, ef_search=ef_search, k=k, seed=seed)
    rank, world = 0, 1
    if group is not None:  # explicit: a caller on one rank of a larger job must not wait for the others
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
    lo, hi = n * rank // world, n * (rank + 1) // world
    ids = np.empty((hi - lo, k), np.int64)
    sims = np.empty((hi - lo, k), np.float32)
    t0 = time.perf_counter()
    for start in range(lo, hi, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, hi)
        s, i = idx.search(x[start:stop], k + 1)
        # Drop the row itself; where another row outranked it (an exact duplicate, or the ANN
        # search missed it), drop the last column instead. Per chunk: the results held at
        # once are one chunk's, plus the [N, k] outputs.
        own = i == np.arange(start, stop)[:, None]
        own[~own.any(axis=1), -1] = True
        keep = ~own
        ids[start - lo:stop - lo] = i[keep].reshape(-1, k)
        sims[start - lo:stop - lo] = s[keep].reshape(-1, k)
        if progress is not None:
            progress(stop - lo, hi - lo, time.perf_counter() - t0)
    del idx
    if world > 1:
        ids, sims = _gather_rows(ids, sims, n, world, group)
    if (ids < 0).any():  # unfilled ANN slots
        raise ClusterError(f"the {kind} index found fewer than k = {k} neighbours for "
                           f"{int((ids < 0).any(axis=1).sum())} embeddings: raise nprobe / ef_search or use index flat")
    return ids, sims


def _gather_rows(ids: np.ndarray, sims: np.ndarray, n: int, world: int, group) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's contiguous slice of the rows, in rank order (padded to one size for gloo)."""
    import torch
    import torch.distributed as dist

    rows = -(-n // world)
    pad = rows - ids.shape[0]
    t_ids = torch.from_numpy(np.pad(ids, ((0, pad), (0, 0)), constant_values=-1))
    t_sims = torch.from_numpy(np.pad(sims, ((0, pad), (0, 0))))
    all_ids = [torch.empty_like(t_ids) for _ in range(world)]
    all_sims = [torch.empty_like(t_sims) for _ in range(world)]
    dist.all_gather(all_ids, t_ids, group=group)
    dist.all_gather(all_sims, t_sims, group=group)
    sizes = [n * (r + 1) // world - n * r // world for r in range(world)]
    return (np.concatenate([a[:m].numpy() for a, m in zip(all_ids, sizes)]),
            np.concatenate([a[:m].numpy() for a, m in zip(all_sims, sizes)]))


def recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact k nearest neighbours the approximate graph found (row by row)."""
    hits = sum(np.intersect1d(a, e, assume_unique=True).size for a, e in zip(approx_ids, exact_ids))
    return hits / exact_ids.size
