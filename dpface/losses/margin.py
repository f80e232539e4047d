"""Margin logit transforms: softmax, NormFace, CosFace, ArcFace and combined margins.

A logit transform turns the head's scores for the classes it holds into logits. It
never sees the whole class matrix: the head hands it the scores of the rows it holds
(a shard of W, possibly a sample of it) and, per sample, the column of the true class
in those scores, or -1 when the true class lives on another rank. That is what lets
every transform run unchanged inside the model-parallel head.

Combined margin (Deng et al.): target logit s·(cos(m1·θ + m2) − m3), others s·cos θ.
(m1, m2, m3) = (1, 0.5, 0) is ArcFace, (1, 0, 0.35) CosFace, (1, 0, 0) NormFace.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# cos θ is clamped to [−1+ε, 1−ε] before acos/sqrt: d acos/dc = −1/sqrt(1−c²) is
# unbounded at ±1 and is what sends ArcFace losses to NaN in fp16 runs.
COS_EPS = 1e-7


class LogitTransform(nn.Module):
    """Base class. ``normalize`` tells the head whether to feed cosines (L2-normalised
    embeddings and centres) or raw dot products, and ``bias`` whether the class
    centres carry a bias term."""

    normalize: bool = True
    bias: bool = False

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        """Transformed target score, in the units of the scores (before scaling)."""
        return cos_t

    @property
    def scale(self) -> float:
        return 1.0

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """scores [B, K]; target [B] long: column of the true class, −1 if absent."""
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # fp32 logits whatever the autocast dtype
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        t = scores[rows, cols]
        logits = scores.index_put((rows, cols), self.target_logit(t))
        return logits * self.scale if self.scale != 1.0 else logits


class Softmax(LogitTransform):
    """Plain cross-entropy logits W_j·x + b_j."""

    normalize = False

    def __init__(self, bias: bool = False):
        super().__init__()
        self.bias = bias


class CombinedMargin(LogitTransform):
    """s·(cos(m1·θ + m2) − m3) on the target, s·cos θ elsewhere.

    Where m1·θ + m2 passes π the curve turns back up (a larger angle would get a
    larger logit), so past θ* = (π − m2)/m1 a monotone fallback is used: for m1 = 1
    ArcFace's cos θ − m2·sin(m2) − m3; for m1 > 1 cos θ shifted down to meet −1 − m3 at
    θ* (continuous). ``easy_margin`` applies the margin only where cos θ > 0.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 easy_margin: bool = False):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if m1 < 1:
            raise ValueError(f"m1 must be >= 1, got {m1}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {m2}")
        if m3 < 0:
            raise ValueError(f"m3 must be >= 0, got {m3}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.easy_margin = easy_margin
        self.theta_star = min(math.pi, (math.pi - self.m2) / self.m1)
        self.cos_theta_star = math.cos(self.theta_star)

    @property
    def scale(self) -> float:
        return self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, easy_margin={self.easy_margin}"

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_t - self.m3  # NormFace / CosFace: no angle needed
        c = cos_t.clamp(-1 + COS_EPS, 1 - COS_EPS)
        if self.m1 == 1.0:
            # cos(θ + m) = cos θ·cos m − sin θ·sin m, no acos.
            sin_t = torch.sqrt(1.0 - c * c)
            margin = c * math.cos(self.m2) - sin_t * math.sin(self.m2)
            fallback = c - self.m2 * math.sin(self.m2)
        else:
            margin = torch.cos(self.m1 * torch.acos(c) + self.m2)
            fallback = c - (self.cos_theta_star + 1.0)
        out = torch.where(c > self.cos_theta_star, margin, fallback) - self.m3
        if self.easy_margin:
            out = torch.where(c > 0, out, cos_t)
        return out


def normface(s: float = 30.0) -> CombinedMargin:
    return CombinedMargin(s=s, m1=1.0, m2=0.0, m3=0.0)


def cosface(s: float = 64.0, m: float = 0.35) -> CombinedMargin:
    return CombinedMargin(s=s, m1=1.0, m2=0.0, m3=m)


def arcface(s: float = 64.0, m: float = 0.5, easy_margin: bool = False) -> CombinedMargin:
    return CombinedMargin(s=s, m1=1.0, m2=m, m3=0.0, easy_margin=easy_margin)


def combined(s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
             easy_margin: bool = False) -> CombinedMargin:
    return CombinedMargin(s=s, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin)
