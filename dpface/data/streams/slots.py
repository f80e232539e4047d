"""How the WebDataset stream splits its work: shards over virtual slots, the global batch
over slots, slots over ranks. Pure functions of their integer arguments.

A *virtual slot* is an independent sample stream; S slots serve every rank together.
The global batch G (batch_size × world_size) is split over them: slot s adds
floor((s+1)G/S) − floor(sG/S) samples to every global batch, and rank r owns the
contiguous block of S/world_size slots whose chunks make its batch.

Shard assignment. Let perm_e be the permutation of the N shards for epoch e (seeded by
``seed`` and e; identity without shuffling) and P = perm_0 ‖ perm_1 ‖ … their
concatenation. Slot s reads P[s], P[s+S], P[s+2S], …

* not resampled: round e is epoch e; slot s reads perm_e[s::S], so the S slots together
  read every shard exactly once (a slot may get none when N < S).
* resampled (training): slot s reads its part of P in *rounds* of ceil(N/S) shards, so
  every slot always has data (even with fewer shards than slots) and each data epoch's
  shards are spread over the slots.
"""
from __future__ import annotations

import math

import numpy as np

from dpface.seeding import Stream, rng


def epoch_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """perm_e: the shard order of data epoch ``epoch``."""
    if not shuffle:
        return np.arange(num_shards)
    return rng(seed, Stream.SHARD_ORDER, epoch).permutation(num_shards)


def slot_shards(num_shards: int, slots: int, slot: int, round_: int, *, seed: int,
                resampled: bool, shuffle: bool = True) -> list[int]:
    """Shard numbers slot ``slot`` of ``slots`` reads in round ``round_``."""
    n, s = num_shards, slots
    if not resampled:
        return [int(i) for i in epoch_order(n, seed, round_, shuffle)[slot::s]]
    per_round = math.ceil(n / s)
    out, perms = [], {}
    for i in range(round_ * per_round, (round_ + 1) * per_round):
        g = slot + s * i
        e = g // n
        if e not in perms:
            perms[e] = epoch_order(n, seed, e, shuffle)
        out.append(int(perms[e][g % n]))
    return out


def chunk_size(global_batch: int, slots: int, slot: int) -> int:
    """Samples slot ``slot`` adds to every global batch: the global batch split as evenly
    as possible over the slots; a rank's contiguous block of slots sums to batch_size."""
    return (slot + 1) * global_batch // slots - slot * global_batch // slots


def rank_slots(slots: int, world_size: int, rank: int) -> list[int]:
    """Rank ``rank``'s slots: a contiguous block of slots / world_size."""
    per = slots // world_size
    return list(range(rank * per, (rank + 1) * per))
