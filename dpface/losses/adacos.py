"""AdaCos (Zhang et al. 2019): cosine logits, no margin, an adaptive scale.

Fixed: s = √2·ln(C − 1), set when the head binds the transform to its class count.
Dynamic: each training forward first updates s from the current batch with the
previous scale, then uses it (as in the paper's algorithm):

    B_avg = (1/N)·Σ_i Σ_{k≠y_i} exp(s_{t−1}·cos θ_{i,k}),   θ_med = median_i θ_{i,y_i},
    s_t = ln(B_avg) / cos(min(π/4, θ_med)).

In the model-parallel head the negatives of a sample are spread over the shards, so
each rank sums its columns and one all-reduce of N + 2 numbers (the per-sample
target cosines, each non-zero on exactly one rank, the exp-sum and the scored-column
count) gives every rank the same global B_avg and median. With class sampling
(rate < 1) only the scored negatives are summed; the sum is scaled by
(C − 1)/(K − 1), K the scored columns over all ranks, an estimate of the full sum
(exact at rate 1). The median of an even count is the lower middle value of θ
(torch.median). ln(B_avg) is computed as s_{t−1} + ln Σ exp(s_{t−1}(cos − 1)) in
float64, which cannot overflow.

s gets no gradient. It is kept as a non-trainable parameter (``transform.s``) rather
than a buffer so the head checkpoint, which stores the head's replicated parameters,
carries it across a resume; optimizers skip it (its grad is always None).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dpface.losses.margin import LogitTransform, target_positions
from dpface.ops import FusedMargin


def fixed_scale(num_classes: int) -> float:
    return math.sqrt(2.0) * math.log(num_classes - 1)


class AdaCos(LogitTransform):
    normalize = True

    def __init__(self, dynamic: bool = False):
        super().__init__()
        self.dynamic = bool(dynamic)
        self.num_classes: int | None = None
        self.s = nn.Parameter(torch.tensor(float("nan")), requires_grad=False)

    def extra_repr(self) -> str:
        return f"dynamic={self.dynamic}, num_classes={self.num_classes}, s={float(self.s):.4f}"

    def bind_head(self, num_classes: int) -> None:
        if num_classes < 3:
            raise ValueError(f"AdaCos needs at least 3 classes (s = √2·ln(C − 1)), got {num_classes}")
        if self.num_classes != num_classes:
            self.num_classes = int(num_classes)
            with torch.no_grad():
                self.s.fill_(fixed_scale(num_classes))

    def _update(self, cos: torch.Tensor, target: torch.Tensor, ctx) -> None:
        s_prev = float(self.s)
        b, k = cos.shape
        rows, cols = target_positions(target)
        c = cos.detach().double()
        tgt = c.new_zeros(b).index_put((rows,), c[rows, cols])
        e = torch.exp(s_prev * (c - 1.0))
        neg = e.sum() - e[rows, cols].sum()
        stats = ctx.sum(torch.cat([tgt, torch.stack([neg, c.new_tensor(float(k))])]))
        tgt, neg, k_total = stats[:b], stats[b], stats[b + 1]
        neg = neg * (self.num_classes - 1) / (k_total - 1)
        ln_b_avg = s_prev + torch.log((neg / b).clamp_min(torch.finfo(torch.float64).tiny))
        theta_med = torch.acos(tgt.clamp(-1.0, 1.0)).median()
        s_new = ln_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4))
        self.s.fill_(float(s_new))

    def fused_margin(self):
        if self.dynamic or self.num_classes is None:
            return None  # the dynamic scale is updated from the batch's cosines
        return FusedMargin(s=float(self.s))

    def margin_logits(self, scores, target, ctx):
        if self.num_classes is None:
            raise RuntimeError("AdaCos needs the number of classes: build it into a head "
                               "(PartialFC / FullFC) or call bind_head(num_classes) first")
        if self.dynamic and self.training:
            with torch.no_grad():
                self._update(scores, target, ctx)
        return scores, float(self.s)


def adacos(dynamic: bool = False) -> AdaCos:
    return AdaCos(dynamic=dynamic)


__all__ = ["AdaCos", "adacos", "fixed_scale"]
