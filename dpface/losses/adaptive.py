"""Margins that adapt per step or per sample: AdaFace, MagFace, CurricularFace and ElasticFace.

**MagFace** (Meng et al., CVPR 2021). The magnitude a_i = ‖z_i‖, clipped to [l_a, u_a], sets
the sample's angular margin m(a) = l_m + (u_m − l_m)·(a − l_a)/(u_a − l_a): the target logit is
s·cos(θ_y + m(a_i)) (past π: ArcFace's fallback), and the loss gains λ_g·mean_i g(a_i) with
g(a) = 1/a + a/u_a², which pulls easy (well-recognised) samples to larger magnitudes.
Gradients flow through the magnitude in both. Defaults: the paper's l_a = 10, u_a = 110,
l_m = 0.45, u_m = 0.8, λ_g = 35, s = 64.

**AdaFace** (Kim et al., CVPR 2022). The feature norm ‖z_i‖ of the embedding (before it is
normalised) is a proxy of image quality. With μ, σ exponential moving averages of the batch's
norm mean and standard deviation (momentum α = 0.01, from μ₀ = 20, σ₀ = 100; updated once per
training step before the step's logits, without gradient), ẑ_i = clip(h·(‖z_i‖ − μ)/(σ + ε),
−1, 1) (h = 0.333, the norm detached), g_angle = −m·ẑ_i and g_add = m·ẑ_i + m, and the target
logit is s·(cos(clip(θ_y + g_angle, ε, π − ε)) − g_add): high-quality samples get an angular
(ArcFace-like) margin, low-quality ones an additive one that fades. The head hands every rank
the norms of the whole global batch, so μ and σ agree on every rank without a collective;
they are non-trainable parameters of the transform (``transform.mean``, ``transform.std``)
and ride in the head checkpoint.

**CurricularFace** (Huang et al., CVPR 2020). The target logit is ArcFace's, s·T(cos θ_y)
with T(cos θ_y) = cos(θ_y + m) (past θ_y + m = π: cos θ_y − m·sin m, as ArcFace's fallback).
A negative j whose cosine exceeds it, cos θ_j > T(cos θ_y), is a hard one and becomes
cos θ_j·(t + cos θ_j); the others stay cos θ_j. t is the curriculum: an exponential moving
average of the batch's mean target cosine r, t ← α·r + (1 − α)·t (α = 0.01, t₀ = 0),
updated once per training step before the step's logits, without gradient. In the
model-parallel head a sample's target cosine lives on one rank: one all-reduce of the B
target values (each non-zero on its owner) gives every rank T for the hard-negative mask and
the same r, so t is the same on every rank. t is a non-trainable parameter of the
transform (``transform.t``): the head checkpoint carries it, at any world size.

**ElasticFace** (Boutros et al., CVPRW 2022). The margin of each sample is drawn from
N(m, σ) every step: ElasticFace-Arc s·cos(θ_y + m_i), ElasticFace-Cos s·(cos θ_y − m_i).
The draws come from the named stream (seed, ELASTIC_MARGIN, step) over the global batch,
so every rank (and a resumed run) draws the same margins for the same sample.

**In the fused op.** ``fused_step`` hands the op the step's per-sample parameters
(kernels/OPS.md): AdaFace's (1, g_angle, g_add) with the angle clipped rather than ArcFace's
fallback; MagFace's and ElasticFace's (1, m_i, 0) or (1, 0, m_i), MagFace's differentiable
in the magnitudes; CurricularFace's thresholds T(cos θ_y) and t for the op's hard-negative
mode, computed from the target scores the head hands over before the op runs.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from dpface.losses.margin import COS_EPS, LogitTransform, arc_margin, target_positions
from dpface.ops import FusedMargin
from dpface.seeding import Stream, rng


class _StepEMA(LogitTransform):
    """A transform whose batch statistics move once per training step (a gradient-
    accumulation micro-batch or a repeated forward of the same step leaves them as they are)."""

    def __init__(self):
        super().__init__()
        self._updated_at: int | None = None

    def _due(self, ctx) -> bool:
        due = self.training and self._updated_at != ctx.step
        if due:
            self._updated_at = ctx.step
        return due


class AdaFace(_StepEMA):
    normalize = True
    needs_norms = True

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, alpha: float = 0.01):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"m must be in [0, pi/2), got {m}")
        if h <= 0:
            raise ValueError(f"h must be > 0, got {h}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.s, self.m, self.h, self.alpha = float(s), float(m), float(h), float(alpha)
        self.mean = nn.Parameter(torch.tensor(20.0, dtype=torch.float64), requires_grad=False)
        self.std = nn.Parameter(torch.tensor(100.0, dtype=torch.float64), requires_grad=False)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, alpha={self.alpha}"

    def _margins(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_angle, g_add) [B] float64 of the step (the EMAs moved first, once per step)."""
        if ctx.x_norm is None:
            raise RuntimeError("AdaFace needs the embeddings' norms: call it from a head (PartialFC / FullFC)")
        norm = ctx.x_norm.detach().double().clamp(1e-3, 100.0)
        if self._due(ctx):
            with torch.no_grad():
                self.mean.copy_(self.alpha * norm.mean() + (1 - self.alpha) * self.mean)
                self.std.copy_(self.alpha * norm.std() + (1 - self.alpha) * self.std)
        z = (self.h * (norm - self.mean) / (self.std + 1e-3)).clamp(-1.0, 1.0)
        return -self.m * z, self.m * z + self.m

    def margin_logits(self, scores, target, ctx):
        g_angle, g_add = (g.to(scores.dtype) for g in self._margins(ctx))
        rows, cols = target_positions(target)
        theta = torch.acos(scores[rows, cols].clamp(-1 + COS_EPS, 1 - COS_EPS))
        new = torch.cos((theta + g_angle[rows]).clamp(COS_EPS, math.pi - COS_EPS)) - g_add[rows]
        return scores.index_put((rows, cols), new), self.s

    def fused_margin(self) -> FusedMargin:
        return FusedMargin(s=self.s, angle_clip=True)

    def fused_step(self, ctx, dtype):
        g_angle, g_add = self._margins(ctx)
        margin = torch.stack([torch.ones_like(g_angle), g_angle, g_add], 1).to(dtype).contiguous()
        return FusedMargin(s=self.s, angle_clip=True, margin=margin)


class MagFace(LogitTransform):
    normalize = True
    needs_norms = True

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 35.0):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if not 0 < l_a < u_a:
            raise ValueError(f"the norm bounds must satisfy 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if not 0 <= l_m <= u_m < math.pi:
            raise ValueError(f"the margins must satisfy 0 <= l_m <= u_m < pi, got l_m={l_m}, u_m={u_m}")
        if lambda_g < 0:
            raise ValueError(f"lambda_g must be >= 0, got {lambda_g}")
        self.s, self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = map(float, (s, l_a, u_a, l_m, u_m, lambda_g))

    def extra_repr(self) -> str:
        return f"s={self.s}, a in [{self.l_a}, {self.u_a}], m in [{self.l_m}, {self.u_m}], lambda_g={self.lambda_g}"

    def _margins(self, ctx) -> torch.Tensor:
        """m(a_i) [B] of the step, differentiable in the magnitudes."""
        if ctx.x_norm is None:
            raise RuntimeError("MagFace needs the embeddings' norms: call it from a head (PartialFC / FullFC)")
        a = ctx.x_norm.clamp(self.l_a, self.u_a)
        return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)

    def margin_logits(self, scores, target, ctx):
        m = self._margins(ctx).to(scores.dtype)
        rows, cols = target_positions(target)
        return scores.index_put((rows, cols), arc_margin(scores[rows, cols], m[rows])), self.s

    def fused_margin(self) -> FusedMargin:
        return FusedMargin(s=self.s)

    def fused_step(self, ctx, dtype):
        m = self._margins(ctx).to(dtype)
        return FusedMargin(s=self.s, margin=torch.stack([torch.ones_like(m), m, torch.zeros_like(m)], 1))

    def regularizer(self, ctx):
        if self.lambda_g == 0:
            return None
        a = ctx.x_norm.clamp(self.l_a, self.u_a)
        return self.lambda_g * (1.0 / a + a / self.u_a ** 2).mean()


class CurricularFace(_StepEMA):
    normalize = True
    needs_target_score = True

    def __init__(self, s: float = 64.0, m: float = 0.5, alpha: float = 0.01):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if not 0 <= m < math.pi:
            raise ValueError(f"m must be in [0, pi), got {m}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.s, self.m, self.alpha = float(s), float(m), float(alpha)
        self.t = nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, alpha={self.alpha}, t={float(self.t):.4f}"

    def _threshold(self, cos_t: torch.Tensor, has: torch.Tensor, ctx) -> torch.Tensor:
        """The hard-negative threshold T(cos θ_y) [B] float64 of every sample, from the
        target cosines on this shard ([B], any value where ``has`` is False), after moving t
        (once per step). One all-reduce of the B target values and their margined form
        (non-zero on the owner rank only) gives every rank the same thresholds and t."""
        c = cos_t.detach().double()
        mine = torch.stack([torch.where(has, c, 0.0), torch.where(has, arc_margin(c, self.m), 0.0)])
        both = ctx.sum(mine)
        if self._due(ctx):
            with torch.no_grad():
                self.t.copy_(self.alpha * both[0].mean() + (1 - self.alpha) * self.t)
        return both[1]

    def margin_logits(self, scores, target, ctx):
        rows, cols = target_positions(target)
        cos_t = scores[rows, cols]
        local = scores.new_zeros(scores.shape[0]).index_put((rows,), cos_t.detach())
        threshold = self._threshold(local, target >= 0, ctx).to(scores.dtype)[:, None]
        t = float(self.t)
        z = torch.where(scores > threshold, scores * (t + scores), scores)
        return z.index_put((rows, cols), arc_margin(cos_t, self.m)), self.s

    def fused_margin(self) -> FusedMargin:
        return FusedMargin(s=self.s, m2=self.m)

    def fused_step(self, ctx, dtype):
        if ctx.target_score is None:
            raise RuntimeError("CurricularFace's fused form needs the target scores: call it from a head")
        threshold = self._threshold(ctx.target_score, ctx.has_target, ctx).to(dtype).contiguous()
        return FusedMargin(s=self.s, m2=self.m, hard_threshold=threshold, t=float(self.t))


class ElasticFace(LogitTransform):
    normalize = True

    def __init__(self, s: float = 64.0, m: float = 0.5, sigma: float = 0.05,
                 kind: Literal["arc", "cos"] = "arc", seed: int = 0):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if m < 0:
            raise ValueError(f"m must be >= 0, got {m}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if kind not in ("arc", "cos"):
            raise ValueError(f"kind must be arc or cos, got {kind!r}")
        self.s, self.m, self.sigma, self.kind, self.seed = float(s), float(m), float(sigma), kind, int(seed)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, sigma={self.sigma}, kind={self.kind}"

    def margins(self, step: int, batch: int) -> torch.Tensor:
        """The step's margin of each of the global batch's samples (float64 [batch])."""
        return torch.from_numpy(rng(self.seed, Stream.ELASTIC_MARGIN, step).normal(self.m, self.sigma, batch))

    def margin_logits(self, scores, target, ctx):
        rows, cols = target_positions(target)
        m = self.margins(ctx.step, scores.shape[0]).to(scores.device, scores.dtype)[rows]
        cos_t = scores[rows, cols]
        new = arc_margin(cos_t, m) if self.kind == "arc" else cos_t - m
        return scores.index_put((rows, cols), new), self.s

    def fused_margin(self) -> FusedMargin:
        return FusedMargin(s=self.s)

    def fused_step(self, ctx, dtype):
        m = self.margins(ctx.step, ctx.has_target.numel()).to(ctx.has_target.device, dtype)
        one, zero = torch.ones_like(m), torch.zeros_like(m)
        return FusedMargin(s=self.s, margin=torch.stack([one, m, zero] if self.kind == "arc" else [one, zero, m], 1))


def adaface(s: float = 64.0, m: float = 0.4, h: float = 0.333, alpha: float = 0.01) -> AdaFace:
    return AdaFace(s=s, m=m, h=h, alpha=alpha)


def magface(s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
            lambda_g: float = 35.0) -> MagFace:
    return MagFace(s=s, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m, lambda_g=lambda_g)


def curricularface(s: float = 64.0, m: float = 0.5, alpha: float = 0.01) -> CurricularFace:
    return CurricularFace(s=s, m=m, alpha=alpha)


def elasticface(s: float = 64.0, m: float = 0.5, sigma: float = 0.05, kind: Literal["arc", "cos"] = "arc",
                seed: int = 0) -> ElasticFace:
    """ElasticFace-Arc (m = 0.5) or, with kind: cos, ElasticFace-Cos (the paper's m = 0.35)."""
    return ElasticFace(s=s, m=m, sigma=sigma, kind=kind, seed=seed)


__all__ = ["AdaFace", "CurricularFace", "ElasticFace", "MagFace", "adaface", "curricularface", "elasticface",
           "magface"]
