"""The chunked margin softmax (``head.kernel: chunked``): the same contract as
``dpface::margin_softmax_fwd/_bwd`` (kernels/OPS.md), with every GEMM left to the vendor
library through torch (cuBLAS on a GPU, ATen's BLAS on the CPU) and only the epilogues our
own: per column chunk the margin, the online log-sum-exp and the kept scores (forward),
the softmax gradient (backward). On CUDA the epilogues are the kernels of
kernels/csrc/cuda/chunk_epilogue.cu; on the CPU the same arithmetic in torch ops. Memory
O(B x chunk) beyond the kept logits.

bf16: the GEMM operands are rounded to bfloat16; on CUDA the GEMMs run on the tensor cores
with fp32 accumulation and output (``torch.mm(..., out_dtype=torch.float32)``); on the CPU
as fp32 GEMMs of the rounded operands (the same products and sums).
"""
from __future__ import annotations

import torch

from dpface.ops.contract import MarginSoftmaxOut
from dpface.ops.reference import negative_reference, psi_reference, sample_margin_grad

# Elements of one chunk's [B, chunk] scores: the GPU's is large enough for full-speed
# GEMMs; the CPU's stays in cache between the GEMM and the epilogue.
CHUNK_ELEMS = {"cuda": 1 << 24, "cpu": 1 << 18}
MIN_CHUNK = 64


def chunk_width(device_type: str, batch: int) -> int:
    return max(MIN_CHUNK, CHUNK_ELEMS.get(device_type, 1 << 18) // max(1, batch))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _operand(t: torch.Tensor, acc: torch.dtype, bf16: bool) -> torch.Tensor:
    """A GEMM operand: bf16 tensors on CUDA (tensor cores), else acc values (rounded to
    bf16 when asked)."""
    if not bf16:
        return t.to(acc)
    if t.is_cuda:
        return t.to(torch.bfloat16)
    return t.to(torch.bfloat16).to(acc)


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    if a.dtype == torch.bfloat16:  # CUDA: bf16 inputs, fp32 accumulation and output
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b)


def _chunks(K: int, n_keep: int, width: int):
    """Column ranges [c0, c1); none straddles n_keep (a chunk is read from the kept logits
    or recomputed, whole)."""
    for lo, hi in ((0, n_keep), (n_keep, K)):
        for c0 in range(lo, hi, width):
            yield c0, min(c0 + width, hi)


class _Margin:
    """The op's margin arguments (schema order), and each row's values."""

    def __init__(self, scale, margin, hard, s, m1, m2, m3, t, easy, clip, normalize):
        self.scale, self.margin, self.hard = scale, margin, hard
        self.s, self.m1, self.m2, self.m3, self.t = float(s), float(m1), float(m2), float(m3), float(t)
        self.easy, self.clip, self.normalize = bool(easy), bool(clip), bool(normalize)

    def args(self):
        return (self.scale, self.margin, self.hard, self.s, self.m1, self.m2, self.m3, self.t, self.easy, self.clip,
                self.normalize)

    def row_scale(self, rows=None):
        """s of each row (a float without per-sample scales)."""
        if self.scale is None:
            return self.s
        return self.scale if rows is None else self.scale[rows]

    def psi(self, ts, rows):
        """The target's unscaled logit for the rows ``rows`` at their scores ``ts``."""
        ms = (self.m1, self.m2, self.m3) if self.margin is None else self.margin.detach()[rows].unbind(1)
        return psi_reference(ts, *ms, self.easy, self.clip)


# ---- the epilogues: CUDA kernels, or torch ops on other devices -------------------------

def _fwd_epilogue(scores, inv, bias, target, c0, mg: _Margin, saved, n_keep, run_max, run_sum, max_score,
                  target_logit, target_score):
    if scores.is_cuda:
        torch.ops.dpface.chunk_fwd_epilogue_(scores, inv, bias, target, c0, *mg.args(), saved, run_max, run_sum,
                                             max_score, target_logit, target_score)
        return
    n = scores.shape[1]
    if mg.normalize:
        scores = scores * inv
    elif bias is not None:
        scores = scores + bias
    max_score.copy_(torch.maximum(max_score, scores.amax(1)))  # NaN propagates, as torch.max does
    if c0 < n_keep:
        saved[:, c0:min(c0 + n, n_keep)] = scores[:, :min(n, n_keep - c0)]
    s_rows = mg.row_scale()
    z = (s_rows[:, None] if torch.is_tensor(s_rows) else s_rows) * negative_reference(scores, mg.hard, mg.t)
    local = target - c0
    has = (local >= 0) & (local < n)
    rows = has.nonzero().squeeze(1)
    if rows.numel():
        ts = scores[rows, local[rows]]
        tl = mg.row_scale(rows) * mg.psi(ts, rows)
        z[rows, local[rows]] = tl
        target_score[rows] = ts
        target_logit[rows] = tl
    zmax = z.amax(1)
    m_new = torch.maximum(run_max, zmax)
    old = torch.where(run_max == -torch.inf, 0.0, run_sum * torch.exp(run_max - m_new))
    run_sum.copy_(old + torch.exp(z - m_new[:, None]).sum(1))
    run_max.copy_(m_new)


def _bwd_epilogue(src, from_saved, inv, bias, target, target_score, lse, grad_lse, grad_target, c0, mg: _Margin):
    n = src.shape[1]
    if src.is_cuda:
        da = torch.empty(src.shape, dtype=torch.float32, device=src.device)
        torch.ops.dpface.chunk_bwd_epilogue_(src, from_saved, inv, bias, target, target_score, lse, grad_lse,
                                             grad_target, c0, *mg.args(), da)
        return da
    local = target - c0
    rows = ((local >= 0) & (local < n)).nonzero().squeeze(1)
    cols = local[rows]
    if from_saved:
        scores = src
    else:
        scores = src * inv if mg.normalize else (src + bias if bias is not None else src)
    s_all = mg.row_scale()
    s_b = s_all[:, None] if torch.is_tensor(s_all) else s_all
    with torch.enable_grad():  # each logit's slope in its score, by autograd of the same formulas
        sc = scores.detach().requires_grad_(True)
        neg = negative_reference(sc, mg.hard, mg.t)
        (dneg,) = torch.autograd.grad(neg.sum(), sc) if mg.hard is not None else (None,)
        ts = target_score[rows].detach().requires_grad_(True)
        psi = mg.psi(ts, rows)
        (dpsi,) = torch.autograd.grad(psi.sum(), ts) if rows.numel() else (ts.detach(),)
    z = s_b * neg.detach()
    z[rows, cols] = mg.row_scale(rows) * psi.detach()
    G = grad_lse[:, None] * torch.exp(z - lse[:, None])
    G[rows, cols] += grad_target[rows]
    dscore = s_b * G if dneg is None else s_b * G * dneg
    dscore[rows, cols] = mg.row_scale(rows) * G[rows, cols] * dpsi
    return dscore * inv if mg.normalize else dscore


# ---- the op -----------------------------------------------------------------------------

class ChunkedMarginSoftmax(torch.autograd.Function):
    """Inputs and outputs as ``dpface::margin_softmax_fwd`` (plus the chunk width);
    gradients as its registered autograd (dense for w / bias, compact for the sinks)."""

    @staticmethod
    def forward(ctx, x, w, idx, target, bias, w_sink, b_sink, scale, margin, hard, s, m1, m2, m3, t, easy, clip,
                normalize, bf16, keep_cols, width):
        mg = _Margin(scale, margin, hard, s, m1, m2, m3, t, easy, clip, normalize)
        torch.ops.dpface.margin_softmax_check(x, w, idx, target, bias, *mg.args(), keep_cols)
        if x.is_cuda and x.dtype == torch.float64:  # the CUDA epilogues are fp32, as the fused kernels
            raise RuntimeError("dpface::margin_softmax_fwd: float64 is CPU-only (the CUDA kernels accumulate in "
                               "float32); use float32 or bfloat16 on CUDA, or run the float64 op on the CPU")
        acc = _acc(x.dtype)
        rnd = bf16 or x.dtype == torch.bfloat16
        B = x.shape[0]
        K = idx.numel() if idx is not None else w.shape[0]
        n_keep = min(K, keep_cols)
        opts = dict(dtype=acc, device=x.device)
        run_max = torch.full((B,), -torch.inf, **opts)
        run_sum = torch.zeros(B, **opts)
        max_score = torch.full((B,), -torch.inf, **opts)
        target_logit, target_score = torch.zeros(B, **opts), torch.zeros(B, **opts)
        inv = torch.ones(K, **opts)
        saved = torch.empty(B, n_keep, **opts)
        xg = _operand(x, acc, rnd)
        b_all = None if bias is None else (bias if idx is None else bias[idx]).to(acc)
        for c0, c1 in _chunks(K, 0, width):
            rows = (w[c0:c1] if idx is None else w[idx[c0:c1]]).to(acc)
            if normalize:
                inv[c0:c1] = rows.norm(dim=1).clamp_min(1e-12).reciprocal()
            scores = _mm(xg, _operand(rows, acc, rnd).T, acc).to(acc).contiguous()
            _fwd_epilogue(scores, inv[c0:c1] if normalize else None, None if b_all is None else b_all[c0:c1],
                          target, c0, mg, saved, n_keep, run_max, run_sum, max_score, target_logit,
                          target_score)
        lse = run_max + run_sum.log() if K else run_max
        ctx.save_for_backward(x, w, idx, target, bias, lse, inv, saved, target_score, target_logit, scale, margin,
                              hard)
        ctx.params = (mg, rnd, width)
        ctx.mark_non_differentiable(target_score, max_score, inv, saved)
        ctx.set_materialize_grads(False)
        return lse, target_logit, target_score, max_score, inv, saved

    @staticmethod
    def backward(ctx, g_lse, g_t, *_):
        x, w, idx, target, bias, lse, inv, saved, target_score, target_logit, scale, margin, hard = ctx.saved_tensors
        mg, rnd, width = ctx.params
        mg = _Margin(scale, margin, hard, *mg.args()[3:])  # the saved tensors, not the forward's
        normalize = mg.normalize
        acc = lse.dtype
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.to(acc)
        g_t = torch.zeros_like(lse) if g_t is None else g_t.to(acc)
        B, D = x.shape
        K = inv.numel()
        n_keep = saved.shape[1]
        gx = torch.zeros(B, D, dtype=acc, device=x.device)
        grows = torch.empty(K, D, dtype=acc, device=x.device)
        gb = torch.empty(K, dtype=acc, device=x.device) if bias is not None else None
        xg = _operand(x, acc, rnd)
        b_all = None if bias is None else (bias if idx is None else bias[idx]).to(acc)
        for c0, c1 in _chunks(K, n_keep, width):
            rows = (w[c0:c1] if idx is None else w[idx[c0:c1]]).to(acc)
            rg = _operand(rows, acc, rnd)
            from_saved = c0 < n_keep
            src = saved[:, c0:c1] if from_saved else _mm(xg, rg.T, acc).to(acc).contiguous()
            da = _bwd_epilogue(src, from_saved, inv[c0:c1] if normalize else None,
                               None if b_all is None else b_all[c0:c1], target, target_score, lse, g_lse, g_t,
                               c0, mg).to(acc)
            if gb is not None:
                gb[c0:c1] = da.sum(0)
            dag = _operand(da, acc, rnd)
            gx += _mm(dag, rg, acc).to(acc)
            M = _mm(dag.T, xg, acc).to(acc)
            if normalize:  # the gradient of a normalised row: its tangential part
                M -= ((rows * M).sum(1) * inv[c0:c1] ** 2)[:, None] * rows
            grows[c0:c1] = M
        need = ctx.needs_input_grad

        def dense(g, like):  # rows outside idx get exactly zero
            return g if idx is None else like.new_zeros(like.shape).index_copy_(0, idx, g.to(like.dtype))

        g_margin = None
        if need[8]:
            g_margin = sample_margin_grad(g_lse, g_t, lse, target_logit, target_score, target, scale, margin, mg.s,
                                          mg.easy, mg.clip)
        return (gx.to(x.dtype) if need[0] else None, dense(grows, w) if need[1] else None, None, None,
                dense(gb, bias) if need[4] else None, grows.to(w.dtype) if need[5] else None,
                gb if need[6] else None, None, g_margin) + (None,) * 12


def chunked_margin_softmax(x, w, idx, target, bias, w_rows_sink, bias_rows_sink, scale, margin, hard, s, m1, m2, m3,
                           t, easy_margin, angle_clip, normalize, bf16, keep_cols,
                           width: int | None = None) -> MarginSoftmaxOut:
    width = width or chunk_width(x.device.type, x.shape[0])
    return MarginSoftmaxOut(*ChunkedMarginSoftmax.apply(x, w, idx, target, bias, w_rows_sink, bias_rows_sink, scale,
                                                        margin, hard, s, m1, m2, m3, t, easy_margin, angle_clip,
                                                        normalize, bf16, keep_cols, int(width)))


__all__ = ["chunked_margin_softmax", "chunk_width", "ChunkedMarginSoftmax"]
