"""Pure-PyTorch references of the compiled ops: the same contract (kernels/OPS.md), written
the obvious way — the [B, K] logits materialised, autograd for the gradients — so that the
kernels are checked against code that shares nothing with them but the formulas."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpface.ops.contract import MarginSoftmaxOut

COS_EPS = 1e-7
# Squared distances are clamped here before the square root: two identical samples
# (duplicates from a sampler with replacement) would give 1/D = inf and NaN gradients.
DIST_EPS = 1e-12


def psi_reference(c: torch.Tensor, m1, m2, m3, easy_margin: bool, angle_clip: bool = False) -> torch.Tensor:
    """s-free margin on the target score (margin_math.h): cos(m1·θ + m2) − m3 with the θ*
    fallback, or with ``angle_clip`` the angle clamped to [ε, π − ε]. m1, m2, m3: floats, or
    tensors like ``c`` (one sample's parameters each; differentiable)."""
    if not any(map(torch.is_tensor, (m1, m2, m3))):
        if m1 == 1.0 and m2 == 0.0 and not angle_clip:
            return c - m3
        cc = c.clamp(-1 + COS_EPS, 1 - COS_EPS)
        if angle_clip:
            out = torch.cos((m1 * torch.acos(cc) + m2).clamp(COS_EPS, math.pi - COS_EPS)) - m3
            return torch.where(cc > 0, out, c) if easy_margin else out
        theta_star = min(math.pi, (math.pi - m2) / m1)
        if m1 == 1.0:
            margin = torch.cos(torch.acos(cc) + m2)
            fallback = cc - m2 * math.sin(m2)
        else:
            margin = torch.cos(m1 * torch.acos(cc) + m2)
            fallback = cc - (math.cos(theta_star) + 1.0)
        out = torch.where(cc > math.cos(theta_star), margin, fallback) - m3
        return torch.where(cc > 0, out, c) if easy_margin else out
    m1, m2, m3 = (torch.as_tensor(m, dtype=c.dtype, device=c.device) for m in (m1, m2, m3))
    cc = c.clamp(-1 + COS_EPS, 1 - COS_EPS)
    angle = m1 * torch.acos(cc) + m2
    if angle_clip:
        out = torch.cos(angle.clamp(COS_EPS, math.pi - COS_EPS))
    else:
        cos_star = torch.cos(((math.pi - m2) / m1).clamp(max=math.pi))
        fallback = torch.where(m1 == 1, cc - m2 * torch.sin(m2), cc - (cos_star + 1.0))
        out = torch.where(cc > cos_star, torch.cos(angle), fallback)
        out = torch.where((m1 == 1) & (m2 == 0), c, out)  # plain: no clamp
    out = out - m3
    return torch.where(cc > 0, out, c) if easy_margin else out


def negative_reference(scores: torch.Tensor, hard: torch.Tensor | None, t: float) -> torch.Tensor:
    """CurricularFace's negatives: a score above its row's threshold becomes c·(t + c)."""
    if hard is None:
        return scores
    return torch.where(scores > hard[:, None], scores * (t + scores), scores)


def margin_softmax_reference(x, w, idx, target, bias, w_rows_sink, bias_rows_sink, scale, margin, hard, s, m1, m2,
                             m3, t, easy_margin, angle_clip, normalize, bf16, keep_cols) -> MarginSoftmaxOut:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = w if idx is None else w[idx]
    if w_rows_sink is not None:  # route the rows' gradient to the sink (adds exactly 0)
        rows = rows + (w_rows_sink - w_rows_sink.detach())
    xa, ra = x.to(acc), rows.to(acc)
    rnd = bf16 or x.dtype == torch.bfloat16
    xg = xa.bfloat16().to(acc) if rnd else xa
    rg = ra.bfloat16().to(acc) if rnd else ra
    if normalize:
        inv = 1.0 / ra.norm(dim=1).clamp_min(1e-12)
        scores = (xg @ rg.T) * inv
    else:
        inv = torch.ones(ra.shape[0], dtype=acc, device=x.device)
        scores = xg @ rg.T
        if bias is not None:
            b = bias if idx is None else bias[idx]
            if bias_rows_sink is not None:
                b = b + (bias_rows_sink - bias_rows_sink.detach())
            scores = scores + b.to(acc)
    has = target >= 0
    col = target.clamp(min=0)
    rows_b = torch.arange(x.shape[0], device=x.device)
    k = scores.shape[1]
    if k:
        t_score = torch.where(has, scores[rows_b, col.clamp(max=k - 1)], 0.0)
    else:
        t_score = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    s_row = s if scale is None else scale
    ms = (m1, m2, m3) if margin is None else margin.unbind(1)
    t_logit = s_row * psi_reference(t_score, *ms, easy_margin, angle_clip)
    onehot = F.one_hot(col, k).to(torch.bool) & has[:, None] if k else \
        torch.zeros_like(scores, dtype=torch.bool)
    neg = negative_reference(scores, hard, t)
    z = torch.where(onehot, t_logit[:, None], (s if scale is None else scale[:, None]) * neg)
    lse = torch.logsumexp(z, dim=1) if k else torch.full_like(t_score, -math.inf)
    t_logit = torch.where(has, t_logit, 0.0)
    max_score = scores.detach().amax(1) if k else torch.full_like(t_score, -math.inf)
    n_keep = min(k, keep_cols)
    return MarginSoftmaxOut(lse, t_logit, t_score.detach(), max_score, inv.detach(),
                            scores.detach()[:, :n_keep].contiguous())


def sample_margin_grad(grad_lse, grad_target, lse, target_logit, target_score, target, scale, margin, s, easy_margin,
                       angle_clip) -> torch.Tensor:
    """d loss / d sample_margin [B, 3] for the compiled paths: only a row's target logit
    s_i·ψ(c; m1, m2, m3) depends on its margins, with weight G = grad_lse·p_target +
    grad_target (p_target = exp(target logit − lse)); ∂ψ/∂m by autograd through
    psi_reference at the forward's target score."""
    has = target >= 0
    G = torch.where(has, grad_lse * torch.exp(target_logit - lse) + grad_target, 0.0)
    with torch.enable_grad():
        m = margin.detach().requires_grad_(True)
        psi = psi_reference(target_score.detach(), *m.unbind(1), easy_margin, angle_clip)
        s_row = s if scale is None else scale
        (grad,) = torch.autograd.grad((s_row * psi * G.detach()).sum(), m)
    return grad


def range_loss_terms_reference(x: torch.Tensor, labels: torch.Tensor, k: int,
                               margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_intra, L_inter): per identity the k largest pairwise distances' harmonic mean,
    summed; the hinge on the closest pair of identity centres."""
    labels = labels.long()
    ids, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    intra = x.new_zeros(())
    for g in (counts >= 2).nonzero().squeeze(1).tolist():
        xi = x[inverse == g]
        a, b = torch.triu_indices(xi.shape[0], xi.shape[0], offset=1, device=x.device)
        d = (xi[a] - xi[b]).pow(2).sum(1).clamp_min(DIST_EPS).sqrt()
        top = d.topk(min(k, d.numel())).values
        intra = intra + top.numel() / top.reciprocal().sum()
    inter = x.new_zeros(())
    if ids.numel() >= 2:
        centres = x.new_zeros(ids.numel(), x.shape[1]).index_add(0, inverse, x)
        centres = centres / counts[:, None].to(x.dtype)
        a, b = torch.triu_indices(ids.numel(), ids.numel(), offset=1, device=x.device)
        d_centre = (centres[a] - centres[b]).pow(2).sum(1).min()
        inter = (margin - d_centre).clamp_min(0.0)
    return intra, inter


__all__ = ["psi_reference", "negative_reference", "margin_softmax_reference", "range_loss_terms_reference",
           "sample_margin_grad"]
