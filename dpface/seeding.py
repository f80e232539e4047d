"""Named random streams: every random draw in dpface comes from (seed, Stream tag,
*parts), so two consumers of one experiment seed never share a stream.

A stream's entropy is ``[seed, tag, *parts]``. Tags are unique (``@unique``), so
streams of different consumers differ in their second word whatever the parts; within
one consumer the parts say which draw it is (identity, epoch, slot, step ...). A tag
always takes the same number of parts: numpy's SeedSequence pads entropy with zeros,
so [s, T, k] and [s, T, k, 0] are the same stream. The values of the tags that
existed before this module are kept, so their data are unchanged.
"""
from __future__ import annotations

from enum import IntEnum, unique

import numpy as np


@unique
class Stream(IntEnum):
    SYNTH_IDENTITY = 1   # synthetic identity parameters: (identity,)
    SYNTH_SAMPLE = 2     # synthetic per-image nuisance: (identity, sample)
    SYNTH_NOISE = 3      # synthetic noise bank: ()
    SYNTH_PAIRS = 4      # synthetic verification pairs: (offset, ids, pairs, folds)
    SHARD_ORDER = 11     # WebDataset shard permutation: (epoch,)
    SHUFFLE = 12         # WebDataset shuffle buffer: (slot, round)
    AUGMENT = 13         # WebDataset augmentation: (slot, round)
    LOADER_ORDER = 21    # in-memory loader's sample permutation: (epoch,)
    DALI = 22            # DALI pipeline seed: (rank,)
    DATA_SOURCE = 23     # the stream seed of one of data.sources: (source index,)
    HEAD_INIT = 0x1417   # head row blocks: (block, dim)
    NEGATIVES = 0x1418   # head's sampled negative rows: (step, rank)
    PK_BATCH = 0x504B    # P×K sampler's identities of a batch: (index,)
    PK_IMAGES = 0x504C   # P×K sampler's images of one identity: (index, group)
    IJB_SET = 0x1B01     # synthetic IJB set's layout: (identity offset, identities)
    TEMPLATE_LEVEL = 0x7E01    # mixed-quality templates: an image's degradation level (identity, sample)
    TEMPLATE_DEGRADE = 0x7E02  # ... its degradation draw (identity, sample)
    TEMPLATE_LAYOUT = 0x7E03   # ... the templates' layout (offset, n, per identity, lo, hi)
    CLUSTER_POOL = 0xC101      # simulated embedding pools for clustering: (which,)
    CLUSTER_GCN = 0xC102       # GCN training: (purpose,)
    ELASTIC_MARGIN = 0xE1A5    # ElasticFace's per-sample margins of a step's global batch: (step,)


# A synthetic image is a pure function of (identity, sample index): each set renders from
# its own range of sample indices, so no two sets share an image, even on the same held-out
# identities. Training images are samples [0, counts[identity]) of the "train" range.
SAMPLE_RANGES: dict[str, tuple[int, int]] = {
    "train": (0, 1 << 30),
    "verification": (1 << 30, (1 << 30) + (1 << 24)),              # synthetic pairs
    "ijb": ((1 << 30) + (1 << 24), (1 << 30) + (1 << 25)),          # `convert synthetic-ijb`
    "templates": ((1 << 30) + (1 << 25), (1 << 30) + (3 << 24)),    # mixed-quality templates
    "identification": ((1 << 30) + (3 << 24), (1 << 30) + (1 << 26)),  # synthetic 1:N
}


def sample_index(kind: str, k: int) -> int:
    """The ``k``-th sample index of the ``kind`` range of :data:`SAMPLE_RANGES`."""
    lo, hi = SAMPLE_RANGES[kind]
    if not 0 <= k < hi - lo:
        raise ValueError(f"{kind} sample {k} is outside its range of {hi - lo} indices")
    return lo + k


def _entropy(seed: int, stream: Stream, parts) -> list[int]:
    return [int(seed), int(Stream(stream)), *map(int, parts)]


def rng(seed: int, stream: Stream, *parts: int) -> np.random.Generator:
    """A numpy Generator for stream ``stream`` of ``seed``."""
    return np.random.default_rng(_entropy(seed, stream, parts))


def seed_int(seed: int, stream: Stream, *parts: int) -> int:
    """A 64-bit integer seed (for random.Random, torch.Generator) for the same stream."""
    return int(np.random.SeedSequence(_entropy(seed, stream, parts)).generate_state(1, np.uint64)[0])


__all__ = ["SAMPLE_RANGES", "Stream", "rng", "sample_index", "seed_int"]
