"""Contrastive verification loss (DeepID2, Sun et al. 2014) over the pairs of a batch.

For every unordered pair (i, j) of the local batch, with d = ‖f_i − f_j‖:
½·d² if the labels are equal, ½·max(0, m − d)² otherwise; the loss is the mean over
all pairs (0 for a batch of one). The identification softmax is the head; this
loss's λ is its ``weight`` in the config. ``normalize`` (default False: DeepID2's raw
features) uses L2-normalised embeddings, where m is then a distance on the unit
sphere (≤ 2) — the natural choice next to a cosine head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIST_EPS = 1e-12  # clamp of d² before sqrt: a zero distance would give an infinite gradient


class ContrastiveLoss(nn.Module):
    def __init__(self, num_classes: int, embedding_size: int, margin: float = 1.0,
                 normalize: bool = False):
        super().__init__()
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin <= 0:
            raise ValueError(f"contrastive: margin must be a number > 0, got {margin!r}")
        self.margin, self.normalize = float(margin), bool(normalize)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize={self.normalize}"

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        x = F.normalize(emb, dim=1) if self.normalize else emb
        if x.shape[0] < 2:
            return x.new_zeros(())
        a, b = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
        d2 = (x[a] - x[b]).pow(2).sum(1)
        same = labels[a] == labels[b]
        d = d2.clamp_min(DIST_EPS).sqrt()
        per_pair = torch.where(same, 0.5 * d2, 0.5 * (self.margin - d).clamp_min(0.0).pow(2))
        return per_pair.mean()


__all__ = ["ContrastiveLoss"]
