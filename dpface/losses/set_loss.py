"""Set-to-set loss for a quality-aware backbone (after QAN, Liu, Yan & Ouyang, CVPR 2017).

On a P×K batch (``dpface.data.streams.pk_sampler``), each identity's images are cut, in batch
order, into sets of ``set_size`` (leftovers are dropped); each set is pooled with the
quality weights, ê_S = normalise(Σ_{i∈S} q_i·x̂_i / Σ_{i∈S} q_i) (``eval.sets.quality_pool``),
so the loss's gradient reaches the quality branch through the weights. Every set with
another set of its identity in the batch is an anchor:

- ``softmax`` (default; a multi-positive N-pair / supervised-contrastive loss over sets):
  ℓ_a = −log( Σ_{p∈P(a)} e^{s(cos(a,p) − m)} / (Σ_{p∈P(a)} e^{s(cos(a,p) − m)} + Σ_{n∈N(a)} e^{s·cos(a,n)}) );
- ``triplet``: ℓ_a = max(0, m + max_{n∈N(a)} cos(a,n) − min_{p∈P(a)} cos(a,p)) (hardest pair);

the loss is the mean over anchors. A batch where no identity fills two sets is an error
(a sampler problem, not a zero loss to train on silently). Local batch only: with a P×K
sampler ranks hold whole identities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpface.losses.pooling import check_quality, quality_pool

KINDS = ("softmax", "triplet")


def split_sets(labels: torch.Tensor, set_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows used [M], set id of each [M], label of each set [S]): every label's rows in batch
    order, cut into consecutive sets of ``set_size``; a label's last incomplete set is dropped."""
    rows, sid, slab = [], [], []
    labels_cpu = labels.detach().cpu()
    for lab in torch.unique(labels_cpu):  # sorted
        idx = torch.nonzero(labels_cpu == lab).flatten()
        for k in range(idx.numel() // set_size):
            rows.append(idx[k * set_size:(k + 1) * set_size])
            sid.append(torch.full((set_size,), len(slab), dtype=torch.long))
            slab.append(int(lab))
    if not rows:
        z = torch.zeros(0, dtype=torch.long)
        return z, z, z
    return torch.cat(rows), torch.cat(sid), torch.tensor(slab, dtype=torch.long)


class SetToSetLoss(nn.Module):
    needs_quality = True  # the trainer passes the backbone's quality scores (forward(x, with_quality=True))

    def __init__(self, num_classes: int, embedding_size: int, set_size: int = 2,
                 kind: str = "softmax", scale: float = 16.0, margin: float = 0.1):
        super().__init__()
        if isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 1:
            raise ValueError(f"qan_set: set_size must be an int >= 1, got {set_size!r}")
        if kind not in KINDS:
            raise ValueError(f"qan_set: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        for name, v, lo in (("scale", scale, 0.0), ("margin", margin, None)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float("-inf") < v < float("inf") \
                    or (lo is not None and v <= lo):
                raise ValueError(f"qan_set: {name} must be a finite number{' > 0' if lo is not None else ''}, "
                                 f"got {v!r}")
        self.set_size, self.kind = set_size, kind
        self.scale, self.margin = float(scale), float(margin)

    def extra_repr(self) -> str:
        return f"set_size={self.set_size}, kind={self.kind}, scale={self.scale}, margin={self.margin}"

    def set_embeddings(self, emb: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor):
        """(pooled normalised set embeddings [S, D], set labels [S])."""
        rows, sid, slab = split_sets(labels, self.set_size)
        rows, sid = rows.to(emb.device), sid.to(emb.device)
        if slab.numel() == 0 or torch.bincount(slab).max() < 2:
            raise ValueError(
                f"qan_set: no identity in the batch has 2 sets of {self.set_size} images; use a P×K "
                f"sampler with images_per_identity >= {2 * self.set_size} (got label counts "
                f"{torch.bincount(labels.detach().cpu().long()).max().item() if labels.numel() else 0} max)")
        return quality_pool(emb[rows], quality[rows], index=sid), slab.to(emb.device)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, step: int = 0,
                quality: torch.Tensor | None = None) -> torch.Tensor:
        if quality is None:
            raise ValueError("qan_set needs the backbone's quality scores (a qan backbone, "
                             "called with with_quality=True)")
        if emb.ndim != 2 or labels.shape != (emb.shape[0],):
            raise ValueError(f"qan_set: expected emb [B, D] and labels [B], got {tuple(emb.shape)} "
                             f"and {tuple(labels.shape)}")
        quality = check_quality(quality, emb.shape[0])
        with torch.autocast(device_type=emb.device.type, enabled=False):
            dt = torch.float64 if emb.dtype == torch.float64 else torch.float32  # fp64: for gradcheck
            e, slab = self.set_embeddings(emb.to(dt), labels.long(), quality.to(dt))
            cos = e @ e.T
            same = slab[:, None] == slab[None, :]
            eye = torch.eye(slab.numel(), dtype=torch.bool, device=e.device)
            pos, neg = same & ~eye, ~same
            anchors = pos.any(1)
            if self.kind == "softmax":
                logits = self.scale * (cos - self.margin * pos.to(cos.dtype))
                all_ = logits.masked_fill(eye, float("-inf"))
                num = logits.masked_fill(~pos, float("-inf"))
                loss = torch.logsumexp(all_, 1) - torch.logsumexp(num, 1)
            else:
                hard_pos = cos.masked_fill(~pos, float("inf")).amin(1)
                hard_neg = cos.masked_fill(~neg, float("-inf")).amax(1)
                # no negative in the batch (one identity): that anchor has no violation to count
                hard_neg = torch.where(neg.any(1), hard_neg, hard_pos - self.margin)
                loss = F.relu(self.margin + hard_neg - hard_pos)
            return loss[anchors].mean()


__all__ = ["SetToSetLoss", "split_sets"]
