"""Single-process full classifier: the independent reference for PartialFC.

Deliberately naive — the whole W [C, D] and ``torch.nn.functional.cross_entropy`` on
the transformed logits — so that the distributed head is checked against code that
shares nothing with it but the logit transform and the row initialisation. A
per-sample weight (Knot-Magnify) is applied as w(p)·nll with p = exp(−nll) and plain
autograd, where PartialFC uses a closed-form gradient factor. Sub-centres: W is the
[C·K, D] matrix, the class cosine the max (``amax``) over each class's K columns; the
sample drop masks the per-sample cross-entropy and divides by the number kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpface import ops
from dpface.heads.dist_ce import compute_dtype, fused_context
from dpface.heads.partial_fc import HeadOutput
from dpface.heads.rows import init_rows
from dpface.heads.subcenters import check_subcenter_args
from dpface.losses.margin import HeadContext, LogitTransform


class FullFC(nn.Module):
    """``kernel="fused"`` runs the compiled op over the whole W instead (single process,
    no collectives); the default stays the naive reference, because that is what tests
    compare the distributed head and the kernels against."""

    def __init__(self, embedding_size: int, num_classes: int, transform: LogitTransform,
                 seed: int = 0, kernel: str = "reference", *, subcenters: int = 1,
                 drop_after: int = 0, drop_angle: float = 75.0):
        super().__init__()
        if kernel not in ("reference", "fused"):
            raise ValueError(f"FullFC kernel must be 'reference' or 'fused', got {kernel!r}")
        self.subcenters, self.drop_after, self.drop_angle = check_subcenter_args(
            transform, subcenters, drop_after, drop_angle)
        if kernel == "fused" and (subcenters > 1 or drop_after > 0):
            raise ValueError(f"kernel='fused' cannot run subcenters={subcenters}, drop_after={drop_after}: "
                             "the fused op scores one row per class and has no sample drop")
        if kernel == "fused" and transform.fused_margin() is None:
            raise ValueError(f"kernel=fused: {type(transform).__name__} is not expressible "
                             "by the fused op")
        self.kernel = kernel
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.transform = transform
        transform.bind_head(self.num_classes)
        # Same rows as PartialFC's shards with the same seed, at any world size.
        self.weight = nn.Parameter(init_rows(0, num_classes * self.subcenters, embedding_size, seed))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if transform.bias else None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0) -> HeadOutput:
        if labels.is_floating_point():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        labels = labels.long()
        if self.kernel == "fused":
            return self._forward_fused(embeddings, labels, step)
        dtype = compute_dtype(self.weight.dtype)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x, w = embeddings.to(dtype), self.weight.to(dtype)
            if self.transform.normalize:
                scores = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
            else:
                scores = x @ w.T
                if self.bias is not None:
                    scores = scores + self.bias.to(dtype)
            if self.subcenters > 1:
                scores = scores.view(len(x), self.num_classes, self.subcenters).amax(-1)
            # world_size 1: never a collective, even inside a distributed job.
            ctx = HeadContext(step=step, world_size=1)
            if self.transform.needs_norms:
                ctx.x_norm = x.norm(dim=1)
                ctx.w_norm = w.norm(dim=1) if self.subcenters == 1 else None
            logits = self.transform(scores, labels, ctx)
            dropping = self.drop_after > 0 and step >= self.drop_after
            if self.transform.weighted or dropping:
                nll = F.cross_entropy(logits, labels, reduction="none")
                if self.transform.weighted:
                    nll = self.transform.loss_weight(torch.exp(-nll)) * nll
                if dropping:
                    # angle to the closest sub-centre > drop_angle: out of the mean
                    t_cos = scores.detach().gather(1, labels[:, None]).squeeze(1)
                    keep = torch.rad2deg(torch.acos(t_cos.clamp(-1, 1))) <= self.drop_angle
                    loss = (nll * keep).sum() / keep.sum().clamp_min(1)
                else:
                    loss = nll.mean()
            else:
                loss = F.cross_entropy(logits, labels)
            reg = self.transform.regularizer(ctx)
            if reg is not None:
                loss = loss + reg
        with torch.no_grad():
            accuracy = (scores.argmax(1) == labels).to(logits.dtype).mean()
            dropped = (1 - keep.to(logits.dtype).mean()) if dropping else None
        return HeadOutput(loss=loss, accuracy=accuracy, num_sampled=self.num_classes * self.subcenters,
                          dropped=dropped)

    def _forward_fused(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> HeadOutput:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.to(self.weight.dtype)
            ctx = fused_context(self.transform, x, self.weight, None, labels, step=step)
            margin = self.transform.fused_step(ctx, compute_dtype(self.weight.dtype))
            if margin.normalize:
                x = F.normalize(x, dim=1)
            out = ops.margin_softmax(x.contiguous(), self.weight, None, labels, margin,
                                     bias=self.bias)
            nll = out.lse - out.target_logit
            if self.transform.weighted:
                loss = (self.transform.loss_weight(torch.exp(-nll)) * nll).mean()
            else:
                loss = nll.mean()
            reg = self.transform.regularizer(ctx)
            if reg is not None:
                loss = loss + reg
            accuracy = (out.target_score >= out.max_score).to(nll.dtype).mean()
        return HeadOutput(loss=loss, accuracy=accuracy, num_sampled=self.num_classes)


__all__ = ["FullFC"]
