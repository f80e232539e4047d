"""The class partition: which rank owns which classes, and resharding of class-sharded
state (head rows, centre-loss centres) to another world size.

Rank r of W owns the contiguous block ``class_range(C, W, r)``. State saved as one
block per rank is resharded by copying, for each new rank, only the overlapping rows
of each old block (:func:`gather_rows`); with memory-mapped blocks no rank reads the
pages of rows it does not own.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous class block [lo, hi). The first C % W ranks get one
    class more, so block sizes differ by at most one."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > num_classes:
        raise ValueError(f"world size {world_size} exceeds the number of classes {num_classes}: "
                         f"every rank must own at least one class")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    base, extra = divmod(num_classes, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def sample_count(num_local: int, sample_rate: float, num_positive: int = 0) -> int:
    """Rows a shard scores per step: max(#positives, ceil(r·C_local)), at most C_local.

    r·C_local is rounded to 6 decimals first: 0.3·10 is 3.0000000000000004 in floating
    point and must not become 4."""
    want = math.ceil(round(sample_rate * num_local, 6))
    return min(num_local, max(num_positive, want))


def check_cover(blocks: Iterable[tuple[int, int]], num_classes: int) -> None:
    """Raise ValueError unless the [lo, hi) blocks tile [0, num_classes) exactly."""
    covered = 0
    for lo, hi in sorted(blocks):
        if not lo < hi or lo != covered:
            raise ValueError(f"class blocks do not tile [0, {num_classes}): block [{lo}, {hi}) "
                             f"after classes up to {covered}")
        covered = hi
    if covered != num_classes:
        raise ValueError(f"classes [{covered}, {num_classes}) are in no block")


def gather_rows(blocks: Iterable[tuple[int, int, torch.Tensor]], class_start: int,
                class_end: int) -> torch.Tensor:
    """Rows [class_start, class_end) of a class-sharded tensor given as (lo, hi, rows)
    blocks (rows[i] is class lo + i). Only overlapping rows are read; the caller checks
    that the blocks tile the classes (:func:`check_cover`)."""
    blocks = list(blocks)
    t0 = blocks[0][2]
    out = torch.empty((class_end - class_start, *t0.shape[1:]), dtype=t0.dtype)
    for lo, hi, t in blocks:
        a, z = max(class_start, lo), min(class_end, hi)
        if a < z:
            out[a - class_start:z - class_start] = t[a - lo:z - lo]
    return out


__all__ = ["check_cover", "class_range", "gather_rows", "sample_count"]


def check_sample_rate(sample_rate) -> float:
    """The one owner of the sample-rate rule: a number in (0, 1]."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) \
            or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)
