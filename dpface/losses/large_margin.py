"""Multiplicative angular margins: L-Softmax (Liu et al. 2016) and SphereFace /
A-Softmax (Liu et al. 2017).

Both replace the target's cos θ by ψ(θ) = (−1)^k·cos(mθ) − 2k on θ ∈ [kπ/m, (k+1)π/m]
(k = 0..m−1), a continuous, monotonically decreasing extension of cos(mθ) to [0, π]
(ψ(0) = 1, ψ(π) = 1 − 2m). cos(mθ) is the Chebyshev polynomial T_m(cos θ), and k
counts the thresholds cos(jπ/m), j = 1..m−1, that cos θ lies at or below — no acos, so
the gradient stays finite at θ = 0 and π.

Training anneals from the plain logit towards ψ: the target becomes
(λ·cos θ + ψ(θ))/(1 + λ) with λ = max(λ_min, λ_base·(1 + γ·step)^(−power)), the step
coming from the head's context (SphereFace's published schedule is the default for
both: λ_base 1000, γ 0.12, power 1, λ_min 5).

* L-Softmax: logits W_j·x (no bias, nothing normalised); the target is
  ‖W_y‖‖x‖·(λ·cos θ_y + ψ(θ_y))/(1 + λ).
* A-Softmax: ‖W_j‖ = 1 and no bias, so the logits are ‖x‖·cos θ_j and the target
  ‖x‖·(λ·cos θ_y + ψ(θ_y))/(1 + λ).
"""
from __future__ import annotations

import math
import operator

import torch

from dpface.losses.margin import HeadContext, LogitTransform, target_positions


def chebyshev(c: torch.Tensor, m: int) -> torch.Tensor:
    """T_m(c) = cos(m·acos c) by the recurrence T_{n+1} = 2c·T_n − T_{n−1}."""
    prev, cur = torch.ones_like(c), c
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2 * c * cur - prev
    return cur


def psi(c: torch.Tensor, m: int) -> torch.Tensor:
    """ψ(θ) = (−1)^k·cos(mθ) − 2k from c = cos θ (differentiable in c)."""
    with torch.no_grad():
        cc = c.clamp(-1.0, 1.0)
        k = torch.zeros_like(c)
        for j in range(1, m):
            k += (cc <= math.cos(j * math.pi / m)).to(c.dtype)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (−1)^k
    return sign * chebyshev(c, m) - 2.0 * k


class _AngularMargin(LogitTransform):
    needs_norms = True

    def __init__(self, m: int = 4, lambda_base: float = 1000.0, gamma: float = 0.12,
                 power: float = 1.0, lambda_min: float = 5.0):
        super().__init__()
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be an integer >= 1 (the Chebyshev form needs an "
                             f"integer multiple of the angle), got {m!r}")
        for name, v in (("lambda_base", lambda_base), ("gamma", gamma), ("power", power),
                        ("lambda_min", lambda_min)):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.m = m
        self.lambda_base, self.gamma = float(lambda_base), float(gamma)
        self.power, self.lambda_min = float(power), float(lambda_min)

    def extra_repr(self) -> str:
        return (f"m={self.m}, lambda_base={self.lambda_base}, gamma={self.gamma}, "
                f"power={self.power}, lambda_min={self.lambda_min}")

    def lam(self, step: int) -> float:
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return max(self.lambda_min, self.lambda_base * (1.0 + self.gamma * step) ** (-self.power))

    def annealed(self, c: torch.Tensor, step: int) -> torch.Tensor:
        lam = self.lam(step)
        return (lam * c + psi(c, self.m)) / (1.0 + lam)

    @staticmethod
    def _norms(ctx: HeadContext, name: str):
        if ctx.x_norm is None or (name == "lsoftmax" and ctx.w_norm is None):
            raise ValueError(f"{name} needs the embedding/row norms in the head context "
                             f"(needs_norms); call it from a head (PartialFC/FullFC)")
        return ctx.x_norm, ctx.w_norm


class SphereFace(_AngularMargin):
    """A-Softmax: ‖W‖ = 1, logits ‖x‖·cos θ_j, target ‖x‖·annealed ψ."""

    normalize = True

    def margin_logits(self, scores, target, ctx):
        x_norm, _ = self._norms(ctx, "sphereface")
        rows, cols = target_positions(target)
        z = scores.index_put((rows, cols), self.annealed(scores[rows, cols], ctx.step))
        return z, x_norm.to(scores.dtype)[:, None]


class LSoftmax(_AngularMargin):
    """L-Softmax: raw logits W_j·x, target ‖W_y‖‖x‖·annealed ψ(θ_y)."""

    normalize = False

    def margin_logits(self, scores, target, ctx):
        x_norm, w_norm = self._norms(ctx, "lsoftmax")
        rows, cols = target_positions(target)
        norms = (x_norm[rows] * w_norm[cols]).to(scores.dtype).clamp_min(1e-12)
        c = scores[rows, cols] / norms
        return scores.index_put((rows, cols), norms * self.annealed(c, ctx.step)), 1.0


def sphereface(m: int = 4, lambda_base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
               lambda_min: float = 5.0) -> SphereFace:
    return SphereFace(m, lambda_base, gamma, power, lambda_min)


def lsoftmax(m: int = 2, lambda_base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
             lambda_min: float = 5.0) -> LSoftmax:
    return LSoftmax(m, lambda_base, gamma, power, lambda_min)


__all__ = ["SphereFace", "LSoftmax", "sphereface", "lsoftmax", "psi", "chebyshev"]
