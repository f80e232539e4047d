"""Hard-negative re-weighting: SV-Softmax (Wang et al. 2018) and MV-Softmax (Wang et
al. 2020), composable with any cosine margin (``base``).

A negative k of sample i is a support / mis-classified vector when its cos θ_k
exceeds the target's margin-adjusted cosine f(θ_y) (the base's unscaled target
logit, e.g. cos(θ_y + m) for ArcFace); its logit becomes s·(t·cos θ_k + t − 1), t ≥ 1,
the others stay as the base made them. The indicator is a constant (no gradient).

In the model-parallel head the target lives on one rank while the negatives are on
all; one all-reduce of N numbers (f(θ_y) of each sample, zero on the other ranks)
gives every rank the thresholds. This requires every sample's true class to be
scored on some rank, which the heads guarantee (positives are always kept).

``mv_softmax`` defaults to an ArcFace base (MV-Arc-Softmax), ``sv_softmax`` to a plain
NormFace base (SV-Softmax without a target margin); both accept any cosine ``base``.
"""
from __future__ import annotations

import torch

from dpface.losses.margin import CombinedMargin, LogitTransform, NormFace, target_positions


class MVSoftmax(LogitTransform):
    normalize = True

    def __init__(self, base: LogitTransform, t: float = 1.2):
        super().__init__()
        if not isinstance(base, LogitTransform):
            raise TypeError(f"mv_softmax: base must be a logit transform, got {type(base).__name__}")
        if not base.normalize:
            raise ValueError(f"mv_softmax needs a cosine base (normalised scores); "
                             f"{type(base).__name__} uses raw dot products")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 1:
            raise ValueError(f"mv_softmax: t must be a number >= 1, got {t!r}")
        self.base = base
        self.t = float(t)
        self.needs_norms = base.needs_norms

    def extra_repr(self) -> str:
        return f"t={self.t}"

    def bind_head(self, num_classes: int) -> None:
        self.base.bind_head(num_classes)

    def margin_logits(self, scores, target, ctx):
        z, scale = self.base.margin_logits(scores, target, ctx)
        rows, cols = target_positions(target)
        with torch.no_grad():
            thr = ctx.sum(z.new_zeros(z.shape[0]).index_put((rows,), z[rows, cols].detach()))
            hard = scores.detach() > thr[:, None]
            hard[rows, cols] = False
        return torch.where(hard, self.t * scores + (self.t - 1.0), z), scale

    @property
    def weighted(self) -> bool:
        return self.base.weighted

    def loss_weight(self, p):
        return self.base.loss_weight(p)


def mv_softmax(t: float = 1.2, base=None) -> MVSoftmax:
    """``base`` defaults to ArcFace(s=64, m=0.5)."""
    return MVSoftmax(CombinedMargin(s=64.0, m2=0.5) if base is None else base, t=t)


def sv_softmax(t: float = 1.2, base=None) -> MVSoftmax:
    """``base`` defaults to NormFace(s=64)."""
    return MVSoftmax(NormFace(s=64.0) if base is None else base, t=t)


__all__ = ["MVSoftmax", "mv_softmax", "sv_softmax"]
