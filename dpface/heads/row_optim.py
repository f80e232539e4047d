"""SGD that updates only the class rows a PartialFC step sampled (``update="sampled"``).

With ``PartialFC(update="sampled")`` the step's rows of W (and bias) enter the graph as
a separate leaf, so backward yields a [K, D] gradient instead of a dense [C_local, D]
one; :class:`SampledRowSGD` then applies torch SGD's math (momentum, dampening 0, L2
weight decay) to those K rows only:

    d = g + wd·W[idx];  buf[idx] = μ·buf[idx] + d;  W[idx] -= lr·buf[idx]

Lazy semantics (the original Partial FC's): a row not sampled this step is left exactly
as it is — no momentum step, no weight decay, its momentum buffer is not decayed. A
dense optimizer instead keeps moving unsampled rows by μ·buf and shrinks them by the
decay every step. At sample rate 1 (every row scored) both are the same update.

The momentum buffer is kept full size ([C_local, D], ``state[weight]['momentum_buffer']``,
zero-initialised; μ·0 + d = d is torch SGD's first step), so the sharded checkpoint and
resharding code treat it like a dense SGD's. Head parameters that are not rows (e.g. a
learned logit scale) get the ordinary dense SGD update.
"""
from __future__ import annotations

import torch

from dpface.heads.sharding import ROW_PARAMS
from dpface.ops.row_sgd import sgd_rows_


class SampledRowSGD(torch.optim.Optimizer):
    """SGD over a ``PartialFC(update="sampled")`` head: all of the head's parameters, rows
    updated lazily from the head's sampled leaves (see the module docstring)."""

    def __init__(self, head, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if getattr(head, "update", None) != "sampled":
            raise ValueError("SampledRowSGD needs a PartialFC built with update='sampled' "
                             "(a dense head's rows get dense gradients: use torch.optim.SGD)")
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, "
                             f"{momentum}, {weight_decay}")
        super().__init__(list(head.parameters()),
                         dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        # A plain attribute, not in state_dict: the head is rebuilt, not saved, on resume.
        self._head = head
        self._row_names = {id(p): n for n, p in head.named_parameters() if n in ROW_PARAMS}

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._head.clear_sampled()  # drop the step's leaves (and their [K, D] grads)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SampledRowSGD does not take a closure")
        sampled = self._head.sampled_rows()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                name = self._row_names.get(id(p))
                if name is None:
                    if p.grad is not None:
                        self._dense(p, p.grad, lr, mu, wd)
                    continue
                if p.grad is not None:
                    raise RuntimeError(
                        f"head.{name} has a dense gradient in update='sampled' mode; its rows "
                        "must be used only through the head's forward (the sampled leaf)")
                if sampled is None:
                    continue  # no forward/backward since the last zero_grad
                leaf = sampled.leaves.get(name)
                if leaf is None or leaf.grad is None:
                    continue
                if sampled.idx is None:  # every row was scored: the dense update
                    self._dense(p, leaf.grad, lr, mu, wd)
                else:
                    self._rows(p, sampled.idx, leaf.grad, lr, mu, wd)

    def _buffer(self, p, mu):
        if mu == 0:
            return None
        st = self.state[p]
        if st.get("momentum_buffer") is None:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st["momentum_buffer"]

    def _dense(self, p, g, lr, mu, wd):
        # torch.optim.SGD's arithmetic, op for op, so r = 1 matches it bit for bit.
        d = g.add(p, alpha=wd) if wd != 0 else g
        buf = self._buffer(p, mu)
        if buf is not None:
            buf.mul_(mu).add_(d)
            d = buf
        p.add_(d, alpha=-lr)

    def _rows(self, p, idx, g, lr, mu, wd):
        buf = self._buffer(p, mu)
        if buf is not None:
            sgd_rows_(p, buf, idx, g, lr, mu, wd)  # one pass per row (compiled on CPU)
            return
        d = g.to(p.dtype)
        if wd != 0:
            d = d.add(p.index_select(0, idx), alpha=wd)
        # idx holds distinct rows, so index_add_ is an exact in-place row update.
        p.index_add_(0, idx, d, alpha=-lr)


def make_head_optimizer(head, optimizer: str, lr: float, momentum: float,
                        weight_decay: float) -> torch.optim.Optimizer:
    """The head's optimizer for ``update='sampled'``; only SGD has a row-wise version."""
    if optimizer != "sgd":
        raise ValueError(f"head.update=sampled supports train.optimizer=sgd only, got "
                         f"'{optimizer}' (a lazy row-wise AdamW is not implemented); use "
                         "head.update=dense with AdamW")
    return SampledRowSGD(head, lr=lr, momentum=momentum, weight_decay=weight_decay)


__all__ = ["SampledRowSGD", "make_head_optimizer"]
