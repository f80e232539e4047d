"""The class matrix's rows: their initial values, a pure function of (seed, row), so every
world size starts from the same W."""
from __future__ import annotations

import torch

from dpface.seeding import Stream, seed_int

INIT_STD = 0.01
# Rows are initialised in fixed blocks, each from its own seed, so that row j's initial
# value depends only on (seed, j): a run at any world size starts from the same W, and
# no rank ever generates rows it does not own (beyond one block).
INIT_BLOCK = 4096


def init_rows(lo: int, hi: int, dim: int, seed: int = 0, std: float = INIT_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [lo, hi) of a normal(0, std) class matrix, identical whatever the sharding."""
    out = torch.empty(hi - lo, dim, dtype=dtype)
    for b in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1 if hi > lo else 0):
        g = torch.Generator().manual_seed(seed_int(seed, Stream.HEAD_INIT, b, dim))
        block = torch.randn(INIT_BLOCK, dim, generator=g, dtype=dtype).mul_(std)
        b0 = b * INIT_BLOCK
        a, z = max(lo, b0), min(hi, b0 + INIT_BLOCK)
        out[a - lo:z - lo] = block[a - b0:z - b0]
    return out


__all__ = ["init_rows", "INIT_STD", "INIT_BLOCK"]
