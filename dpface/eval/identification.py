"""1:N identification (MegaFace-style) and template aggregation (IJB-style)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# bounds the similarity block held at once: 2^24 floats = 64 MB, whatever the distractor count
_BLOCK_ELEMS = 1 << 24


def _emb(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    return F.normalize(t.detach().to("cpu", torch.float32), dim=1)


def _labels(x, n: int, name: str) -> np.ndarray:
    y = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
    return y


def identification_rates(gallery_emb, gallery_labels, probe_emb, probe_labels,
                         distractor_emb=None, ranks=(1,)) -> dict[int, float]:
    """Rank-k identification rates of probes against a gallery (+ unlabelled distractors).

    Similarity is cosine. A probe's rank is 1 + the number of *competitors* (gallery entries of
    other identities, and every distractor) scoring at least as high as its best same-identity
    gallery entry; several gallery images of one identity therefore don't compete with each
    other. Ties count against the probe, so degenerate (e.g. constant) embeddings can't score
    well by luck. Rate@k = fraction of probes with rank <= k.
    Every probe identity must be present in the gallery (else ValueError): an unmatched probe
    would be an open-set question, which this closed-set metric does not answer.
    """
    g = _emb(gallery_emb, "gallery_emb")
    p = _emb(probe_emb, "probe_emb")
    if g.shape[1] != p.shape[1]:
        raise ValueError(f"embedding sizes differ: gallery D={g.shape[1]}, probe D={p.shape[1]}")
    if g.shape[0] == 0 or p.shape[0] == 0:
        raise ValueError(f"need a non-empty gallery and probe set, got {g.shape[0]} and {p.shape[0]}")
    gl = _labels(gallery_labels, g.shape[0], "gallery_labels")
    pl = _labels(probe_labels, p.shape[0], "probe_labels")
    missing = np.setdiff1d(np.unique(pl), np.unique(gl))
    if missing.size:
        raise ValueError(
            f"{missing.size} probe identities are not in the gallery, e.g. {missing[:5].tolist()}")
    d = None
    if distractor_emb is not None:
        d = _emb(distractor_emb, "distractor_emb")
        if d.shape[1] != g.shape[1]:
            raise ValueError(
                f"embedding sizes differ: gallery D={g.shape[1]}, distractors D={d.shape[1]}")
    ranks = tuple(int(k) for k in ranks)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive ints, got {ranks}")

    # integer codes make label comparison work for ints and strings alike
    _, codes = np.unique(np.concatenate([gl, pl]), return_inverse=True)
    gl_t = torch.from_numpy(codes[: gl.size].astype(np.int64))
    pl_t = torch.from_numpy(codes[gl.size:].astype(np.int64))

    probe_rank = torch.empty(p.shape[0], dtype=torch.int64)
    p_chunk = max(1, _BLOCK_ELEMS // g.shape[0])
    for s in range(0, p.shape[0], p_chunk):
        pc = p[s:s + p_chunk]
        sim = pc @ g.T
        same = pl_t[s:s + p_chunk, None] == gl_t[None, :]
        true_score = sim.masked_fill(~same, -torch.inf).amax(dim=1)
        beaten = ((sim >= true_score[:, None]) & ~same).sum(dim=1)
        if d is not None:
            d_chunk = max(1, _BLOCK_ELEMS // pc.shape[0])
            for t in range(0, d.shape[0], d_chunk):
                beaten += (pc @ d[t:t + d_chunk].T >= true_score[:, None]).sum(dim=1)
        probe_rank[s:s + p_chunk] = 1 + beaten
    return {k: float((probe_rank <= k).double().mean()) for k in ranks}


def rank1_identification(gallery_emb, gallery_labels, probe_emb, probe_labels,
                         distractor_emb=None) -> float:
    """Rank-1 identification rate; see ``identification_rates`` for the exact definition."""
    return identification_rates(gallery_emb, gallery_labels, probe_emb, probe_labels,
                                distractor_emb, ranks=(1,))[1]


def template_embedding(embs, weights=None):
    """Aggregate one template's image embeddings [N, D] into one L2-normalised vector [D].

    Each embedding is normalised first, then averaged with ``weights``: None (plain mean),
    ``"norm"`` (each image's raw feature norm, a cheap quality score), or non-negative [N].
    Returns the input's kind (torch float32 or numpy float32).
    """
    is_numpy = not isinstance(embs, torch.Tensor)
    x = torch.as_tensor(np.asarray(embs) if is_numpy else embs).detach().to("cpu", torch.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embs must be a non-empty [N, D] array, got shape {tuple(x.shape)}")
    if weights is None:
        w = torch.ones(x.shape[0])
    elif isinstance(weights, str):
        if weights != "norm":
            raise ValueError(f"weights must be None, 'norm' or an array, got {weights!r}")
        w = x.norm(dim=1)
    else:
        w = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor)
                            else weights).detach().to("cpu", torch.float32)
        if w.shape != (x.shape[0],):
            raise ValueError(f"weights must have shape ({x.shape[0]},), got {tuple(w.shape)}")
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    agg = F.normalize((w[:, None] * F.normalize(x, dim=1)).sum(dim=0), dim=0)
    return agg.numpy() if is_numpy else agg
