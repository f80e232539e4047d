"""Triplet loss with online semi-hard mining (Schroff et al., FaceNet 2015).

Embeddings are L2-normalised; d(a, b) = ‖a − b‖². For every ordered anchor–positive
pair (a, p) of the batch (same label, a ≠ p), the negative is the *hardest semi-hard*
one: the n with the smallest d(a, n) among those with d(a, p) < d(a, n) < d(a, p) + α.
Pairs without a semi-hard negative are skipped (FaceNet's selection; no fallback to
hard negatives, which the paper found to collapse training early). The loss is the
mean of d(a, p) − d(a, n) + α over the selected triplets (all positive by
construction), 0 when none is found — a mean rather than FaceNet's sum so that the
weight does not depend on the batch size.

Mining uses the local batch only; use an identity-balanced P×K sampler so each batch
holds several images per identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """‖x_i − x_j‖² for unit rows, as 2 − 2·x_i·x_j clamped at 0 (no sqrt: smooth)."""
    return (2.0 - 2.0 * x @ x.T).clamp_min(0.0)


def mine_semihard(d: torch.Tensor, labels: torch.Tensor, margin: float):
    """(anchors, positives, negatives) index tensors of the selected triplets."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    a, p = (same & ~eye).nonzero(as_tuple=True)
    d_ap = d[a, p][:, None]
    d_an = d[a]  # [pairs, B]
    ok = ~same[a] & (d_an > d_ap) & (d_an < d_ap + margin)
    has = ok.any(1)
    n = torch.where(ok, d_an, torch.full_like(d_an, float("inf"))).argmin(1)
    return a[has], p[has], n[has]


class TripletLoss(nn.Module):
    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.2):
        super().__init__()
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin <= 0:
            raise ValueError(f"triplet: margin must be a number > 0, got {margin!r}")
        self.margin = float(margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        d = squared_distances(F.normalize(emb, dim=1))
        with torch.no_grad():
            a, p, n = mine_semihard(d.detach(), labels.long(), self.margin)
        if a.numel() == 0:
            return d.new_zeros(())
        return (d[a, p] - d[a, n] + self.margin).mean()


__all__ = ["TripletLoss", "mine_semihard", "squared_distances"]
