"""Linkage GCN (after Wang et al., "Linkage Based Face Clustering via Graph Convolution
Network", CVPR 2019): instance-pivot subgraphs, the network, its training, inference, file.

**IPS.** Around a pivot p: its k1 nearest neighbours (1-hop, in kNN order) and their k2
nearest neighbours (2-hop, sorted by id), without p and without repeats. Node features are
x_q − x_p (the pivot is encoded by the subtraction, as in the paper). Nodes q, r are joined
when r is among q's ``k_adj`` nearest neighbours or q among r's (from the pool's kNN lists;
undirected), and the adjacency is degree-normalised, G = D^-1/2 A D^-1/2.

**GCN.** Each layer is h' = ReLU([h ‖ G h] W) (the paper's layer with mean aggregation); a
2-layer MLP reads out, for each 1-hop node, one logit: "shares the pivot's identity" (the
paper's 2-way softmax is the same model). It is plain torch on dense tensors: an IPS has at
most k1·(k2 + 1) nodes, so a batch is a padded [B, M, D] feature and [B, M, M] adjacency
tensor and a layer is one batched matmul — no sparse message passing to gain from, hence no
torch-geometric (a heavy dependency with compiled extensions per torch/CUDA version).

**Training.** Labelled identities are split (``val_fraction`` of them held out); pivots
are the training items, the targets their 1-hop neighbours' "same identity" bits (binary
cross-entropy). Each batch's features go through one random orthogonal map (linkage
depends on the geometry only; without it a GCN trained on a few hundred identities
memorises where their centres are and fails on new ones). Input per node: the offset and,
explicitly, its cosine to the pivot; the readout also sees the IPS's max-pooled state (an
addition to the paper's model, see ``LinkageGCN.forward``). The merge threshold is then
tuned (pairwise F of the resulting clusters) on all labelled identities as one pool, the
held-out ones included.

**Inference.** Every item is a pivot; each (pivot, 1-hop neighbour) edge gets the GCN's
probability, and :func:`dpface.cluster.linkage.merge` turns them into clusters.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpface import seeding
from dpface.seeding import Stream

from . import linkage
from .baselines import knn_threshold, tune_knn_threshold
from .knn import ClusterError, check_embeddings, check_k, knn_graph, pick_index
from .metrics import pairwise

GCN_FORMAT = "dpface-linkage-gcn"
GCN_VERSION = 1
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)
CACHE_BYTES = 256 << 20  # training IPS kept in memory up to this size


# ----------------------------------------------------------------------------- IPS
def ips_nodes(knn: np.ndarray, pivot: int, k1: int, k2: int) -> np.ndarray:
    """The IPS's nodes: the pivot's k1 neighbours (kNN order), then the other 2-hop ones (sorted)."""
    hop1 = knn[pivot, :k1]
    hop2 = np.setdiff1d(knn[hop1, :k2].ravel(), np.append(hop1, pivot))
    return np.concatenate([hop1, hop2])


def ips_adjacency(knn: np.ndarray, nodes: np.ndarray, k_adj: int) -> np.ndarray:
    """Symmetric 0/1 adjacency [m, m] among ``nodes``: q–r where one is in the other's k_adj list."""
    m = nodes.size
    order = np.argsort(nodes)
    ordered = nodes[order]
    nb = knn[nodes, :k_adj]
    pos = np.minimum(np.searchsorted(ordered, nb), m - 1)
    hit = ordered[pos] == nb
    a = np.zeros((m, m), np.float32)
    a[np.nonzero(hit)[0], order[pos[hit]]] = 1.0
    np.fill_diagonal(a, 0.0)
    return np.maximum(a, a.T)


def normalise_adjacency(a: np.ndarray) -> np.ndarray:
    """D^-1/2 A D^-1/2 over the last two axes (isolated nodes: zero rows)."""
    deg = a.sum(-1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0).astype(np.float32)
    return a * inv[..., :, None] * inv[..., None, :]


def build_ips(x: np.ndarray, knn: np.ndarray, pivot: int, k1: int, k2: int, k_adj: int):
    """(nodes [m], features x[nodes] − x[pivot] [m, D], normalised adjacency [m, m])."""
    nodes = ips_nodes(knn, pivot, k1, k2)
    return nodes, x[nodes] - x[pivot], normalise_adjacency(ips_adjacency(knn, nodes, k_adj))


def ips_batch(x: np.ndarray, knn: np.ndarray, pivots, k1: int, k2: int, k_adj: int):
    """Padded batch: features [B, M, D], adjacency [B, M, M], nodes [B, M] (−1 = padding),
    M = k1·(k2 + 1). Row b holds :func:`build_ips` of pivot b (its first k1 nodes are the
    1-hop neighbours), built for the whole batch at once with array operations."""
    pivots = np.asarray(pivots, np.int64)
    b, big_m = pivots.size, k1 * (k2 + 1)
    hop1 = knn[pivots, :k1]
    # 2-hop candidates sorted per row; repeats, the pivot and 1-hop nodes become padding (−1)
    # and the survivors are moved to the front in order (a stable sort on "dropped").
    hop2 = np.sort(knn[hop1, :k2].reshape(b, k1 * k2), axis=1)
    drop = (hop2 == pivots[:, None]) | (hop2[:, :, None] == hop1[:, None, :]).any(-1)
    drop[:, 1:] |= hop2[:, 1:] == hop2[:, :-1]
    order = np.argsort(drop, axis=1, kind="stable")
    hop2 = np.where(np.take_along_axis(drop, order, 1), -1, np.take_along_axis(hop2, order, 1))
    nodes = np.concatenate([hop1, hop2], axis=1)
    valid = nodes >= 0
    # Position of each node's k_adj neighbours among its row's nodes: one sorted key per
    # (row, node), looked up with searchsorted.
    n = np.int64(x.shape[0])
    row = np.arange(b, dtype=np.int64)[:, None]
    keys = np.where(valid, row * n + nodes, -1).ravel()
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    nb = knn[np.where(valid, nodes, 0), :k_adj]  # [B, M, k_adj]
    want = (row[:, :, None] * n + nb).ravel()
    pos = np.minimum(np.searchsorted(sorted_keys, want), sorted_keys.size - 1)
    hit = (sorted_keys[pos] == want) & np.repeat(valid.ravel(), k_adj)
    src = np.repeat(np.arange(b * big_m), k_adj)[hit]
    dst = order[pos[hit]] % big_m
    adj = np.zeros((b, big_m, big_m), np.float32)
    adj[src // big_m, src % big_m, dst] = 1.0
    adj = np.maximum(adj, adj.transpose(0, 2, 1))
    adj[:, np.arange(big_m), np.arange(big_m)] = 0.0
    feats = np.where(valid[..., None], x[np.where(valid, nodes, 0)] - x[pivots][:, None], np.float32(0))
    return feats, normalise_adjacency(adj), nodes


# ----------------------------------------------------------------------------- network
class GraphConv(nn.Module):
    """h' = ReLU([h ‖ G h] W + b)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = nn.Linear(2 * d_in, d_out)

    def forward(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return F.relu(self.lin(torch.cat([h, g @ h], dim=-1)))


class LinkageGCN(nn.Module):
    """Logit per 1-hop node of each IPS: does it share the pivot's identity?"""

    def __init__(self, dim: int, hidden: int = 64, layers: int = 3, k1: int = 10, k2: int = 5,
                 k_adj: int = 5, threshold: float = 0.5):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("layers", layers), ("k1", k1), ("k2", k2),
                        ("k_adj", k_adj)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ClusterError(f"GCN {name} must be a positive integer, got {v!r}")
        self.config = {"dim": int(dim), "hidden": int(hidden), "layers": int(layers), "k1": int(k1),
                       "k2": int(k2), "k_adj": int(k_adj)}
        self.threshold = float(threshold)
        widths = [dim + 1] + [hidden] * layers
        self.convs = nn.ModuleList(GraphConv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.readout = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.PReLU(), nn.Linear(hidden, 1))
        # Differences of unit vectors have coordinates ~1/sqrt(D): scaled to O(1) for the layers.
        self.scale = math.sqrt(dim)

    @property
    def k1(self) -> int:
        return self.config["k1"]

    @property
    def k_max(self) -> int:
        """Neighbours per item the kNN graph needs."""
        c = self.config
        return max(c["k1"], c["k2"], c["k_adj"])

    def forward(self, feats: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feats [B, M, D] (x_q − x_p), adj [B, M, M] (normalised), mask [B, M] (real nodes)."""
        # Input: the offset scaled to O(1) coordinates, and the node's cosine to the pivot
        # (1 − |x_q − x_p|²/2), given explicitly because it does not change under a rotation.
        cos = 1 - 0.5 * (feats * feats).sum(-1, keepdim=True)
        h = torch.cat([feats * self.scale, cos], dim=-1) * mask[..., None]
        for conv in self.convs:
            h = conv(h, adj)
        # Readout per 1-hop node: its state and the IPS's max-pooled state (the context that
        # says whether a tighter group sits nearer the pivot; nodes of two groups are often
        # not joined by any edge, so the layers alone cannot carry it between them).
        ctx = h.masked_fill(~mask[..., None], float("-inf")).amax(dim=1, keepdim=True)
        h1 = h[:, : self.k1]
        return self.readout(torch.cat([h1, ctx.expand_as(h1)], dim=-1)).squeeze(-1)  # [B, k1]


# ----------------------------------------------------------------------------- inference
def check_pool(model: LinkageGCN, x, name: str, source: str = "the GCN's") -> np.ndarray:
    """``x`` validated for ``model``: finite, its input dimension, more rows than its k."""
    x = check_embeddings(x, name, dim=model.config["dim"], dim_source=f"{source} input dimension is")
    check_k(model.k_max, x.shape[0], "the GCN's k = max(k1, k2, k_adj)", name)
    return x


@torch.no_grad()
def edge_scores(model: LinkageGCN, x, batch_size: int = 256, device="cpu", knn: np.ndarray | None = None,
                name: str = "embeddings") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pivot, neighbour, probability) for every item and each of its k1 neighbours."""
    x = check_pool(model, x, name)
    c = model.config
    if knn is None:
        knn = knn_graph(x, model.k_max)[0]
    was = model.training
    model.eval()
    probs = np.empty((x.shape[0], c["k1"]), np.float32)
    try:
        for lo in range(0, x.shape[0], batch_size):
            piv = np.arange(lo, min(lo + batch_size, x.shape[0]))
            f, g, nd = ips_batch(x, knn, piv, c["k1"], c["k2"], c["k_adj"])
            logits = model(torch.from_numpy(f).to(device), torch.from_numpy(g).to(device),
                           torch.from_numpy(nd >= 0).to(device))
            probs[lo:lo + piv.size] = torch.sigmoid(logits).float().cpu().numpy()
    finally:
        model.train(was)
    src = np.repeat(np.arange(x.shape[0]), c["k1"])
    return src, knn[:, : c["k1"]].ravel(), probs.ravel()


def cluster(model: LinkageGCN, x, threshold: float | None = None, max_size: int | None = None,
            batch_size: int = 256, device="cpu", name: str = "embeddings", index: str = "auto",
            progress=None) -> tuple[np.ndarray, dict]:
    """(cluster labels [N], timings) of embeddings ``x`` with the GCN; ``threshold`` defaults
    to the one tuned when the GCN was trained; ``index`` is the kNN graph's (``knn.INDEXES``)."""
    x = check_pool(model, x, name)
    t = model.threshold if threshold is None else float(threshold)
    if not 0 <= t < 1:
        raise ClusterError(f"threshold must be in [0, 1), got {t}")
    t0 = time.perf_counter()
    knn = knn_graph(x, model.k_max, index, progress=progress)[0]
    t1 = time.perf_counter()
    src, dst, p = edge_scores(model, x, batch_size=batch_size, device=device, knn=knn, name=name)
    t2 = time.perf_counter()
    labels = linkage.merge(x.shape[0], src, dst, p, t, max_size=max_size)
    t3 = time.perf_counter()
    return labels, {"knn_s": t1 - t0, "gcn_s": t2 - t1, "merge_s": t3 - t2, "threshold": t,
                    "index": pick_index(index, x.shape[0])}


# ----------------------------------------------------------------------------- training
def _split_identities(labels: np.ndarray, val_fraction: float, min_val: int, rng) -> tuple[np.ndarray, np.ndarray]:
    ids = np.unique(labels)
    n_val = int(round(val_fraction * ids.size))
    if n_val < 2 or ids.size - n_val < 2:
        return np.arange(labels.size), np.zeros(0, np.int64)
    val_ids = rng.permutation(ids)[:n_val]
    is_val = np.isin(labels, val_ids)
    if is_val.sum() <= min_val:
        return np.arange(labels.size), np.zeros(0, np.int64)
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def tune_threshold(model: LinkageGCN, x, labels, batch_size: int = 256, device="cpu",
                   knn: np.ndarray | None = None) -> tuple[float, float]:
    """(threshold, pairwise F) maximising the pairwise F of the clusters on labelled embeddings."""
    src, dst, p = edge_scores(model, x, batch_size=batch_size, device=device, knn=knn, name="validation embeddings")
    return linkage.best_threshold(src, dst, p, labels, THRESHOLDS)


def train_gcn(x, labels, *, k1: int = 10, k2: int = 5, k_adj: int = 5, hidden: int = 64, layers: int = 3,
              epochs: int = 80, batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 1e-5,
              val_fraction: float = 0.2, rotate: bool = True, seed: int = 0, device="cpu",
              log=None) -> tuple[LinkageGCN, dict]:
    """Train a :class:`LinkageGCN` on labelled embeddings; returns (model with its tuned
    threshold, info: losses, split sizes, the threshold and its validation pairwise F)."""
    y = np.asarray(labels)
    x = check_embeddings(x, "labelled embeddings")
    if y.shape != (x.shape[0],):
        raise ClusterError(f"labels: shape {y.shape} for {x.shape[0]} embeddings (one label per embedding)")
    if np.unique(y).size < 2:
        raise ClusterError("labelled embeddings: at least 2 identities are needed to learn what differs")
    if not 0 <= val_fraction < 1:
        raise ClusterError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ClusterError(f"{name} must be a positive integer, got {v!r}")
    rng = seeding.rng(seed, Stream.CLUSTER_GCN, 0)  # the identity split
    gen = torch.Generator().manual_seed(seeding.seed_int(seed, Stream.CLUSTER_GCN, 1))  # batches, rotations
    with torch.random.fork_rng(devices=[]):  # the initial weights, without touching the global stream
        torch.manual_seed(seeding.seed_int(seed, Stream.CLUSTER_GCN, 2))
        model = LinkageGCN(x.shape[1], hidden, layers, k1, k2, k_adj).to(device)
    k = model.k_max
    tr, va = _split_identities(y, val_fraction, k, rng)
    xt, yt = x[tr], y[tr]
    check_k(k, xt.shape[0], "k = max(k1, k2, k_adj)", "training identities' embeddings")
    knn = knn_graph(xt, k)[0]
    target = torch.from_numpy((yt[knn[:, :k1]] == yt[:, None]).astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(xt.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses, t0 = [], time.perf_counter()
    big_m = k1 * (k2 + 1)
    # Small sets: every pivot's IPS built once (rebuilding it is most of a CPU step).
    cached = ips_batch(xt, knn, np.arange(xt.shape[0]), k1, k2, k_adj) \
        if xt.shape[0] * big_m * (big_m + x.shape[1]) * 4 <= CACHE_BYTES else None
    model.train()
    for ep in range(epochs):
        order, total = rng.permutation(xt.shape[0]), 0.0
        for lo in range(0, order.size, batch_size):
            piv = order[lo:lo + batch_size]
            f, g, nd = (c[piv] for c in cached) if cached else ips_batch(xt, knn, piv, k1, k2, k_adj)
            f = torch.from_numpy(f)
            if rotate:  # one random orthogonal map per batch: linkage depends on geometry only
                q, r = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=gen))
                f = f @ (q * torch.sign(torch.diagonal(r)))
            logits = model(f.to(device), torch.from_numpy(g).to(device), torch.from_numpy(nd >= 0).to(device))
            loss = F.binary_cross_entropy_with_logits(logits, target[piv].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * piv.size
        losses.append(total / order.size)
        if log and (ep == 0 or (ep + 1) % 10 == 0 or ep + 1 == epochs):
            log(f"train-gcn: epoch {ep + 1}/{epochs} loss {losses[-1]:.4f}")
    # Tuned on every labelled identity as one pool: the held-out ones are unseen by the GCN,
    # and the larger pool has the density of a real one (a few held-out identities alone are
    # easy to separate at almost any threshold).
    tune_on = "training + held-out identities" if va.size else "training identities"
    ids, sims = knn_graph(x, k)  # one graph for both tunings
    model.threshold, f_val = tune_threshold(model, x, y, device=device, knn=ids)
    # The scalable baseline tuned on the same pool, and both scored on the held-out identities
    # only (unseen by the GCN): what `dpface cluster --method auto` chooses by.
    knn_t, _ = tune_knn_threshold(x, y, k=k1, graph=(ids, sims))
    heldout = {}
    if va.size:
        heldout = {"gcn": pairwise(cluster(model, x[va], device=device)[0], y[va])["f"],
                   "knn_threshold": pairwise(knn_threshold(x[va], knn_t, k=k1), y[va])["f"]}
    info = {"losses": losses, "train_items": int(tr.size), "train_identities": int(np.unique(yt).size),
            "val_items": int(va.size), "val_identities": int(np.unique(y[va]).size) if va.size else 0,
            "threshold": model.threshold, "threshold_tuned_on": tune_on, "tuned_pairwise_f": f_val,
            "knn_threshold": knn_t, "heldout_pairwise_f": heldout,
            "largest_identity": int(np.unique(y, return_counts=True)[1].max()),
            "positive_fraction": float(target.mean()), "train_s": time.perf_counter() - t0,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    return model.cpu(), info


# ----------------------------------------------------------------------------- file
def save_gcn(model: LinkageGCN, path, info: dict | None = None) -> Path:
    from dpface.io import atomic_save

    return atomic_save({"format": GCN_FORMAT, "version": GCN_VERSION, "config": dict(model.config),
                        "threshold": model.threshold, "state_dict": model.state_dict(),
                        "info": info or {}}, path)


def load_gcn(path) -> LinkageGCN:
    """A saved GCN (with its threshold and IPS sizes); FileNotFoundError / ClusterError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GCN file not found: {path} (train one with `dpface cluster train-gcn`)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the same user error
        raise ClusterError(f"{path}: not a readable GCN file ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(saved, dict) or saved.get("format") != GCN_FORMAT:
        raise ClusterError(f"{path}: not a dpface linkage GCN file (format "
                           f"{saved.get('format') if isinstance(saved, dict) else type(saved).__name__!r})")
    if saved.get("version") != GCN_VERSION:
        raise ClusterError(f"{path}: GCN file version {saved.get('version')}, this dpface reads {GCN_VERSION}")
    model = LinkageGCN(**saved["config"], threshold=saved["threshold"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as e:
        raise ClusterError(f"{path}: GCN weights do not fit its own config ({str(e).splitlines()[0]})") from e
    model.info = saved.get("info", {})
    return model.eval()
