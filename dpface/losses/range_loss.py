"""Range loss (Zhang et al. 2017) for long-tailed training data, on one mini-batch.

    L_R = α·L_intra + β·L_inter
    L_intra = Σ_{identities i in the batch} k_i / Σ_{j=1..k_i} 1/D_j^i
    L_inter = max(m − min_{Q≠R} ‖x̄_Q − x̄_R‖², 0)

D_j^i are identity i's k largest pairwise Euclidean distances between its own samples
in the batch ("ranges"); k_i / Σ 1/D_j is their harmonic mean, summed (not averaged)
over identities as in the paper. An identity with one sample contributes nothing; one
with fewer than k pairs uses the pairs it has (k_i = its pair count). x̄ is an
identity's batch mean; the inter term needs ≥ 2 identities in the batch, else it is 0.
The paper uses k = 2; its λ is this loss's ``weight`` in the config.

Computed on each rank's local batch (under DDP the backbone gradient is the average
of the ranks' range-loss gradients). An identity-balanced P×K batch sampler
(``dpface.data.streams.pk_sampler``) guarantees K samples per identity, which is what makes
the intra term see the tail identities at all.

``kernel``: auto (the compiled op where built), fused, or reference (PyTorch).

``normalize`` (default False, the paper's raw features) measures distances between
L2-normalised embeddings instead — the natural choice next to a cosine head, where
the norm carries no class information; the margin m is then in units of squared
distances on the unit sphere (≤ 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpface.ops import range_loss_terms


def _check_positive(name, v, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"range: {name} must be a number {'>= 0' if allow_zero else '> 0'}, got {v!r}")


class RangeLoss(nn.Module):
    def __init__(self, num_classes: int, embedding_size: int, k: int = 2, margin: float = 1.0,
                 alpha: float = 1.0, beta: float = 1.0, normalize: bool = False,
                 kernel: str = "auto"):
        super().__init__()
        if kernel not in ("auto", "fused", "reference"):
            raise ValueError(f"range: kernel must be auto, fused or reference, got {kernel!r}")
        self.kernel = kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"range: k must be an integer >= 1, got {k!r}")
        _check_positive("margin", margin, allow_zero=True)
        _check_positive("alpha", alpha, allow_zero=True)
        _check_positive("beta", beta, allow_zero=True)
        self.k, self.margin, self.alpha, self.beta = k, float(margin), float(alpha), float(beta)
        self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return (f"k={self.k}, margin={self.margin}, alpha={self.alpha}, beta={self.beta}, "
                f"normalize={self.normalize}")

    def terms(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_intra, L_inter) of one batch: the compiled op where built (``kernel``), else
        its PyTorch reference (``dpface.ops.reference.range_loss_terms_reference``)."""
        x = F.normalize(emb, dim=1) if self.normalize else emb
        return range_loss_terms(x, labels, self.k, self.margin, kernel=self.kernel)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        intra, inter = self.terms(emb, labels)
        return self.alpha * intra + self.beta * inter


__all__ = ["RangeLoss"]
