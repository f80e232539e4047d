"""The fused margin softmax's types, shared by its three implementations (the compiled
op, the chunked path and the PyTorch reference) and its callers: what the op expresses and
what it returns. The full contract: kernels/OPS.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True, eq=False)
class FusedMargin:
    """What the fused op expresses: logits s·ψ(score) on the target, s·score elsewhere, with
    ψ the combined margin cos(m1·θ + m2) − m3 (past θ* its monotone fallback, or with
    ``angle_clip`` the angle clamped to [ε, π − ε]: AdaFace's form); ``normalize`` False means
    raw x·W (+ b) scores with no scale or margin (plain softmax).

    Per sample (accumulation dtype, one row per sample of the op's batch): ``scale`` [B]
    replaces s (no gradient), ``margin`` [B, 3] replaces (m1, m2, m3) (differentiable: MagFace's
    margin follows the feature norm), and ``hard_threshold`` [B] with ``t`` turns a negative
    score c above its row's threshold into c·(t + c) (CurricularFace)."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    easy_margin: bool = False
    normalize: bool = True
    angle_clip: bool = False
    t: float = 0.0
    scale: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    hard_threshold: torch.Tensor | None = None

    def args(self) -> tuple:
        """The op's margin arguments, in schema order (kernels/OPS.md)."""
        return (self.scale, self.margin, self.hard_threshold, float(self.s), float(self.m1), float(self.m2),
                float(self.m3), float(self.t), bool(self.easy_margin), bool(self.angle_clip), bool(self.normalize))


class MarginSoftmaxOut(NamedTuple):
    lse: torch.Tensor  # [B] local log-sum-exp (differentiable)
    target_logit: torch.Tensor  # [B] (differentiable; 0 where the target is elsewhere)
    target_score: torch.Tensor  # [B] no grad
    max_score: torch.Tensor  # [B] no grad
    inv_norm: torch.Tensor  # [K] no grad
    saved: torch.Tensor  # [B, n_keep] scores kept for backward, no grad


__all__ = ["FusedMargin", "MarginSoftmaxOut"]
