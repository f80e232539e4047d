"""Knowledge distillation from a trained teacher network (``aux_losses: [{name: distill,
teacher: PATH, kind: cosine | l2 | relation, weight: …}]``).

The teacher (any backbone, its own embedding size; the trainer loads it from ``teacher``
and hands it in as ``teacher_module``) runs on the same batch under ``no_grad`` in eval mode,
in the trainer's precision; its weights never change. With student embeddings s_i and
teacher embeddings t_i over the rank's batch of B:

* ``cosine``:   mean_i 1 − cos(P s_i, t_i)
* ``l2``:       mean_i ‖P s_i − t_i‖² / D_t          (the raw features, per dimension)
* ``relation``: mean_{i≠j} (cos(s_i, s_j) − cos(t_i, t_j))²   (the in-batch similarity
  structure; no projection, any dimensions)

P is a learned linear map D_s → D_t where the dimensions differ (starting orthogonal),
and with ``projection: always`` also where they agree (starting as the identity); else the
identity (RESULTS "Starting from what exists" measures the settings). The trainer
optimises P with the head's learning rate and averages its gradient over ranks.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("cosine", "l2", "relation")


class DistillLoss(nn.Module):
    needs_images = True  # called with the (normalised) images the student saw

    def __init__(self, num_classes: int, embedding_size: int, teacher: str,
                 kind: Literal["cosine", "l2", "relation"] = "cosine", projection: Literal["auto", "always"] = "auto",
                 teacher_module: nn.Module | None = None, teacher_embedding_size: int = 0,
                 amp_dtype: torch.dtype | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if projection not in ("auto", "always"):
            raise ValueError(f"projection must be auto or always, got {projection!r}")
        if teacher_module is None:
            raise ValueError("distill needs the teacher network (the trainer loads it from 'teacher')")
        self.kind, self.teacher_path, self.amp_dtype = kind, teacher, amp_dtype
        # Not a registered submodule: the teacher is neither trained nor checkpointed.
        self._teacher = [teacher_module.eval().requires_grad_(False)]
        self.teacher_embedding_size = int(teacher_embedding_size or embedding_size)
        differ = self.teacher_embedding_size != embedding_size
        self.proj = (nn.Linear(embedding_size, self.teacher_embedding_size, bias=False)
                     if kind != "relation" and (differ or projection == "always") else None)
        if self.proj is not None:  # starts as the identity where it can, else an orthogonal map
            init = nn.init.orthogonal_ if differ else nn.init.eye_
            init(self.proj.weight)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def teacher_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        t = self.teacher  # in eval mode since __init__; not a submodule, so train() never reaches it
        with torch.no_grad(), torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32,
                                             enabled=self.amp_dtype is not None):
            return t(images).float()

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, step: int = 0, *,
                images: torch.Tensor) -> torch.Tensor:
        t = self.teacher_embeddings(images).to(emb.dtype)
        if self.kind == "relation":
            s_n, t_n = F.normalize(emb, dim=1), F.normalize(t, dim=1)
            b = emb.shape[0]
            off = ~torch.eye(b, dtype=torch.bool, device=emb.device)
            return ((s_n @ s_n.T - t_n @ t_n.T)[off] ** 2).mean() if b > 1 else emb.sum() * 0
        s = emb if self.proj is None else self.proj(emb)
        if self.kind == "cosine":
            return (1 - F.cosine_similarity(s, t, dim=1)).mean()
        return ((s - t) ** 2).sum(1).mean() / t.shape[1]


__all__ = ["DistillLoss", "KINDS"]
