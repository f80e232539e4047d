"""Collectives the model-parallel head needs, each a no-op at world size 1.

Gradient convention of :func:`all_gather_with_grad` (read this before changing it)
-------------------------------------------------------------------------------
The head computes one *global* loss, the mean over the global batch, and every rank
holds the same value. Rank r's backbone only sees its own samples, so the gradient
that reaches it is the part of dL/dθ that flows through its samples; the true
gradient is the *sum* of these parts over ranks. DDP, however, *averages* gradients
across ranks. The gather's backward therefore multiplies the returned embedding
gradient by the world size, so that DDP's average equals the single-process gradient
of the same global-batch loss:

    (1/W) · Σ_r  W · ∂L/∂θ|_{samples of r}  =  ∂L/∂θ.

A loss computed only on the local batch (mean over B_local) needs no such factor;
DDP's average of local means is already the global mean for equal batch sizes.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist

from dpface.distributed import get_rank, get_world_size, is_initialized


def _active(group) -> bool:
    return is_initialized() and get_world_size(group) > 1


def gather_shapes(x: torch.Tensor, group=None) -> list[tuple[int, ...]]:
    """Every rank's ``x.shape`` (a cheap all-gather of a few integers)."""
    if not _active(group):
        return [tuple(x.shape)]
    # Pad to a fixed length so ranks with tensors of different rank still agree.
    dims = list(x.shape)[:7]
    code = torch.tensor([len(x.shape)] + dims + [0] * (7 - len(dims)), dtype=torch.long,
                        device=x.device)
    out = [torch.empty_like(code) for _ in range(get_world_size(group))]
    tdist.all_gather(out, code, group=group)
    return [tuple(int(v) for v in c[1:1 + int(c[0])]) for c in out]


def check_equal_shapes(x: torch.Tensor, group=None, what: str = "tensor") -> None:
    """Raise the same ValueError on every rank when the ranks' shapes differ.

    Gathering tensors of unequal sizes either crashes inside the backend or hangs;
    checking the sizes first turns that into a message every rank raises together.
    """
    shapes = gather_shapes(x, group)
    if any(s != shapes[0] for s in shapes):
        listed = ", ".join(f"rank {r}: {list(s)}" for r, s in enumerate(shapes))
        raise ValueError(
            f"all-gather of {what} needs the same shape on every rank (equal per-rank batch "
            f"sizes); got {listed}. Drop the last incomplete batch (drop_last=True) or pad "
            f"the batch before the head."
        )


def _gather_cat(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(get_world_size(group))]
    tdist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def all_gather(x: torch.Tensor, group=None, check_sizes: bool = True) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, without autograd. Ranks in order."""
    if not _active(group):
        return x
    if check_sizes:
        check_equal_shapes(x, group)
    with torch.no_grad():
        return _gather_cat(x, group)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_scale):
        ctx.group, ctx.grad_scale = group, grad_scale
        ctx.rank, ctx.batch = get_rank(group), x.shape[0]
        return _gather_cat(x, group)

    @staticmethod
    def backward(ctx, grad):
        # Each rank holds the gradient of its own part of the loss w.r.t. *every*
        # gathered sample; the sum over ranks is the full gradient. Sum it, keep the
        # rows this rank produced.
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's buffer
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM, group=ctx.group)
        lo = ctx.rank * ctx.batch
        out = grad[lo:lo + ctx.batch]
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None


def all_gather_with_grad(x: torch.Tensor, group=None, grad_scale: float | None = None,
                         check_sizes: bool = True) -> torch.Tensor:
    """Autograd-aware all-gather of ``x`` [B_local, ...] → [W·B_local, ...].

    Backward returns to each rank the gradient of the samples it produced, multiplied
    by ``grad_scale`` (default: the world size — the DDP convention in the module
    docstring; pass 1.0 for the plain gradient). Every rank must run the backward: it
    is a collective. Per-rank batch sizes must be equal; a mismatch raises a ValueError
    naming each rank's size on every rank (``check_sizes=False`` skips the check when
    the caller has already checked).
    """
    if not _active(group):
        return x
    if check_sizes:
        check_equal_shapes(x, group, what="embeddings")
    scale = float(get_world_size(group) if grad_scale is None else grad_scale)
    return _AllGatherWithGrad.apply(x, group, scale)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if not _active(group):
        return x.detach()
    out = x.detach().clone()
    tdist.all_reduce(out, op=op, group=group)
    return out


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise sum over ranks (no autograd; at world size 1 ``x`` detached, not copied)."""
    return _all_reduce(x, tdist.ReduceOp.SUM, group)


def all_reduce_max(x: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise max over ranks (no autograd; at world size 1 ``x`` detached, not copied)."""
    return _all_reduce(x, tdist.ReduceOp.MAX, group)


__all__ = ["all_gather", "all_gather_with_grad", "all_reduce_max", "all_reduce_sum",
           "check_equal_shapes", "gather_shapes"]
