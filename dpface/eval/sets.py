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

``evaluate_set_poolings`` runs the template protocol of ``dpface.data.synthetic.templates``: 1:1
template verification (TAR@FAR, ``verification.tar_at_far`` on the cosines of the pooled
templates, as ``ijb.template_pair_scores``) and closed-set 1:N template identification
(rank-1, ``identification.identification_rates``), for each pooling on the same backbone.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from dpface.losses.pooling import (  # noqa: F401 — the poolings are part of this module's API
    POOLINGS,
    _tensor,
    check_quality,
    mean_pool,
    norm_pool,
    pool,
    quality_pool,
    set_weights,
)


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


def evaluate_pooled(feats, templates, fars=(1e-2, 1e-1), tar_convention: str = "strict") -> dict:
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
    return {"tar_at_far": tar_at_far(scores, templates.issame, fars, tar_convention), "rank1": rank1,
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
                          extra_weights: Mapping[str, np.ndarray] | None = None,
                          tar_convention: str = "strict") -> dict:
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
        r = evaluate_pooled(feats, templates, fars, tar_convention)
        out[how] = {"tar_at_far": r["tar_at_far"], "rank1": r["rank1"]}
    for name, w in (extra_weights or {}).items():
        r = evaluate_pooled(quality_pool(emb, torch.as_tensor(np.asarray(w), dtype=torch.float32),
                                         index=index), templates, fars, tar_convention)
        out[name] = {"tar_at_far": r["tar_at_far"], "rank1": r["rank1"]}
    if q is not None:
        # constant scores (an untrained branch): no ranking, so no correlation
        rho = spearman(q.numpy(), templates.degradation) if q.std() > 0 else float("nan")
        out["quality"] = {"spearman_vs_degradation": float(rho),
                          "mean": float(q.mean()), "min": float(q.min()), "max": float(q.max())}
    return out


__all__ = ["POOLINGS", "mean_pool", "norm_pool", "quality_pool", "pool", "set_weights",
           "check_quality", "embed_with_quality", "evaluate_pooled", "evaluate_set_poolings"]
