"""1:N identification (MegaFace-style: closed-set CMC, open-set TPIR@FPIR, distractors) and
template aggregation (IJB-style; the full IJB protocol is in ``ijb.py``)."""
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


def _search_inputs(gallery_emb, gallery_labels, probe_emb, probe_labels, distractor_emb):
    g = _emb(gallery_emb, "gallery_emb")
    p = _emb(probe_emb, "probe_emb")
    if g.shape[1] != p.shape[1]:
        raise ValueError(f"embedding sizes differ: gallery D={g.shape[1]}, probe D={p.shape[1]}")
    if g.shape[0] == 0 or p.shape[0] == 0:
        raise ValueError(f"need a non-empty gallery and probe set, got {g.shape[0]} and {p.shape[0]}")
    gl = _labels(gallery_labels, g.shape[0], "gallery_labels")
    pl = _labels(probe_labels, p.shape[0], "probe_labels")
    d = None
    if distractor_emb is not None:
        d = _emb(distractor_emb, "distractor_emb")
        if d.shape[1] != g.shape[1]:
            raise ValueError(
                f"embedding sizes differ: gallery D={g.shape[1]}, distractors D={d.shape[1]}")
    return g, gl, p, pl, d


def search(gallery_emb, gallery_labels, probe_emb, probe_labels, distractor_emb=None) -> dict:
    """Every probe searched against the gallery (+ unlabelled distractors), cosine similarity.

    Returns numpy arrays over probes:
    - ``mated`` bool: the probe's identity is in the gallery;
    - ``rank`` int64: 1 + the number of *competitors* (gallery entries of other identities and
      every distractor) scoring at least as high as the probe's best same-identity gallery
      entry — ties count against the probe; 0 for a non-mated probe;
    - ``mate_score`` float64: that best same-identity score (−inf when non-mated);
    - ``top_score`` float64: the best score over the whole gallery and the distractors (what
      an open-set system compares with its threshold).
    Several gallery images of one identity do not compete with each other.
    """
    g, gl, p, pl, d = _search_inputs(gallery_emb, gallery_labels, probe_emb, probe_labels,
                                     distractor_emb)
    # integer codes make label comparison work for ints and strings alike
    _, codes = np.unique(np.concatenate([gl, pl]), return_inverse=True)
    gl_t = torch.from_numpy(codes[: gl.size].astype(np.int64))
    pl_t = torch.from_numpy(codes[gl.size:].astype(np.int64))

    n = p.shape[0]
    rank = torch.empty(n, dtype=torch.int64)
    mate = torch.empty(n, dtype=torch.float64)
    top = torch.empty(n, dtype=torch.float64)
    p_chunk = max(1, _BLOCK_ELEMS // g.shape[0])
    for s in range(0, n, p_chunk):
        pc = p[s:s + p_chunk]
        sim = pc @ g.T
        same = pl_t[s:s + p_chunk, None] == gl_t[None, :]
        true_score = sim.masked_fill(~same, -torch.inf).amax(dim=1)
        beaten = ((sim >= true_score[:, None]) & ~same).sum(dim=1)
        best = sim.amax(dim=1)
        if d is not None:
            d_chunk = max(1, _BLOCK_ELEMS // pc.shape[0])
            for t in range(0, d.shape[0], d_chunk):
                sd = pc @ d[t:t + d_chunk].T
                beaten += (sd >= true_score[:, None]).sum(dim=1)
                best = torch.maximum(best, sd.amax(dim=1))
        rank[s:s + p_chunk] = torch.where(same.any(dim=1), 1 + beaten, 0)
        mate[s:s + p_chunk] = true_score.double()
        top[s:s + p_chunk] = best.double()
    rank_np = rank.numpy()
    return {"mated": rank_np > 0, "rank": rank_np, "mate_score": mate.numpy(),
            "top_score": top.numpy()}


def cmc(result: dict, ranks=(1, 5, 10)) -> dict[int, float]:
    """Cumulative match characteristic of a ``search`` result: the fraction of *mated* probes
    whose mate is at rank <= k, for each k."""
    ranks = tuple(int(k) for k in ranks)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive ints, got {ranks}")
    r = result["rank"][result["mated"]]
    if r.size == 0:
        raise ValueError("no mated probe (no probe identity is in the gallery): CMC undefined")
    return {k: float(np.mean(r <= k)) for k in ranks}


def tpir_at_fpir(result: dict, fpirs=(0.01, 0.1)) -> dict[float, float]:
    """Open-set identification: true-positive identification rate (rank 1) at a fixed
    false-positive identification rate, for each target FPIR.

    The threshold comes from the *non-mated* probes only, with the convention of
    ``tar_at_far``: with N non-mated probes, at most k = floor(FPIR·N) of them may have a top
    score strictly above t, so t is the (k+1)-th largest non-mated top score (−inf when
    k = N). A mated probe counts as a true positive when its mate is at rank 1 *and* its mate
    score is > t. NaN where k < 1 (fewer than 1/FPIR non-mated probes) or no probe is mated.
    """
    nm = np.sort(result["top_score"][~result["mated"]])[::-1]
    mated = result["mated"]
    hit1 = (result["rank"] == 1) & mated
    out: dict[float, float] = {}
    for fpir in fpirs:
        fpir = float(fpir)
        if not 0.0 < fpir <= 1.0:
            raise ValueError(f"FPIR must be in (0, 1], got {fpir}")
        k = int(np.floor(fpir * nm.size + 1e-9))
        if k < 1 or not mated.any():
            out[fpir] = float("nan")
            continue
        t = nm[k] if k < nm.size else -np.inf
        out[fpir] = float(np.sum(hit1 & (result["mate_score"] > t)) / mated.sum())
    return out


def rank1_vs_distractors(gallery_emb, gallery_labels, probe_emb, probe_labels, distractor_emb,
                         counts) -> dict[int, float]:
    """Rank-1 rate (mated probes) with the first n distractors added, for each n in
    ``counts``. The sets are nested (the first n of one list), so the curve never rises."""
    d = _emb(distractor_emb, "distractor_emb")
    out = {}
    for n in counts:
        n = int(n)
        if not 0 <= n <= d.shape[0]:
            raise ValueError(f"distractor count {n} is outside [0, {d.shape[0]}]")
        r = search(gallery_emb, gallery_labels, probe_emb, probe_labels,
                   d[:n] if n else None)
        out[n] = cmc(r, (1,))[1]
    return out


def identification_rates(gallery_emb, gallery_labels, probe_emb, probe_labels,
                         distractor_emb=None, ranks=(1,)) -> dict[int, float]:
    """Rank-k identification rates of probes against a gallery (+ unlabelled distractors).

    Similarity is cosine. A probe's rank is 1 + the number of *competitors* (gallery entries of
    other identities, and every distractor) scoring at least as high as its best same-identity
    gallery entry; several gallery images of one identity therefore don't compete with each
    other. Ties count against the probe, so degenerate (e.g. constant) embeddings can't score
    well by luck. Rate@k = fraction of probes with rank <= k.
    Every probe identity must be present in the gallery (else ValueError): an unmatched probe
    would be an open-set question, which this closed-set metric does not answer (``search`` +
    ``tpir_at_fpir`` do).
    """
    _, gl, _, pl, _ = _search_inputs(gallery_emb, gallery_labels, probe_emb, probe_labels,
                                     distractor_emb)
    missing = np.setdiff1d(np.unique(pl), np.unique(gl))
    if missing.size:
        raise ValueError(
            f"{missing.size} probe identities are not in the gallery, e.g. {missing[:5].tolist()}")
    ranks = tuple(int(k) for k in ranks)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive ints, got {ranks}")
    r = search(gallery_emb, gallery_labels, probe_emb, probe_labels, distractor_emb)
    return cmc(r, ranks)


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
