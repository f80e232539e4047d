"""Counts of unusable data and the ``max_bad_fraction`` limit, shared by the shard streams.

A stream skips bad samples and damaged shards and counts them by kind (its ``stats()``);
:class:`BadDataLimit` stops it with a :class:`ShardError` once too large a fraction of
what it has seen is unusable, so a silently corrupt data set cannot train on leftovers.
"""
from __future__ import annotations

from dataclasses import dataclass

from dpface.data.formats.shards import ShardError

SAMPLE_KINDS = ("bad_image", "missing_image", "missing_label", "bad_label")
SHARD_KINDS = ("truncated_shards", "empty_shards", "unreadable_shards")


@dataclass(frozen=True)
class BadDataLimit:
    """Fail when more than ``max_fraction`` of the samples seen are bad, once at least
    ``min_samples`` were seen (a few bad samples at the start say little)."""

    max_fraction: float = 0.01
    min_samples: int = 200

    def __post_init__(self):
        if not 0 <= self.max_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_fraction}")

    def check(self, bad: int, seen: int, scope: str, counts: dict, last: str = "") -> None:
        """``scope``: what was seen (e.g. "by one slot"); ``last``: the latest bad item."""
        if seen >= self.min_samples and bad > self.max_fraction * seen:
            raise ShardError(
                f"too much bad data: {bad} of {seen} samples seen {scope} are unusable or lost "
                f"({counts}), above max_bad_fraction={self.max_fraction}" + (f"; last: {last}" if last else ""))


def with_totals(counts: dict, bad_samples, bad_shards) -> dict:
    """``counts`` plus ``bad_samples`` and ``bad_shards``: the sums of the named kinds."""
    out = dict(counts)
    out["bad_samples"] = sum(counts[k] for k in bad_samples)
    out["bad_shards"] = sum(counts[k] for k in bad_shards)
    return out
