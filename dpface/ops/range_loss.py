"""``dpface::range_loss_fwd`` / ``_bwd``: the Range loss terms (L_intra, L_inter) of a batch.
Contract: kernels/OPS.md; reference: :func:`dpface.ops.reference.range_loss_terms_reference`."""
from __future__ import annotations

import torch

from dpface.ops.build import available, warn_missing


def _register() -> None:
    @torch.library.register_fake("dpface::range_loss_fwd")
    def _fwd_fake(x, labels, k, margin):
        return x.new_empty(()), x.new_empty(())

    @torch.library.register_fake("dpface::range_loss_bwd")
    def _bwd_fake(gi, ge, x, labels, k, margin):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        x, labels, k, margin = inputs
        ctx.save_for_backward(x, labels)
        ctx.params = (k, margin)

    def backward(ctx, gi, ge):
        x, labels = ctx.saved_tensors
        gi = torch.zeros((), dtype=x.dtype, device=x.device) if gi is None else gi
        ge = torch.zeros((), dtype=x.dtype, device=x.device) if ge is None else ge
        gx = torch.ops.dpface.range_loss_bwd(gi, ge, x, labels, *ctx.params)
        return gx if ctx.needs_input_grad[0] else None, None, None, None

    torch.library.register_autograd("dpface::range_loss_fwd", backward,
                                    setup_context=setup_context)


def range_loss_terms(x: torch.Tensor, labels: torch.Tensor, k: int, margin: float,
                     *, kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_intra, L_inter) of the batch; ``kernel``: auto | fused | reference."""
    if kernel != "reference" and x.dtype in (torch.float32, torch.float64) \
            and available(x.device.type):
        return torch.ops.dpface.range_loss_fwd(x.contiguous(), labels.long().contiguous(),
                                               int(k), float(margin))
    if kernel == "fused":
        raise RuntimeError(f"range loss: kernel=fused but the compiled op is not available for "
                           f"{x.device.type} {x.dtype} tensors")
    if kernel == "auto" and not available(x.device.type):
        warn_missing("range loss")
    from dpface.ops.reference import range_loss_terms_reference

    return range_loss_terms_reference(x, labels, k, margin)


if available("cpu"):
    _register()

__all__ = ["range_loss_terms"]
