"""The softmax cross-entropy over classes sharded across ranks: O(B) scalars cross ranks (a
max, a sum of exponentials and the target logit per sample), never anything of size C.
Two entry points: from [B, K] logits (the PyTorch reference path) and from the compiled
op's per-row statistics (``fused_softmax_ce``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpface import ops
from dpface.distributed.collectives import all_reduce_max, all_reduce_sum
from dpface.losses.margin import HeadContext


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 parameters (logits in half precision overflow and lose
    the margin), fp64 for fp64 parameters (tight tests)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


class CosineScores(torch.autograd.Function):
    """cos = x̂ · (W_j/‖W_j‖)ᵀ for unit rows x̂ [B, D] and raw rows W [K, D].

    Same values as ``x̂ @ F.normalize(W).T`` but never materialises the normalised
    [K, D] copy (as large as the shard at r = 1) nor keeps the [B, K] product: the
    columns of x̂·Wᵀ are scaled by 1/‖W_j‖, and backward uses the closed form
    dW_j = M_j − (Ŵ_j·M_j)·Ŵ_j with M = (G/‖W‖)ᵀ·x̂ (the gradient of a normalised row is
    the tangential part).
    """

    @staticmethod
    def forward(ctx, x_unit, w):
        inv_norm = w.norm(dim=1).clamp_min(1e-12).reciprocal()  # F.normalize's eps
        ctx.save_for_backward(x_unit, w, inv_norm)
        return (x_unit @ w.T).mul_(inv_norm)

    @staticmethod
    def backward(ctx, grad):
        x_unit, w, inv_norm = ctx.saved_tensors
        g = grad * inv_norm  # [B, K]: gradient w.r.t. x̂·Wᵀ
        grad_x = g @ w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = g.T @ x_unit  # M [K, D]
            # Row-wise dot products as a batched matmul: no [K, D] product temporary.
            dots = torch.bmm(w.unsqueeze(1), grad_w.unsqueeze(2)).view(-1)
            radial = dots * inv_norm.square()
            grad_w.addcmul_(w, radial[:, None], value=-1.0)
        return grad_x, grad_w


def weight_and_grad_factor(weight_fn, nll: torch.Tensor):
    """Per-sample weight w(p) and the factor c with d(w·nll)/dlogits = c·(softmax − onehot).

    With p = exp(−nll): d nll/dz = softmax − onehot and dp/dz = −p·(softmax − onehot),
    so d(w·nll)/dz = (softmax − onehot)·(w − w'(p)·p·nll) = (...)·(w + w'(p)·p·ln p).
    w'(p) comes from autograd through ``weight_fn`` (zero when it detaches p)."""
    with torch.enable_grad():
        p = torch.exp(-nll.detach()).requires_grad_(True)
        w = weight_fn(p)
        if w.shape != p.shape:
            raise ValueError(f"loss_weight must return one weight per sample {list(p.shape)}, "
                             f"got {list(w.shape)}")
        dw = torch.autograd.grad(w.sum(), p, allow_unused=True)[0] if w.requires_grad else None
    w = w.detach()
    factor = w if dw is None else w - dw * p.detach() * nll
    return w, factor


class DistSoftmaxCE(torch.autograd.Function):
    """Softmax cross-entropy over columns spread across ranks.

    Inputs: logits [B, K] (this rank's columns), target [B] (column or −1), scores
    [B, K] (before the margin; only for the accuracy), the group, and an optional
    per-sample weight function of the true-class probability (Knot-Magnify), and optional
    constant per-sample weights [B] (sub-centre drop). Returns
    (loss, accuracy). The gradient w.r.t. this rank's logits is (softmax − onehot)/B
    for its columns (times each sample's factor when weighted), the same as the full
    softmax. Max and sums are exchanged as two stacked all-reduces; p_i =
    exp(target − max)/Σexp needs nothing more.
    """

    @staticmethod
    def forward(ctx, logits, target, scores, group, weight_fn=None, sample_weight=None):
        b = logits.shape[0]
        rows = torch.arange(b, device=logits.device)
        has = target >= 0
        col = target.clamp(min=0)
        maxes = all_reduce_max(torch.stack([logits.max(1).values, scores.max(1).values]), group)
        gmax = maxes[0]  # treated as a constant: the loss does not depend on the shift
        e = (logits - gmax[:, None]).exp_()
        zero = logits.new_zeros(())
        sums = all_reduce_sum(torch.stack([
            e.sum(1),
            torch.where(has, logits[rows, col], zero),
            torch.where(has, scores[rows, col], zero),
        ]), group)
        # The max column contributes exp(0) = 1, so the sum is ≥ 1 in exact arithmetic;
        # the clamp only guards log against a NaN/inf input turned into 0.
        sum_exp = sums[0].clamp_min(torch.finfo(logits.dtype).tiny)
        nll = sum_exp.log() + gmax - sums[1]
        factor = None
        if weight_fn is None:
            per = nll
        else:
            w, factor = weight_and_grad_factor(weight_fn, nll)
            per = w * nll
        if sample_weight is not None:  # constants (dropped samples: 0): scale loss and grad
            per = per * sample_weight
            factor = sample_weight if factor is None else factor * sample_weight
        loss = per.mean()
        # A sample is right when its true class's score reaches the global max score
        # (ties count as right: they need exactly equal floats).
        accuracy = (sums[2] >= maxes[1]).to(logits.dtype).mean()
        e.div_(sum_exp[:, None])  # softmax, kept for backward
        ctx.save_for_backward(e, target, factor)
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _grad_acc):
        p, target, factor = ctx.saved_tensors
        scale = grad_loss / p.shape[0]
        if factor is not None:
            scale = scale * factor[:, None]  # per sample [B, 1]
        # Out of place: p stays valid should the graph be run twice (retain_graph).
        grad = p * scale
        rows = (target >= 0).nonzero().squeeze(1)
        if factor is None:
            grad[rows, target[rows]] -= scale
        else:
            grad[rows, target[rows]] -= scale[rows, 0]
        return grad, None, None, None, None, None


def fused_context(transform, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None, target: torch.Tensor, *,
                  step: int, group=None, world_size: int = 1) -> HeadContext:
    """The transform's context on the fused path (``x`` the un-normalised embeddings of the
    op's batch, ``w`` the shard, ``idx`` / ``target`` as the op takes them): the norms
    (``needs_norms``) and each sample's target score on this shard (``needs_target_score``),
    which the op itself meets only inside its tiles, after it needed them."""
    ctx = HeadContext(step=step, group=group, world_size=world_size, has_target=target >= 0)
    if transform.needs_norms:
        ctx.x_norm = x.norm(dim=1)
    if transform.needs_target_score:
        with torch.no_grad():
            acc = compute_dtype(w.dtype)
            k = w.shape[0] if idx is None else idx.numel()
            col = target.clamp(0, max(k - 1, 0))
            rows = (w[col if idx is None else idx[col]] if k else w.new_zeros(len(target), w.shape[1])).to(acc)
            cos = (F.normalize(x.detach().to(acc), dim=1) * rows).sum(1) / rows.norm(dim=1).clamp_min(1e-12)
            ctx.target_score = torch.where(ctx.has_target, cos, 0.0)
    return ctx


def fused_softmax_ce(out: ops.MarginSoftmaxOut, group, weight_fn=None):
    """(loss, accuracy) from the fused op's per-row statistics, combined across ranks.

    Only O(B) numbers cross ranks: the max of the local log-sum-exps (and of the scores, for
    accuracy) and the sums of exp(lse_r − max), of the target logit and of the target score.
    Autograd sees each rank's own terms only (the other ranks' are constants), which gives
    each rank its part of the global gradient, as the reference's closed form does."""
    maxes = all_reduce_max(torch.stack([out.lse.detach(), out.max_score]), group)
    gmax = maxes[0]
    e = torch.exp(out.lse - gmax)
    t = out.target_logit  # 0 where the class is on another rank (op contract)
    sums = all_reduce_sum(torch.stack([e.detach(), t.detach(), out.target_score]), group)
    sum_exp = (e + (sums[0] - e.detach())).clamp_min(torch.finfo(e.dtype).tiny)
    nll = sum_exp.log() + gmax - (t + (sums[1] - t.detach()))
    if weight_fn is None:
        loss = nll.mean()
    else:  # plain autograd through w(p), p = exp(−nll): the same gradient as the closed form
        w = weight_fn(torch.exp(-nll))
        if w.shape != nll.shape:
            raise ValueError(f"loss_weight must return one weight per sample {list(nll.shape)}, "
                             f"got {list(w.shape)}")
        loss = (w * nll).mean()
    accuracy = (sums[2] >= maxes[1]).to(e.dtype).mean()
    return loss, accuracy


__all__ = ["CosineScores", "DistSoftmaxCE", "compute_dtype", "fused_context", "fused_softmax_ce",
           "weight_and_grad_factor"]
