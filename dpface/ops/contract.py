"""The fused margin softmax's types, shared by its three implementations (the compiled
op, the chunked path and the PyTorch reference) and its callers: what the op expresses and
what it returns. The full contract: kernels/OPS.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class FusedMargin:
    """What the fused op expresses: logits s·ψ(score) on the target, s·score elsewhere, with
    ψ the combined margin cos(m1·θ + m2) − m3; ``normalize`` False means raw x·W (+ b)
    scores with no scale or margin (plain softmax)."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    easy_margin: bool = False
    normalize: bool = True


class MarginSoftmaxOut(NamedTuple):
    lse: torch.Tensor  # [B] local log-sum-exp (differentiable)
    target_logit: torch.Tensor  # [B] (differentiable; 0 where the target is elsewhere)
    target_score: torch.Tensor  # [B] no grad
    max_score: torch.Tensor  # [B] no grad
    inv_norm: torch.Tensor  # [K] no grad
    saved: torch.Tensor  # [B, n_keep] logits kept for backward, no grad


__all__ = ["FusedMargin", "MarginSoftmaxOut"]
