"""The ``head:`` config section; it checks itself and builds the head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dpface.distributed.partition import check_sample_rate
from dpface.heads.partial_fc import KERNELS, NEGATIVES, PRECISIONS, UPDATES, PartialFC
from dpface.losses import build_loss
from dpface.schema import Invalid, at_least, non_negative, positive, rule


@dataclass
class HeadConfig:
    embedding_size: int = positive(512)
    # Partial-FC share of each rank's negative classes kept per step, in (0, 1].
    sample_rate: float = 1.0
    # Which negatives fill the sample: uniform (Partial FC) or the highest-scoring ones
    # (DP-Softmax's dominant prototypes; scores every row of the shard, without grad).
    negatives: Literal[NEGATIVES] = "uniform"
    # Which W rows the optimizer moves: all (dense gradient; unsampled rows still get
    # momentum and weight decay) or only the step's sampled rows (original Partial FC's
    # lazy update, much cheaper at small sample_rate).
    update: Literal[UPDATES] = "dense"
    # Margin-softmax implementation: the compiled fused op (kernels/, never materialises
    # the [B, K] logits), chunked (the same with the GEMMs on cuBLAS/ATen and our own
    # epilogues), the PyTorch reference, or auto (fused where built and the loss is one the
    # op expresses; on CUDA the faster of fused and chunked, timed at start; the trainer's
    # start-up line says which).
    kernel: Literal[KERNELS] = "auto"
    # Head GEMM operands: fp32, or bf16 with fp32 accumulation (compiled ops only; softmax,
    # margin, parameters and optimizer state stay fp32).
    precision: Literal[PRECISIONS] = "fp32"
    # MiB of the step's logits the fused op may keep for backward; columns beyond it are
    # recomputed (one more GEMM over them) instead of stored.
    logits_budget_mb: int = non_negative(128)
    loss: dict = field(default_factory=lambda: {"name": "arcface", "s": 64.0, "m": 0.5})
    # Sub-centre ArcFace (noisy labels): K rows per class, a class's score is its best
    # sub-centre's; from step drop_after (0: never) samples whose label's closest
    # sub-centre is farther than drop_angle degrees are left out of the loss.
    subcenters: int = at_least(1, 1)
    drop_after: int = non_negative(0)
    drop_angle: float = rule(75.0, lambda v: 0 < v < 180, "in (0, 180) degrees")

    def validate(self) -> None:
        try:
            check_sample_rate(self.sample_rate)
        except ValueError:
            raise Invalid("sample_rate", f"must be in (0, 1], got {self.sample_rate!r}") from None

    def build(self, num_classes: int, group=None, seed: int = 0) -> PartialFC:
        """This rank's shard of the head over ``group`` (None: the world)."""
        return PartialFC(self.embedding_size, num_classes, build_loss(self.loss),
                         sample_rate=self.sample_rate, negatives=self.negatives, update=self.update,
                         kernel=self.kernel, precision=self.precision,
                         logits_budget_mb=self.logits_budget_mb, subcenters=self.subcenters,
                         drop_after=self.drop_after, drop_angle=self.drop_angle, seed=seed, group=group)
