"""Identity-balanced P×K batches for map-style datasets.

Each global batch draws P·world distinct identities uniformly (without replacement)
from those that have images, and K images of each: without replacement when the
identity has at least K, otherwise all of its images plus random repeats (a tail
identity with 2 images still fills its K slots, so every batch has exactly P·K
samples per rank). Rank r takes identities [r·P, (r+1)·P) of the draw, so ranks never
share an identity in a step and the per-rank embedding losses (range, triplet)
see whole identities.

Sampling identities uniformly is itself a long-tail remedy: a tail identity is
drawn as often as a head identity, so its images are revisited far more often than
under instance sampling. Compare losses under the same sampler.

Batch k is a pure function of (seed, k) — ``rng(seed, Stream.PK_BATCH, k)`` — like the
lead's ``_BatchIndices``: a run resumed at batch k (``start``) sees exactly the
batches it would have seen, and every rank computes the same draw without talking.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from dpface.data.streams.map_stream import MapStream
from dpface.seeding import Stream
from dpface.seeding import rng as stream_rng


class PKBatchSampler:
    """Infinite batch sampler for one rank: lists of P·K dataset indices, identity-major
    (K consecutive indices per identity)."""

    def __init__(self, labels, identities_per_batch: int, images_per_identity: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} "
                             f"{list(labels.shape)}")
        for name, v, lo in (("identities_per_batch", identities_per_batch, 1),
                            ("images_per_identity", images_per_identity, 1),
                            ("world_size", world_size, 1), ("rank", rank, 0),
                            ("start", start, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.p, self.k = int(identities_per_batch), int(images_per_identity)
        self.rank, self.world, self.seed, self.start = int(rank), int(world_size), int(seed), int(start)
        order = np.argsort(labels, kind="stable")
        ids, first, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self._order, self._first, self._counts, self.identities = order, first, counts, ids
        need = self.p * self.world
        if ids.size < need:
            raise ValueError(
                f"a P×K batch needs {need} distinct identities per step ({self.p} per rank × "
                f"{self.world} ranks) but the dataset has {ids.size}")

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def batch(self, index: int) -> list[int]:
        """This rank's indices of global batch ``index``."""
        rng = stream_rng(self.seed, Stream.PK_BATCH, index)
        chosen = rng.choice(self.identities.size, self.p * self.world, replace=False)
        out = []
        for g in chosen[self.rank * self.p:(self.rank + 1) * self.p]:
            n, f = int(self._counts[g]), int(self._first[g])
            # One generator per (batch, identity): a rank draws only its own identities'
            # images, yet the result does not depend on the world size.
            irng = stream_rng(self.seed, Stream.PK_IMAGES, index, g)
            if n >= self.k:
                pick = irng.choice(n, self.k, replace=False)
            else:
                pick = np.concatenate([irng.permutation(n), irng.integers(0, n, self.k - n)])
            out.extend(self._order[f + pick].tolist())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


class PKMapStream(MapStream):
    """:class:`MapStream` with P×K batches (batch_size = P·K per rank); same resume
    state (batches consumed). ``epoch`` counts dataset-sized passes of images drawn."""

    def __init__(self, dataset, identities_per_batch: int, images_per_identity: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0,
                 num_classes: int | None = None):
        super().__init__(dataset, identities_per_batch * images_per_identity, rank, world_size,
                         seed=seed, num_workers=num_workers, num_classes=num_classes)
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise ValueError("a P×K stream needs dataset.labels (the label of every index)")
        self.labels = np.asarray(labels)
        self.identities_per_batch, self.images_per_identity = identities_per_batch, images_per_identity
        PKBatchSampler(self.labels, identities_per_batch, images_per_identity, rank, world_size,
                       seed)  # validate now, not in the first step

    def _sampler(self):
        return PKBatchSampler(self.labels, self.identities_per_batch, self.images_per_identity,
                              self.rank, self.world_size, self.seed, self._consumed)


__all__ = ["PKBatchSampler", "PKMapStream"]
