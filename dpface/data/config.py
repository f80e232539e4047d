"""The ``data:`` config section; it checks itself and builds the rank's batch stream."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dpface.data.augment import augment_problem
from dpface.data.streams.registry import STREAMS
from dpface.schema import ConfigError, Invalid, at_least, in_unit, non_negative, positive, rule


@dataclass
class SyntheticDataConfig:
    num_identities: int = at_least(200, 2)
    max_images: int = 60
    min_images: int = at_least(4, 1)
    exponent: float = 1.0
    difficulty: float = non_negative(1.0)
    seed: int = 0


@dataclass
class ShardsConfig:
    """The shard backends' data set (webdataset and dali read the same shards)."""
    manifest: str = ""  # manifest.json of a converted data set (see `dpface convert`)
    shuffle_buffer: int = non_negative(2000)
    max_bad_fraction: float = in_unit(0.01, open_low=False)


# data.webdataset (before the shard backends shared one section) → where each key went.
_MOVED = {"shards": "data.shards.manifest", "shuffle_buffer": "data.shards.shuffle_buffer",
          "max_bad_fraction": "data.shards.max_bad_fraction", "augment": "data.augment"}
BACKENDS = tuple(STREAMS.names())


@dataclass
class DataConfig:
    backend: Literal[BACKENDS] = "synthetic"  # an entry of data/streams/registry.py's STREAMS
    batch_size: int = positive(64)  # per rank
    # instance: shuffled images; pk: P identities × K images per batch (batch_size = P·K),
    # for range/triplet/contrastive losses that need several images per identity.
    sampler: Literal["instance", "pk"] = "instance"
    pk_images: int = at_least(4, 1)  # K of the P×K sampler
    num_workers: int = non_negative(2)
    image_size: int = rule(112, lambda v: v >= 16 and v % 16 == 0, "a multiple of 16, >= 16")
    augment: list = field(default_factory=lambda: ["flip"])  # shard backends: names in data/augment.py
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    # Several data sets at once (webdataset, dali): [{manifest: A, weight: 0.7}, {manifest:
    # B, weight: 0.3}], in place of shards.manifest; labels concatenated in this order, each
    # batch split by weight (streams/mixed.py). The other shards keys apply to every source.
    sources: list = field(default_factory=list)
    # The old name of `shards`, kept only so a config that still uses it (an old recipe,
    # a checkpoint's config) is told where its keys went; it must stay empty.
    webdataset: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.webdataset:
            moves = ", ".join(f"data.webdataset.{k} → {_MOVED.get(k, '(no longer a key)')}"
                              for k in self.webdataset)
            raise Invalid("webdataset", f"is no longer a section: the shard backends share "
                                        f"'data.shards' ({moves}); rename the keys in the config")
        self._check_sources()
        problem = augment_problem(self.augment)
        if problem:
            raise Invalid("augment", problem)
        if self.sampler == "pk":
            if self.backend != "synthetic":
                raise Invalid("sampler", f"pk needs an indexable data set (data.backend: synthetic), "
                                         f"not '{self.backend}'")
            if self.batch_size % self.pk_images:
                raise Invalid("batch_size", f"({self.batch_size}) must be a multiple of "
                                            f"'data.pk_images' ({self.pk_images}) with data.sampler: pk")

    def _check_sources(self) -> None:
        if not self.sources:
            return
        if self.backend not in ("webdataset", "dali"):
            raise Invalid("sources", f"mix shard data sets (data.backend: webdataset or dali), not '{self.backend}'")
        if self.shards.manifest:
            raise Invalid("sources", "replace data.shards.manifest: set one of them")
        for i, s in enumerate(self.sources):
            if not isinstance(s, dict) or set(s) - {"manifest", "weight"} or not isinstance(s.get("manifest"), str):
                raise Invalid(f"sources[{i}]", f"must be {{manifest: PATH, weight: NUMBER}}, got {s!r}")
            w = s.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise Invalid(f"sources[{i}].weight", f"must be a number >= 0, got {w!r}")
            s.setdefault("weight", 1.0)
        if not sum(s["weight"] for s in self.sources) > 0:
            raise Invalid("sources", "weights must sum to a positive number")

    def check_shards_set(self) -> None:
        # At build, not at load: `dpface eval` uses a shard backend without shards to
        # mean "no synthetic set, only --bin sets".
        if self.backend == "synthetic":
            return
        from dpface.data.formats.shards import is_manifest

        if self.sources:
            for i, s in enumerate(self.sources):
                if not is_manifest(s["manifest"]):
                    raise ConfigError(f"'data.sources[{i}].manifest' is {s['manifest']!r}: name the manifest.json "
                                      "(or its directory) that `dpface convert` writes")
            return
        shards = self.shards.manifest
        if not shards:
            raise ConfigError(f"'data.shards.manifest' must name the manifest.json of a converted "
                              f"data set with data.backend: {self.backend} (see `dpface convert`)")
        if not is_manifest(shards):  # the head's size, the class count, is only in the manifest
            raise ConfigError(f"'data.shards.manifest' is {shards!r}, tar files without a manifest: "
                              "name the manifest.json (or its directory) that `dpface convert` writes "
                              "next to the shards")

    def num_classes(self) -> int:
        """The classifier's size this section gives, without building a stream: the synthetic
        identities, the manifest's classes, or the total of data.sources."""
        if self.backend == "synthetic":
            return self.synthetic.num_identities
        self.check_shards_set()
        from dpface.data.formats.shards import resolve_shards

        return sum(resolve_shards(m).num_classes
                   for m in ([s["manifest"] for s in self.sources] or [self.shards.manifest]))

    def build(self, ctx, seed: int):
        """This rank's batch stream (``ctx``: a ParallelContext; the data group splits it)."""
        self.check_shards_set()
        return STREAMS.get(self.backend)(self, ctx, seed)

