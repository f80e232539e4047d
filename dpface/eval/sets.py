"""Set (template) pooling, and a template protocol comparing poolings on one backbone.

A set is several images of one person; its embedding is a weighted mean of the images'
L2-normalised embeddings x̂_i, L2-normalised again:

- ``mean_pool``: equal weights.
- ``norm_pool``: weight ‖x_i‖, the radial part of OE-CNN's decomposition x = ‖x‖·x̂
  (training-free: a margin-trained network tends to give confident images larger norms);
  Σ‖x_i‖·x̂_i = Σ x_i, so this is the sum of the raw embeddings (insightface's IJB default).
- ``quality_pool``: weight q_i / Σ_set q (a QAN quality branch's scores, or any positive
  quality).

Every pooling takes ``emb`` [N, D] and either pools all rows into one set (``index=None``
→ [D]) or pools by ``index`` [N] of set ids 0..S−1 (→ [S, D], every id must occur). They
are differentiable (the set loss trains through them) and accept numpy (returned as
numpy) or torch.

``evaluate_set_poolings`` runs the template protocol of ``dpface.data.templates``: 1:1
template verification (TAR@FAR, ``verification.tar_at_far`` on the cosines of the pooled
templates, as ``ijb.template_pair_scores``) and closed-set 1:N template identification
(rank-1, ``identification.identification_rates``), for each pooling on the same backbone.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

POOLINGS = ("mean", "norm", "qan")


def _tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from e


def _index(index, n: int, device) -> tuple[torch.Tensor, int]:
    """(set id per row, number of sets); every set must have a row."""
    if index is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    idx = _tensor(index, "index")
    if idx.shape != (n,):
        raise ValueError(f"index must give one set id per embedding, shape ({n},), got {tuple(idx.shape)}")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"index must hold integer set ids, got {idx.dtype}")
    idx = idx.to(device=device, dtype=torch.long)
    if int(idx.min()) < 0:
        raise ValueError(f"index holds a negative set id ({int(idx.min())})")
    s = int(idx.max()) + 1
    counts = torch.bincount(idx, minlength=s)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"set ids must be 0..S-1 with no gaps: set(s) {empty} are empty "
                         f"(S = {s} from the largest id)")
    return idx, s


def _weighted(emb, w, index, normalize: bool):
    """Σ_set w_i·x̂_i / Σ_set w_i (then L2-normalised) for checked inputs."""
    is_numpy = not isinstance(emb, torch.Tensor)
    x = _tensor(emb, "emb")
    if x.ndim != 2:
        raise ValueError(f"emb must be [N, D] embeddings, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("cannot pool an empty set (emb has 0 rows)")
    x = x.float() if not x.is_floating_point() else x
    idx, s = _index(index, x.shape[0], x.device)
    if w is None:
        w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    wsum = torch.zeros(s, dtype=w.dtype, device=x.device).index_add(0, idx, w)
    if not (wsum > 0).all():
        bad = torch.nonzero(~(wsum > 0)).flatten()[:5].tolist()
        raise ValueError(f"set(s) {bad} have zero total weight (every embedding's weight is 0), "
                         "so their pooled embedding is undefined")
    wn = (w / wsum[idx]).to(x.dtype)
    pooled = torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device).index_add(
        0, idx, wn[:, None] * F.normalize(x, dim=1))
    if normalize:
        pooled = F.normalize(pooled, dim=1)
    if index is None:
        pooled = pooled[0]
    return pooled.detach().cpu().numpy() if is_numpy else pooled


def set_weights(q, index=None) -> torch.Tensor:
    """Quality scores [N] → per-set normalised weights q_i / Σ_set q (each set sums to 1).
    ``q`` must be finite and > 0."""
    qt = check_quality(q)
    idx, s = _index(index, qt.shape[0], qt.device)
    qsum = torch.zeros(s, dtype=qt.dtype, device=qt.device).index_add(0, idx, qt)
    return qt / qsum[idx]


def check_quality(q, n: int | None = None) -> torch.Tensor:
    qt = _tensor(q, "quality")
    if qt.ndim != 1 or (n is not None and qt.shape[0] != n):
        want = f"({n},)" if n is not None else "[N]"
        raise ValueError(f"quality must be one score per embedding, shape {want}, got {tuple(qt.shape)}")
    if not qt.is_floating_point():
        qt = qt.float()
    with torch.no_grad():
        bad = ~(torch.isfinite(qt) & (qt > 0))
        if bad.any():
            i = int(torch.nonzero(bad).flatten()[0])
            raise ValueError(f"quality scores must be finite and > 0 (they weigh images within a "
                             f"set), got {float(qt[i])} at {i} ({int(bad.sum())} bad)")
    return qt


def mean_pool(emb, index=None, normalize: bool = True):
    """Plain mean of the normalised embeddings (per set)."""
    return _weighted(emb, None, index, normalize)


def norm_pool(emb, index=None, normalize: bool = True):
    """Normalised embeddings weighted by their own norm ‖x_i‖ (= the sum of raw embeddings)."""
    x = _tensor(emb, "emb")
    if x.ndim != 2:
        raise ValueError(f"emb must be [N, D] embeddings, got shape {tuple(x.shape)}")
    x = x.float() if not x.is_floating_point() else x
    if not torch.isfinite(x).all():
        raise ValueError("emb holds non-finite values; a norm weight would be NaN/inf")
    w = x.norm(dim=1)
    return _weighted(emb if not isinstance(emb, torch.Tensor) else x, w, index, normalize)


def quality_pool(emb, q, index=None, normalize: bool = True):
    """Normalised embeddings weighted by quality ``q`` [N] (> 0), normalised within each set."""
    x = _tensor(emb, "emb")
    if x.ndim != 2:
        raise ValueError(f"emb must be [N, D] embeddings, got shape {tuple(x.shape)}")
    qt = check_quality(q, x.shape[0]).to(x.device)
    return _weighted(emb, qt, index, normalize)


def pool(emb, how: str, index=None, quality=None, normalize: bool = True):
    """Dispatch by name: ``mean``, ``norm`` or ``qan`` (needs ``quality``)."""
    if how == "mean":
        return mean_pool(emb, index, normalize)
    if how == "norm":
        return norm_pool(emb, index, normalize)
    if how == "qan":
        if quality is None:
            raise ValueError("pooling 'qan' needs quality scores (a qan backbone's, or pass quality=)")
        return quality_pool(emb, quality, index, normalize)
    raise ValueError(f"unknown pooling {how!r}; valid: {', '.join(POOLINGS)}")


# ------------------------------------------------------------------------ the protocol


def embed_with_quality(model: torch.nn.Module, images, batch_size: int = 128, device="cpu"):
    """Raw (un-normalised) float32 embeddings [N, D] of uint8 images and, for a model that
    takes ``with_quality`` (``QualityAware``), its quality scores [N] (else None). Eval mode
    and no_grad; every submodule's train flag is restored afterwards."""
    from dpface.data.transforms import normalize

    from .embeddings import _forward, _to_nchw_uint8

    x = _to_nchw_uint8(images)
    if x.shape[0] == 0:
        raise ValueError("no images to embed (N = 0)")
    has_q = hasattr(model, "score") and hasattr(model, "base")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    embs, qs = [], []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                b = normalize(x[start:start + batch_size].to(device))
                if has_q:
                    e, q = model(b, with_quality=True)
                    qs.append(q.float().cpu())
                else:
                    e = _forward(model, b)
                embs.append(e.float().cpu())
    finally:
        for m, was in modes:
            m.training = was
    return torch.cat(embs), (torch.cat(qs) if has_q else None)


def template_scores(feats: torch.Tensor, pairs) -> np.ndarray:
    """Cosines of template pairs from pooled normalised template features [T, D] (template
    ids 0..T−1), via ``ijb.template_pair_scores``."""
    from .ijb import template_pair_scores

    f = feats.detach().cpu().double().numpy()
    return template_pair_scores(np.arange(f.shape[0]), f, pairs)


def evaluate_pooled(feats, templates, fars=(1e-2, 1e-1)) -> dict:
    """Verification TAR@FAR and rank-1 identification of pooled template features [T, D]
    on a ``TemplateSet``."""
    from .identification import identification_rates
    from .verification import tar_at_far

    feats = _tensor(feats, "feats")
    if feats.shape[0] != templates.num_templates:
        raise ValueError(f"{feats.shape[0]} template features for {templates.num_templates} templates")
    scores = template_scores(feats, templates.pairs)
    g = templates.gallery
    rank1 = identification_rates(feats[g], templates.template_identity[g], feats[~g],
                                 templates.template_identity[~g], ranks=(1,))[1]
    return {"tar_at_far": tar_at_far(scores, templates.issame, fars), "rank1": rank1,
            "scores": scores}


def _average_ranks(a: np.ndarray) -> np.ndarray:
    r = np.empty(a.size)
    r[np.argsort(a, kind="stable")] = np.arange(a.size)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=r) / counts)[inv]  # ties share their mean rank


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); here rather than scipy's,
    whose import costs seconds."""
    return float(np.corrcoef(_average_ranks(np.asarray(a, np.float64)),
                             _average_ranks(np.asarray(b, np.float64)))[0, 1])


def evaluate_set_poolings(backbone: torch.nn.Module, templates, poolings=POOLINGS,
                          fars=(1e-2, 1e-1), batch_size: int = 128, device="cpu",
                          extra_weights: Mapping[str, np.ndarray] | None = None) -> dict:
    """Every pooling of ``poolings`` on one backbone's embeddings of a ``TemplateSet``
    (``dpface.data.templates.make_templates``) → {pooling: {"tar_at_far": {far: tar},
    "rank1": r}}, plus "quality": {"spearman_vs_degradation": ρ} for a qan backbone.

    ``qan`` needs a quality-aware backbone and is skipped (absent from the result) for
    another one. ``extra_weights`` adds poolings by given per-image weights (name → [F],
    > 0), e.g. an oracle from the known degradation."""
    emb, q = embed_with_quality(backbone, templates.images, batch_size, device)
    index = torch.from_numpy(templates.template)
    out: dict = {}
    for how in poolings:
        if how == "qan" and q is None:
            continue
        feats = pool(emb, how, index=index, quality=q)
        r = evaluate_pooled(feats, templates, fars)
        out[how] = {"tar_at_far": r["tar_at_far"], "rank1": r["rank1"]}
    for name, w in (extra_weights or {}).items():
        r = evaluate_pooled(quality_pool(emb, torch.as_tensor(np.asarray(w), dtype=torch.float32),
                                         index=index), templates, fars)
        out[name] = {"tar_at_far": r["tar_at_far"], "rank1": r["rank1"]}
    if q is not None:
        # constant scores (an untrained branch): no ranking, so no correlation
        rho = spearman(q.numpy(), templates.degradation) if q.std() > 0 else float("nan")
        out["quality"] = {"spearman_vs_degradation": float(rho),
                          "mean": float(q.mean()), "min": float(q.min()), "max": float(q.max())}
    return out


__all__ = ["POOLINGS", "mean_pool", "norm_pool", "quality_pool", "pool", "set_weights",
           "check_quality", "embed_with_quality", "evaluate_pooled", "evaluate_set_poolings"]
