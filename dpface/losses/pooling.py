"""Set (template) pooling: a set's embedding as a weighted mean of its images' L2-normalised
embeddings x̂_i, L2-normalised again. Shared by the set-to-set loss (``set_loss.py``) and
the template protocol (``dpface/eval/sets.py``, whose docstring describes the poolings).

Every pooling takes ``emb`` [N, D] and either pools all rows into one set (``index=None``
→ [D]) or pools by ``index`` [N] of set ids 0..S−1 (→ [S, D], every id must occur). They
are differentiable and accept numpy (returned as numpy) or torch.
"""
from __future__ import annotations

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
