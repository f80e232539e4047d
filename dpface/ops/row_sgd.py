"""``dpface::sgd_rows_``: torch SGD's update (momentum, L2 decay) on a step's sampled rows,
one pass per row on the CPU; the same three indexed torch ops elsewhere."""
from __future__ import annotations

import torch

from dpface.ops.build import available


def _register() -> None:
    @torch.library.register_fake("dpface::sgd_rows_")
    def _fake(param, buf, idx, grad, lr, momentum, weight_decay):
        return None


def sgd_rows_reference(param, buf, idx, grad, lr, momentum, weight_decay) -> None:
    d = grad.to(param.dtype)
    if weight_decay != 0:
        d = d.add(param.index_select(0, idx), alpha=weight_decay)
    d = buf.index_select(0, idx).mul_(momentum).add_(d)
    buf.index_copy_(0, idx, d)
    # idx holds distinct rows, so index_add_ is an exact in-place row update.
    param.index_add_(0, idx, d, alpha=-lr)


@torch.no_grad()
def sgd_rows_(param: torch.Tensor, buf: torch.Tensor, idx: torch.Tensor, grad: torch.Tensor,
              lr: float, momentum: float, weight_decay: float) -> None:
    if param.device.type == "cpu" and available("cpu") and param.dim() == 2 \
            and param.dtype == grad.dtype and param.dtype in (torch.float32, torch.float64):
        torch.ops.dpface.sgd_rows_(param, buf, idx, grad.contiguous(), float(lr),
                                   float(momentum), float(weight_decay))
    else:
        sgd_rows_reference(param, buf, idx, grad, lr, momentum, weight_decay)


if available("cpu"):
    _register()

__all__ = ["sgd_rows_", "sgd_rows_reference"]
