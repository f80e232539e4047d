"""Single-process full classifier: the independent reference for PartialFC.

Deliberately naive — the whole W [C, D] and ``torch.nn.functional.cross_entropy`` on
the transformed logits — so that the distributed head is checked against code that
shares nothing with it but the logit transform and the row initialisation. A
per-sample weight (Knot-Magnify) is applied as w(p)·nll with p = exp(−nll) and plain
autograd, where PartialFC uses a closed-form gradient factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpface.heads.partial_fc import HeadOutput, compute_dtype, init_rows
from dpface.losses.margin import HeadContext, LogitTransform


class FullFC(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int, transform: LogitTransform,
                 seed: int = 0):
        super().__init__()
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.transform = transform
        transform.bind_head(self.num_classes)
        # Same rows as PartialFC's shards with the same seed, at any world size.
        self.weight = nn.Parameter(init_rows(0, num_classes, embedding_size, seed))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if transform.bias else None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0) -> HeadOutput:
        if labels.is_floating_point():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        labels = labels.long()
        dtype = compute_dtype(self.weight.dtype)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x, w = embeddings.to(dtype), self.weight.to(dtype)
            if self.transform.normalize:
                scores = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
            else:
                scores = x @ w.T
                if self.bias is not None:
                    scores = scores + self.bias.to(dtype)
            # world_size 1: never a collective, even inside a distributed job.
            ctx = HeadContext(step=step, world_size=1)
            if self.transform.needs_norms:
                ctx.x_norm, ctx.w_norm = x.norm(dim=1), w.norm(dim=1)
            logits = self.transform(scores, labels, ctx)
            if self.transform.weighted:
                nll = F.cross_entropy(logits, labels, reduction="none")
                loss = (self.transform.loss_weight(torch.exp(-nll)) * nll).mean()
            else:
                loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (scores.argmax(1) == labels).to(logits.dtype).mean()
        return HeadOutput(loss=loss, accuracy=accuracy, num_sampled=self.num_classes)


__all__ = ["FullFC"]
