"""``dpface::margin_softmax_fwd`` / ``_bwd``: the fused margin softmax over a shard's rows.

Forward returns per sample the local log-sum-exp of the logits, the target logit (with its
margin), the target score and the max score (for accuracy): O(B) numbers per rank, which
the distributed cross-entropy combines across ranks between forward and backward. Backward
recomputes each column tile (or reads the scores kept within the memory budget) and returns
the gradients of x and of the scored rows; that of per-sample margins (O(B)) is computed
here from the forward's target logits. Contract: kernels/OPS.md.
"""
from __future__ import annotations

import torch

from dpface.ops.build import available, warn_missing
from dpface.ops.contract import FusedMargin, MarginSoftmaxOut
from dpface.ops.reference import margin_softmax_reference, sample_margin_grad


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Argument positions of dpface::margin_softmax_fwd (kernels/OPS.md).
_SCALE, _MARGIN, _HARD, _S, _T, _EASY, _CLIP = 7, 8, 9, 10, 14, 15, 16
N_FWD_ARGS = 20


def _register() -> None:
    """Fake implementations and autograd of the compiled ops (the library is loaded)."""

    @torch.library.register_fake("dpface::margin_softmax_fwd")
    def _fwd_fake(x, w, idx, target, bias, w_sink, b_sink, scale, margin, hard, s, m1, m2, m3, t, easy, clip,
                  normalize, bf16, keep_cols):
        acc = _acc(x.dtype)
        b = x.shape[0]
        k = idx.shape[0] if idx is not None else w.shape[0]
        n_keep = torch.sym_min(k, keep_cols)
        vec = x.new_empty(b, dtype=acc)
        return (vec, torch.empty_like(vec), torch.empty_like(vec), torch.empty_like(vec),
                x.new_empty(k, dtype=acc), x.new_empty(b, n_keep, dtype=acc))

    @torch.library.register_fake("dpface::margin_softmax_bwd")
    def _bwd_fake(g_lse, g_t, lse, x, w, idx, target, bias, inv_norm, saved, scale, margin, hard, s, m1, m2, m3, t,
                  easy, clip, normalize, bf16):
        k = idx.shape[0] if idx is not None else w.shape[0]
        gb = w.new_empty(k if bias is not None else 0, dtype=bias.dtype if bias is not None
                         else _acc(x.dtype))
        return torch.empty_like(x), w.new_empty(k, w.shape[1]), gb

    def setup_context(ctx, inputs, output):
        x, w, idx, target, bias = inputs[:5]
        scale, margin, hard = inputs[_SCALE:_HARD + 1]
        lse, tl, ts, ms, inv, saved = output
        ctx.save_for_backward(x, w, idx, target, bias, lse, inv, saved, scale, margin, hard, tl, ts)
        ctx.params = inputs[_S:-1]  # the scalars and flags of the margin, bf16
        ctx.mark_non_differentiable(ts, ms, inv, saved)
        ctx.set_materialize_grads(False)  # else backward gets a zero [B, n_keep] for `saved`

    def backward(ctx, g_lse, g_t, *_):
        x, w, idx, target, bias, lse, inv, saved, scale, margin, hard, tl, ts = ctx.saved_tensors
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
        g_t = torch.zeros_like(lse) if g_t is None else g_t
        gx, grows, gb = torch.ops.dpface.margin_softmax_bwd(
            g_lse.contiguous(), g_t.contiguous(), lse, x, w, idx, target, bias, inv, saved, scale, margin, hard,
            *ctx.params)
        need = ctx.needs_input_grad
        g_margin = None
        if need[_MARGIN]:
            s, easy, clip = ctx.params[0], ctx.params[_EASY - _S], ctx.params[_CLIP - _S]
            g_margin = sample_margin_grad(g_lse, g_t, lse, tl, ts, target, scale, margin, s, easy, clip)

        def dense(g, like):  # rows outside idx get exactly zero
            return g if idx is None else like.new_zeros(like.shape).index_copy_(0, idx, g)

        return (gx if need[0] else None, dense(grows, w) if need[1] else None, None, None,
                dense(gb, bias) if need[4] else None, grows if need[5] else None,
                gb if need[6] else None, None, g_margin) + (None,) * (N_FWD_ARGS - 9)

    torch.library.register_autograd("dpface::margin_softmax_fwd", backward,
                                    setup_context=setup_context)


IMPLS = ("fused", "chunked")


def margin_softmax(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None,
                   target: torch.Tensor, margin: FusedMargin, *, bias: torch.Tensor | None = None,
                   w_rows_sink: torch.Tensor | None = None,
                   bias_rows_sink: torch.Tensor | None = None, bf16: bool = False,
                   keep_cols: int = 0, impl: str = "fused") -> MarginSoftmaxOut:
    """The compiled op where built for x's device — ``impl`` "fused" (our GEMMs and
    epilogues in one op) or "chunked" (library GEMMs, our epilogues: dpface.ops.chunked) —
    else the PyTorch reference (one warning). All three keep the same contract."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if margin.scale is not None and margin.scale.requires_grad:
        raise ValueError("a per-sample scale takes no gradient in the fused op: pass it detached")
    args = (x, w, idx, target, bias, w_rows_sink, bias_rows_sink, *margin.args(), bool(bf16), int(keep_cols))
    if available(x.device.type):
        if impl == "chunked":
            from dpface.ops.chunked import chunked_margin_softmax

            return chunked_margin_softmax(*args)
        return MarginSoftmaxOut(*torch.ops.dpface.margin_softmax_fwd(*args))
    warn_missing("margin_softmax")
    return margin_softmax_reference(*args)


def rows_sink(k: int, d: int | None = None, dtype=torch.float32, device=None) -> torch.Tensor:
    """A zero-stride [k, d] (or [k]) leaf whose gradient receives the scored rows' gradient
    (``update: sampled``); one element of storage."""
    shape = (k,) if d is None else (k, d)
    return torch.zeros((), dtype=dtype, device=device).expand(shape).requires_grad_(True)


if available("cpu"):
    _register()

__all__ = ["margin_softmax", "rows_sink", "IMPLS"]
