"""Knot-Magnify (KM) loss (Rao et al., Huawei Noah's Ark): a per-sample weighting of
the (margin-)softmax cross-entropy that suppresses easy samples and magnifies hard
ones, relatively.

    L = −(1/N)·Σ_i (γ·p_i + 1)^(−2)·ln p_i,   p_i = softmax probability of the true class

γ = 0 is the plain cross-entropy. p comes from whatever logits the wrapped transform
(``base``) produces, so KM composes with any margin: ``{name: km, gamma: 1, base:
{name: arcface, s: 64, m: 0.5}}``. Normalised by its integral over p ∈ (0, 1)
(∫ −(γp+1)^(−2) ln p dp = ln(1+γ)/γ; softmax's is 1), the KM loss is below the
softmax loss for p > p_c(γ) = sqrt(1/(γ·ln(1+γ))) − 1/γ and above it for p < p_c.

``detach_weight`` (default False): False differentiates the formula as written, the
weight included (as focal loss does), so the gradient is that of the loss that is
logged; per sample it is (softmax − onehot)·[w + w'(p)·p·ln p] with w = (γp+1)^(−2),
which reaches its largest relative boost at p≈1/e. True treats w as a constant
per-sample weight (importance-weighted cross-entropy): gradient (softmax − onehot)·w.
The default follows the formula because the paper states the loss, not a reweighting
of the softmax gradient, and because then the critical-point analysis (which compares
loss values) describes the objective actually minimised.
"""
from __future__ import annotations

import math

import torch

from dpface.losses.margin import LogitTransform, Softmax


class KnotMagnify(LogitTransform):
    def __init__(self, base: LogitTransform, gamma: float = 1.0, detach_weight: bool = False):
        super().__init__()
        if not isinstance(base, LogitTransform):
            raise TypeError(f"km: base must be a logit transform, got {type(base).__name__}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
            raise ValueError(f"km: gamma must be a number >= 0, got {gamma!r}")
        self.base = base
        self.gamma = float(gamma)
        self.detach_weight = bool(detach_weight)
        self.normalize, self.bias, self.needs_norms = base.normalize, base.bias, base.needs_norms

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, detach_weight={self.detach_weight}"

    def bind_head(self, num_classes: int) -> None:
        self.base.bind_head(num_classes)

    def margin_logits(self, scores, target, ctx):
        return self.base.margin_logits(scores, target, ctx)

    def fused_margin(self):
        return self.base.fused_margin()  # the weight needs only p, which the head has

    @property
    def weighted(self) -> bool:
        return True

    def weight(self, p: torch.Tensor) -> torch.Tensor:
        return (self.gamma * p + 1.0).pow(-2)

    def loss_weight(self, p: torch.Tensor) -> torch.Tensor:
        w = self.weight(p.detach() if self.detach_weight else p)
        inner = self.base.loss_weight(p)
        return w if inner is None else w * inner


def km(gamma: float = 1.0, detach_weight: bool = False, base=None) -> KnotMagnify:
    """``base`` defaults to plain softmax (the paper's setting)."""
    return KnotMagnify(Softmax() if base is None else base, gamma=gamma, detach_weight=detach_weight)


def critical_point(gamma: float) -> float:
    """p_c(γ) = sqrt(1/(γ·ln(1+γ))) − 1/γ, where normalised KM and softmax losses meet."""
    if gamma <= 0:
        raise ValueError(f"the critical point needs gamma > 0, got {gamma}")
    return math.sqrt(1.0 / (gamma * math.log1p(gamma))) - 1.0 / gamma


__all__ = ["KnotMagnify", "km", "critical_point"]
