"""Center loss (Wen et al. 2016), with the class centres sharded like the head's W.

    L_C = ½·(1/B)·Σ_i ‖x_i − c_{y_i}‖²        (mean over the local batch, as Caffe's layer)
    Δc_j = Σ_i [y_i = j]·(c_j − x_i) / (1 + Σ_i [y_i = j]),   c_j ← c_j − α·Δc_j

The centres are not learned by SGD: after the loss is taken with the current centres,
each training forward applies the update rule under no_grad, over the *global* batch
(the same update a single process would make on the whole batch). The gradient of
L_C flows to the embeddings only.

At 10⁶ classes the centres are C×D like W, so rank r keeps only the centres of its
class range ``class_range(C, world, r)`` (the head's split), as a buffer saved with
the rank's aux-loss state. A step all-gathers the (detached) embeddings and labels
(B_global×D, the head gathers the same), each rank fills in the centres it owns for
the global batch and one all-reduce sum of [B_global, D] (zeros elsewhere) hands every
rank the centres of its own samples; each rank then updates its own centres. Nothing
of size C crosses ranks. A run resumed at another world size has other ranges: the
checkpoint code then hands :meth:`CenterLoss.load_sharded` every old rank's state and
each rank copies the rows of its new range, as for the head's W.
"""
from __future__ import annotations

import torch
from torch import nn

from dpface.distributed import get_rank, get_world_size
from dpface.distributed.collectives import all_gather, all_reduce_sum
from dpface.distributed.partition import check_cover, class_range, gather_rows


class CenterLoss(nn.Module):
    def __init__(self, num_classes: int, embedding_size: int, alpha: float = 0.5, group=None):
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"center: alpha (centre update rate) must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        # ``group``: the ranks sharding the centres (the head group; None: the world).
        self.group = group
        self.rank, self.world_size = get_rank(group), get_world_size(group)
        self.class_start, self.class_end = class_range(self.num_classes, self.world_size, self.rank)
        self.register_buffer("centers", torch.zeros(self.class_end - self.class_start,
                                                    self.embedding_size))
        self.register_buffer("shard_range", torch.tensor([self.class_start, self.class_end,
                                                          self.num_classes]))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, classes=[{self.class_start}, {self.class_end}) of "
                f"{self.num_classes}, rank={self.rank}/{self.world_size}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "shard_range")
        if saved is not None and saved.tolist() != self.shard_range.tolist():
            lo, hi, c = saved.tolist()
            raise ValueError(
                f"center loss state holds centres of classes [{lo}, {hi}) of {c}; this rank "
                f"owns [{self.class_start}, {self.class_end}) of {self.num_classes} ("
                + ("another data set)" if c != self.num_classes else
                   "another world size: load every rank's state with load_sharded)"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_sharded(self, states: list[dict]) -> None:
        """Take this rank's centres from the state dicts of all ranks of a run saved at
        any world size (only the overlapping rows of each are read)."""
        blocks = []
        for st in states:
            if "shard_range" not in st:
                raise ValueError("the checkpoint holds no center loss state (saved without it?)")
            lo, hi, c = st["shard_range"].tolist()
            if c != self.num_classes:
                raise ValueError(f"center loss state is for {c} classes, this run has "
                                 f"{self.num_classes} (another data set)")
            if st["centers"].shape != (hi - lo, self.embedding_size):
                raise ValueError(f"center loss state for classes [{lo}, {hi}) holds centres of "
                                 f"shape {list(st['centers'].shape)}, expected "
                                 f"{[hi - lo, self.embedding_size]}")
            blocks.append((lo, hi, st["centers"]))
        check_cover([(lo, hi) for lo, hi, _ in blocks], self.num_classes)
        with torch.no_grad():
            self.centers.copy_(gather_rows(blocks, self.class_start, self.class_end))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size:
            raise ValueError(f"center: embeddings must be [batch, {self.embedding_size}], got "
                             f"{list(emb.shape)}")
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"center: labels must be in [0, {self.num_classes})")
        b = emb.shape[0]
        with torch.no_grad():
            xg = all_gather(emb.detach().to(self.centers.dtype), self.group)
            yg = all_gather(labels, self.group)
            local = yg - self.class_start
            mine = (local >= 0) & (local < self.centers.shape[0])
            cg = self.centers.new_zeros(xg.shape)
            cg[mine] = self.centers[local[mine]]
            if self.world_size > 1:
                cg = all_reduce_sum(cg, self.group)
            c = cg[self.rank * b:(self.rank + 1) * b]
        loss = 0.5 * (emb - c.to(emb.dtype)).pow(2).sum(1).mean()
        if self.training:
            with torch.no_grad():
                self._update(xg[mine], local[mine])
        return loss

    def _update(self, x: torch.Tensor, local: torch.Tensor) -> None:
        """c_j ← c_j − α·Σ_i (c_j − x_i)/(1 + n_j) for this rank's classes in the batch."""
        n = torch.bincount(local, minlength=self.centers.shape[0]).to(self.centers.dtype)
        diff = self.centers.new_zeros(self.centers.shape).index_add_(0, local, self.centers[local] - x)
        self.centers.sub_(self.alpha * diff / (1.0 + n)[:, None])


__all__ = ["CenterLoss"]
