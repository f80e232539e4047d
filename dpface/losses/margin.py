"""Margin logit transforms: softmax, NormFace, CosFace, ArcFace and combined margins.

A logit transform turns the head's scores for the classes it holds into logits. It
never sees the whole class matrix: the head hands it the scores of the rows it holds
(a shard of W, possibly a sample of it) and, per sample, the column of the true class
in those scores, or -1 when the true class lives on another rank. That is what lets
every transform run unchanged inside the model-parallel head.

Some transforms need more than the scores; the head passes a :class:`HeadContext`
(optional, so ``transform(scores, target)`` keeps working): the training step (λ
annealing of L-/A-Softmax), the process group with helpers that reduce across the
head's shards (AdaCos's B_avg, MV-Softmax's per-sample threshold, a learned scale's
gradient), and — for transforms with ``needs_norms`` — the embedding and row norms.
A transform may also weight each sample's cross-entropy by a function of its
true-class probability (:meth:`LogitTransform.loss_weight`, Knot-Magnify); both heads
apply it. The heads call :meth:`LogitTransform.bind_head` once with the total class
count (AdaCos's fixed scale depends on it).

Combined margin (Deng et al.): target logit s·(cos(m1·θ + m2) − m3), others s·cos θ.
(m1, m2, m3) = (1, 0.5, 0) is ArcFace, (1, 0, 0.35) CosFace, (1, 0, 0) NormFace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpface.distributed.collectives import all_reduce_max, all_reduce_sum
from dpface.ops import FusedMargin

# cos θ is clamped to [−1+ε, 1−ε] before acos/sqrt: d acos/dc = −1/sqrt(1−c²) is
# unbounded at ±1 and is what sends ArcFace losses to NaN in fp16 runs.
COS_EPS = 1e-7


@dataclass
class HeadContext:
    """What a head tells its transform beyond the scores.

    ``world_size`` is that of the head's class sharding, not of the process: a
    single-process head (FullFC) inside a distributed job passes 1, so its transform
    never enters a collective the other ranks do not join.
    """

    step: int = 0
    group: Any = None
    world_size: int = 1
    x_norm: torch.Tensor | None = None  # [B] ‖x_i‖ (with grad), when transform.needs_norms
    w_norm: torch.Tensor | None = None  # [K] ‖W_j‖ of the scored rows, when needs_norms
    # The fused path, for transforms with needs_target_score: [B] each sample's target score
    # on this shard (no grad; 0 where the class is elsewhere) and the mask of those here.
    target_score: torch.Tensor | None = None
    has_target: torch.Tensor | None = None

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the head's shards (no autograd)."""
        return all_reduce_sum(x, self.group) if self.world_size > 1 else x.detach()

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max over the head's shards (no autograd)."""
        return all_reduce_max(x, self.group) if self.world_size > 1 else x.detach()


class _SumGradOverShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the head's shards.

    A parameter replicated on every rank (a learned logit scale) gets, from each
    rank's backward, only the part of dL/dp that flows through that rank's columns;
    the sum is the full gradient, the same on every rank, so replicas stay equal
    under identical optimizer steps.
    """

    @staticmethod
    def forward(ctx, p, head_ctx):
        ctx.head_ctx = head_ctx
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad):
        return ctx.head_ctx.sum(grad.contiguous()), None


def replicated(p: torch.Tensor, ctx: "HeadContext") -> torch.Tensor:
    """Use a rank-replicated parameter inside a transform (see _SumGradOverShards)."""
    return _SumGradOverShards.apply(p, ctx) if ctx.world_size > 1 else p


def arc_margin(cos_t: torch.Tensor, m) -> torch.Tensor:
    """cos(θ + m) from cos θ (no acos), ``m`` a float or a tensor like ``cos_t``; past
    θ + m = π the curve turns back up, so there the monotone fallback cos θ − m·sin m
    (ArcFace's). ``cos_t`` is clamped away from ±1 first (COS_EPS)."""
    c = cos_t.clamp(-1 + COS_EPS, 1 - COS_EPS)
    # A negative margin (an ElasticFace draw) never passes π: no fallback (θ* capped at π).
    if isinstance(m, torch.Tensor):
        cos_m, sin_m, threshold = torch.cos(m), torch.sin(m), torch.cos(math.pi - m.clamp_min(0))
    else:
        cos_m, sin_m, threshold = math.cos(m), math.sin(m), math.cos(math.pi - max(m, 0.0))
    margined = c * cos_m - torch.sqrt(1.0 - c * c) * sin_m
    return torch.where(c > threshold, margined, c - m * sin_m)


def target_positions(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the samples whose true class is among these columns."""
    rows = (target >= 0).nonzero().squeeze(1)
    return rows, target[rows]


class LogitTransform(nn.Module):
    """Base class. ``normalize`` tells the head whether to feed cosines (L2-normalised
    embeddings and centres) or raw dot products, ``bias`` whether the class centres
    carry a bias term, ``needs_norms`` whether the context must carry ‖x‖ and ‖W_j‖.

    Subclasses override :meth:`target_logit` (+ ``scale``) for a margin on the target
    only, or :meth:`margin_logits` for anything else."""

    normalize: bool = True
    bias: bool = False
    needs_norms: bool = False
    needs_target_score: bool = False  # the fused path hands the context each target's score

    def bind_head(self, num_classes: int) -> None:
        """Called once by the head that owns this transform, with the total class count."""

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        """Transformed target score, in the units of the scores (before scaling)."""
        return cos_t

    @property
    def scale(self) -> float:
        return 1.0

    def margin_logits(self, scores: torch.Tensor, target: torch.Tensor, ctx: HeadContext):
        """(unscaled logits [B, K], scale): a float, or a tensor broadcastable to [B, K]."""
        rows, cols = target_positions(target)
        t = scores[rows, cols]
        return scores.index_put((rows, cols), self.target_logit(t)), self.scale

    def regularizer(self, ctx: HeadContext) -> torch.Tensor | None:
        """A term the heads add to the loss after the cross-entropy (MagFace's magnitude
        regulariser), computed from the context of the last forward; None: nothing."""
        return None

    def fused_margin(self) -> FusedMargin | None:
        """The fused op's parameters when it expresses this transform (a fixed combined
        margin, fixed-scale cosine or plain softmax; for per-sample margins, their fixed
        part); None: only the reference path does."""
        return None

    def fused_step(self, ctx: HeadContext, dtype: torch.dtype) -> FusedMargin:
        """This step's fused parameters, per-sample tensors (``dtype``, over the context's
        batch) included; called once per head forward on the fused path, where the
        reference path calls :meth:`margin_logits`."""
        return self.fused_margin()

    @property
    def weighted(self) -> bool:
        """Whether :meth:`loss_weight` weights the per-sample cross-entropy."""
        return False

    def loss_weight(self, p: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weight of the cross-entropy from the true-class probability p [B]
        (None: unweighted). Autograd through it defines the weight's gradient."""
        return None

    def forward(self, scores: torch.Tensor, target: torch.Tensor,
                ctx: HeadContext | None = None) -> torch.Tensor:
        """scores [B, K]; target [B] long: column of the true class, −1 if absent."""
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # fp32 logits whatever the autocast dtype
        z, scale = self.margin_logits(scores, target, ctx if ctx is not None else HeadContext())
        if isinstance(scale, (int, float)) and scale == 1.0:
            return z
        return z * scale


class Softmax(LogitTransform):
    """Plain cross-entropy logits W_j·x + b_j."""

    normalize = False

    def __init__(self, bias: bool = False):
        super().__init__()
        self.bias = bias

    def fused_margin(self) -> FusedMargin:
        return FusedMargin(s=1.0, normalize=False)


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

    def fused_margin(self) -> FusedMargin:
        return FusedMargin(self.s, self.m1, self.m2, self.m3, self.easy_margin)

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_t - self.m3  # NormFace / CosFace: no angle needed
        if self.m1 == 1.0:  # ArcFace's angle margin (its fallback past θ* = π − m2)
            out = arc_margin(cos_t, self.m2) - self.m3
        else:
            c = cos_t.clamp(-1 + COS_EPS, 1 - COS_EPS)
            margin = torch.cos(self.m1 * torch.acos(c) + self.m2)
            out = torch.where(c > self.cos_theta_star, margin, c - (self.cos_theta_star + 1.0)) - self.m3
        if self.easy_margin:
            out = torch.where(cos_t > 0, out, cos_t)
        return out


class NormFace(LogitTransform):
    """s·cos θ for every class (Wang et al., NormFace), s fixed or learned.

    A learned s is a parameter replicated on every rank (it is tiny); its gradient is
    summed over the head's shards in backward so that every replica takes the same
    step. It is stored in the head checkpoint as ``transform.s`` (a replicated,
    non-row parameter). It lives in the head's optimizer, so the head's weight decay
    applies to it too (a slow pull towards 0, negligible against its gradient).
    """

    def __init__(self, s: float = 30.0, learn_s: bool = False):
        super().__init__()
        if not s > 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        self.learn_s = bool(learn_s)
        if self.learn_s:
            self.s = nn.Parameter(torch.tensor(float(s)))
        else:
            self.s = float(s)

    def extra_repr(self) -> str:
        s = self.s.detach() if torch.is_tensor(self.s) else self.s
        return f"s={float(s):g}, learn_s={self.learn_s}"

    def fused_margin(self) -> FusedMargin | None:
        return None if self.learn_s else FusedMargin(s=self.s)  # a learned s needs its gradient

    def margin_logits(self, scores, target, ctx):
        if self.learn_s:
            return scores, replicated(self.s, ctx).to(scores.dtype)
        return scores, self.s


def normface(s: float = 30.0, learn_s: bool = False) -> NormFace:
    return NormFace(s=s, learn_s=learn_s)


def cosface(s: float = 64.0, m: float = 0.35) -> CombinedMargin:
    return CombinedMargin(s=s, m1=1.0, m2=0.0, m3=m)


def arcface(s: float = 64.0, m: float = 0.5, easy_margin: bool = False) -> CombinedMargin:
    return CombinedMargin(s=s, m1=1.0, m2=m, m3=0.0, easy_margin=easy_margin)


def combined(s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
             easy_margin: bool = False) -> CombinedMargin:
    return CombinedMargin(s=s, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin)
