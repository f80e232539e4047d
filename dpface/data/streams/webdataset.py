"""Per-rank batch stream over WebDataset shards (CPU decode), resumable and deterministic.

The global batch (batch_size × world_size) is split over S *virtual slots*, independent
sample streams (default S = world_size × num_workers); each rank owns a contiguous block
of them, and the slots read the shards in rounds (data/streams/slots.py). Pipeline of one slot
(a DataLoader worker runs one or more of its rank's slots):

    its shards of the round (slots.py) ─► tar members and samples grouped by key
    (shards.ShardRead) ─► shuffle buffer (webdataset, seeded) ─► decode + label checks
    (decode.py) ─► augment (augment.py, seeded) ─► fixed-size chunks (transforms.collate)

* ``resampled=False``: one epoch per ``__iter__``; the S slots together read every
  shard exactly once (a slot may get none when there are fewer shards than slots, and
  ranks may get different batch counts: use it for evaluation and checks). The last
  batch of each worker may be short, so every sample is yielded exactly once.
* ``resampled=True`` (training): an infinite stream; every slot always has data and
  batches are always full (they may span rounds).

Determinism and resume. A slot's output is a pure function of (seed, slot, round):
the shuffle buffer and the augmentation draws are seeded per round, and the buffer
is drained at the end of each round. Every chunk carries its slot's position (round,
raw samples consumed in the round), so the position after the last yielded batch is a
small dict per slot (:meth:`WebDatasetStream.state_dict`, gathered from all ranks,
data/streams/position.py). Resuming re-reads the current round's tar bytes up to that position
without decoding them (augmentation draws are made per raw sample, good or bad, so they
stay aligned): the cost is at most one round, ≈ 1/S of the data set read sequentially
per worker. The global stream depends on seed, shard list, S and the global batch only,
so a resume at another world size continues it sample for sample when the global batch
is unchanged and the new world size divides S; anything else is refused with what differs.

Bad data (skipped and counted in :meth:`WebDatasetStream.stats`): undecodable JPEG,
missing image, missing or non-integer label, truncated tar (its readable samples are
kept), empty or unreadable shard. Above ``max_bad_fraction`` of the samples seen by a
slot (after ``bad_check_min_samples``) iteration fails (data/streams/bad_data.py); a label
outside [0, num_classes) fails at once, naming the sample. Counts travel with the
position; shards re-read while resuming are not counted twice.
"""
from __future__ import annotations

import copy
import itertools
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dpface.data.augment import N_DRAWS, apply_numpy, check_augment
from dpface.data.formats.shards import ShardError, ShardRead, TarFormatError, iter_tar_members, resolve_shards
from dpface.data.streams import slots
from dpface.data.streams.bad_data import SAMPLE_KINDS, SHARD_KINDS, BadDataLimit, with_totals
from dpface.data.streams.decode import BadSample, LabelError, decode_sample
from dpface.data.streams.map_stream import ignore_stop_signals, loader_generator, loader_iter
from dpface.data.streams.position import WDS_FORMAT as STATE_FORMAT
from dpface.data.streams.position import PositionError, merge_states, wds_resume, wds_state
from dpface.data.streams.protocol import batches_per_epoch, epochs
from dpface.data.transforms import collate
from dpface.seeding import Stream, rng, seed_int

# Re-exported: the stream's errors, and names its callers and tests have always imported here.
__all__ = ["LabelError", "PositionError", "STATE_FORMAT", "TarFormatError", "WebDatasetStream",
           "iter_tar_members", "merge_states", "shards_for"]


def _empty_stats() -> dict:
    return {"samples": 0, "lost_samples": 0, **{k: 0 for k in SAMPLE_KINDS + SHARD_KINDS}}


def _slot_position(round_: int, previous: dict | None = None) -> dict:
    """A slot at the start of round ``round_``; counts continue from ``previous``."""
    return {"round": round_, "raw": 0, "done": 0, "ended": False,
            "stats": dict(previous["stats"]) if previous else _empty_stats(),
            "intact": list(previous.get("intact", [0, 0])) if previous else [0, 0]}


class _Config:
    """Everything a worker needs; plain data so it pickles into DataLoader workers."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def shards_for(cfg: _Config, slot: int, round_: int) -> list[int]:
    """Shard numbers slot ``slot`` reads in round ``round_`` (data/streams/slots.py)."""
    return slots.slot_shards(len(cfg.tars), cfg.slots, slot, round_, seed=cfg.seed,
                             resampled=cfg.resampled, shuffle=cfg.shuffle_shards)


class _WorkerStream(IterableDataset):
    """The per-worker half of :class:`WebDatasetStream` (runs inside DataLoader workers):
    worker w runs the virtual slots ``groups[w]`` and yields one item per step holding
    each slot's chunk of the step and its position after it."""

    def __init__(self, cfg: _Config, groups: list[list[int]], positions: dict[int, dict]):
        super().__init__()
        self.cfg, self.groups, self.positions = cfg, groups, positions

    def _check(self, stats: dict, last: str) -> None:
        bad = sum(stats[k] for k in SAMPLE_KINDS) + stats["lost_samples"]
        self.cfg.limit.check(bad, bad + stats["samples"], "by one slot",
                             {k: stats[k] for k in SAMPLE_KINDS + SHARD_KINDS + ("lost_samples",)}, last)

    # -- raw samples ---------------------------------------------------------------
    def _shard_samples(self, shard: int, pos: dict, count: bool = True) -> Iterator[dict]:
        """Samples of one shard; a damaged shard is counted (when ``count``) with the
        samples it lost, not raised."""
        read = ShardRead(self.cfg.tars[shard], self.cfg.tar_reader)
        yield from read
        if not count:
            return
        if read.outcome == "intact":
            pos["intact"] = [pos["intact"][0] + 1, pos["intact"][1] + read.count]
            return
        # Lost: the manifest's count for the shard, or (without a manifest) the mean size
        # of the intact shards read so far (at least 1).
        stats, sizes = pos["stats"], self.cfg.shard_samples
        stats[f"{read.outcome}_shards"] += 1
        if sizes is not None:
            expected = sizes[shard]
        else:
            k, n = pos["intact"]
            expected = round(n / k) if k else 1
        stats["lost_samples"] += max(0, expected - read.count)
        self._check(stats, f"{read.outcome} shard {self.cfg.tars[shard]}")

    def _round_samples(self, slot: int, round_: int, pos: dict, progress: dict) -> Iterator[dict]:
        """The round's samples, shuffled. ``progress["done"]`` counts shards read to the
        end (their bad-shard counts made); the first ``progress["counted"]`` were
        counted before a resume and are not counted again."""
        from webdataset.filters import _shuffle

        def raw():
            for i, shard in enumerate(shards_for(self.cfg, slot, round_)):
                yield from self._shard_samples(shard, pos, count=i >= progress["counted"])
                progress["done"] = i + 1

        buf = self.cfg.shuffle_buffer
        if buf <= 1:
            return raw()
        shuffle_rng = random.Random(seed_int(self.cfg.seed, Stream.SHUFFLE, slot, round_))
        return _shuffle(raw(), bufsize=buf, initial=buf, rng=shuffle_rng)

    def _slot_samples(self, slot: int, pos: dict) -> Iterator[tuple]:
        """Good (image, label) samples of one virtual slot from position ``pos``, which
        is kept up to date: after each yield it is the position after that sample."""
        cfg = self.cfg
        skip = pos["raw"]
        barren = 0  # consecutive shards without any usable sample (guards an endless loop)
        while True:
            round_ = pos["round"]
            progress = {"done": 0, "counted": pos["done"]}
            aug_rng = rng(cfg.seed, Stream.AUGMENT, slot, round_)
            raw, got_any = 0, False
            for sample in self._round_samples(slot, round_, pos, progress):
                draws = aug_rng.random(N_DRAWS)  # drawn for every raw sample, even skipped ones
                raw += 1
                if raw <= skip:
                    continue
                pos["raw"], pos["done"] = raw, progress["done"]
                try:
                    img, label = decode_sample(sample, cfg.num_classes, cfg.image_size)
                except BadSample as bad:
                    pos["stats"][bad.kind] += 1
                    self._check(pos["stats"], f"sample {sample.get('__key__')!r} in {sample.get('__url__')}")
                    continue
                got_any = True
                pos["stats"]["samples"] += 1
                yield apply_numpy(img, draws, cfg.augment), label
            pos["raw"], pos["done"] = raw, progress["done"]
            if not cfg.resampled:
                pos["ended"] = True
                return
            skip = 0
            barren = 0 if got_any else barren + max(1, len(shards_for(cfg, slot, round_)))
            if barren > 2 * len(cfg.tars) + cfg.slots:
                last = ", ".join(str(cfg.tars[i]) for i in shards_for(cfg, slot, round_))
                raise ShardError(f"slot {slot} read {barren} shards in a row without one usable "
                                 f"sample, the last {last} (stats: {pos['stats']}); are the shards "
                                 "empty or corrupt?")
            pos.update(round=round_ + 1, raw=0, done=0)

    def __iter__(self):
        cfg = self.cfg
        info = get_worker_info()
        worker = info.id if info is not None else 0
        mine = self.groups[worker]
        pos = {v: copy.deepcopy(self.positions[v]) for v in mine}
        gens = {v: self._slot_samples(v, pos[v]) for v in mine if not pos[v].get("ended")}
        while True:
            chunks = {}
            for v in mine:
                size = slots.chunk_size(cfg.global_batch, cfg.slots, v)
                got = list(itertools.islice(gens[v], size)) if v in gens else []
                if len(got) < size:
                    gens.pop(v, None)  # only without resampling: the slot's epoch is over
                batch = collate([g[0] for g in got], [g[1] for g in got]) if got else None
                chunks[v] = (batch, copy.deepcopy(pos[v]))
            yield {"worker": worker, "chunks": chunks, "end": not gens}
            if not gens:
                return


class WebDatasetStream:
    """Resumable per-rank stream of (uint8 [B,3,H,W] RGB, int64 [B]) from WebDataset shards
    (a :class:`~dpface.data.streams.protocol.BatchStream`).

    Args:
        manifest_or_shards: manifest.json (or its directory), a tar path / brace pattern
            (``"d/shard-{000000..000009}.tar"``), or a list of tar paths.
        batch_size: per-rank batch size.
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: DataLoader worker processes (0: read in the calling process).
        seed: the stream is a pure function of the seed (and the other arguments).
        shuffle_buffer: samples held by each slot's shuffle buffer (0/1: no shuffle).
        augment: names in :data:`dpface.data.augment.AUGMENTS` ("flip", "crop", "color").
        image_size: output side; other sizes are resized (bilinear).
        resampled: True → infinite, always-full batches for training; False → one
            exact pass per ``__iter__`` (short last batches).
        max_bad_fraction: fail when more than this fraction of samples is unusable or
            lost with a damaged shard …
        bad_check_min_samples: … once a slot has seen at least this many samples.
        num_classes: required without a manifest; with one, may only enlarge it.
        shuffle_shards: permute the shard order per epoch (False: manifest order).
        prefetch_factor: batches prefetched per worker.
        tar_reader: "fast" (:func:`~dpface.data.shards.iter_tar_members`) or "webdataset"
            (the library's tarfile-based ``tar_file_iterator``); grouping and shuffling
            are webdataset's either way.
        virtual_slots: S, the number of independent sample streams the global batch is
            split over (default world_size × max(1, num_workers), at most the global
            batch). A resume adopts the saved S; it must be divisible by the new world size.
    """

    def __init__(self, manifest_or_shards, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 2000,
                 augment=("flip",), image_size: int = 112, resampled: bool = True,
                 max_bad_fraction: float = 0.01, bad_check_min_samples: int = 200,
                 num_classes: int | None = None, shuffle_shards: bool = True,
                 prefetch_factor: int = 4, tar_reader: str = "fast",
                 virtual_slots: int | None = None):
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                            ("num_workers", num_workers, 0), ("seed", seed, 0),
                            ("shuffle_buffer", shuffle_buffer, 0), ("image_size", image_size, 8),
                            ("bad_check_min_samples", bad_check_min_samples, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        augment = check_augment(augment)
        if tar_reader not in ("fast", "webdataset"):
            raise ValueError(f"tar_reader must be 'fast' or 'webdataset', got {tar_reader!r}")
        limit = BadDataLimit(float(max_bad_fraction), int(bad_check_min_samples))
        shards = resolve_shards(manifest_or_shards, num_classes)
        global_batch = int(batch_size) * int(world_size)
        if virtual_slots is None:
            virtual_slots = int(world_size) * min(max(1, int(num_workers)), int(batch_size))
        if not 1 <= virtual_slots <= global_batch or virtual_slots % world_size:
            raise ValueError(f"virtual_slots must be a multiple of world_size ({world_size}) in "
                             f"[1, global batch {global_batch}], got {virtual_slots}")
        self.cfg = _Config(
            tars=shards.tars, shard_samples=shards.samples_per_shard, num_classes=shards.num_classes,
            batch_size=int(batch_size), global_batch=global_batch, rank=int(rank),
            world_size=int(world_size), slots=int(virtual_slots), seed=int(seed),
            shuffle_buffer=int(shuffle_buffer), augment=augment, image_size=int(image_size),
            resampled=bool(resampled), limit=limit, shuffle_shards=bool(shuffle_shards),
            tar_reader=tar_reader)
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.num_classes = shards.num_classes
        self.num_images = shards.num_images
        self._positions: dict[int, dict] = {}
        self._reset_epoch(0)

    def _own(self) -> list[int]:
        """This rank's virtual slots (their chunks sum to batch_size)."""
        return slots.rank_slots(self.cfg.slots, self.cfg.world_size, self.cfg.rank)

    @property
    def batches_per_epoch(self) -> int | None:
        """Global data epoch in per-rank batches (num_images // global batch); None if unknown."""
        return batches_per_epoch(self.num_images, self.cfg.global_batch)

    @property
    def epoch(self) -> float:
        """Data epochs consumed, fractional (for logging)."""
        done = epochs(self._batches, self.batches_per_epoch)
        return done if self.cfg.resampled else self._epoch + done

    def _reset_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._batches = 0
        start_round = epoch if not self.cfg.resampled else 0
        # Counts are cumulative over epochs: each slot continues from its own.
        self._positions = {v: _slot_position(start_round, self._positions.get(v)) for v in self._own()}

    # -- the BatchStream protocol ----------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        own = self._own()
        nw = min(self.num_workers, len(own))
        groups = [own[w::max(1, nw)] for w in range(max(1, nw))]
        dataset = _WorkerStream(self.cfg, groups, {v: copy.deepcopy(self._positions[v]) for v in own})
        loader = DataLoader(dataset, batch_size=None, num_workers=nw,
                            prefetch_factor=self.prefetch_factor if nw else None,
                            worker_init_fn=ignore_stop_signals, persistent_workers=False,
                            generator=loader_generator(self.cfg.seed))
        with loader_iter(loader) as it:
            live = [w for w, g in enumerate(groups)
                    if not all(self._positions[v]["ended"] for v in g)]
            pending: dict[int, list] = {w: [] for w in range(len(groups))}
            while live:
                # One item per live worker per step, whatever order the loader delivers them in.
                for w in live:
                    while not pending[w]:
                        try:
                            item = next(it)
                        except StopIteration:
                            raise RuntimeError(f"data worker {w} stopped without finishing its "
                                               "stream") from None
                        pending[item["worker"]].append(item)
                items = [pending[w].pop(0) for w in live]
                chunks = sorted((v, c) for item in items for v, c in item["chunks"].items())
                for v, (_, pos) in chunks:
                    self._positions[v] = pos
                live = [w for w, item in zip(live, items) if not item["end"]]
                parts = [c[0] for _, c in chunks if c[0] is not None]
                if parts:
                    self._batches += 1
                    yield (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        self._reset_epoch(self._epoch + 1)  # only reached without resampling

    def state_dict(self) -> dict:
        """Position after the last yielded batch (plain data: JSON/torch.save friendly).

        Under a process group of this stream's world size it holds every rank's slots
        (one all-gather; every rank calls it when checkpointing), so any one rank's copy
        can resume the whole stream at another world size."""
        c = self.cfg
        return wds_state({v: self._positions[v] for v in self._own()}, world_size=c.world_size,
                         seed=c.seed, resampled=c.resampled, num_shards=len(c.tars),
                         global_batch=c.global_batch, slots=c.slots, epoch=self._epoch,
                         batches=self._batches)

    def load_state_dict(self, state: dict) -> None:
        c = self.cfg
        c.slots, self._positions = wds_resume(  # the saved split of the global batch wins
            state, seed=c.seed, resampled=c.resampled, num_shards=len(c.tars),
            global_batch=c.global_batch, world_size=c.world_size, rank=c.rank)
        self._epoch = int(state["epoch"])
        self._batches = int(state["batches"])

    def stats(self) -> dict:
        """Counts summed over this rank's slots (as of the last delivered batch)."""
        total = _empty_stats()
        for p in self._positions.values():
            for k, v in p["stats"].items():
                total[k] += v
        return with_totals(total, SAMPLE_KINDS, SHARD_KINDS)
