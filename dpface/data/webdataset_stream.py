"""Per-rank batch stream over WebDataset shards (CPU decode), resumable and deterministic.

Pipeline in each DataLoader worker ("slot" s = rank × num_workers + worker, S slots):

    shard list ─► explicit node/worker split (slot s of S) ─► tar members (a lean
    ustar parser, or webdataset's tarfile iterator) ─► group by key (webdataset)
    ─► shuffle buffer (webdataset, seeded) ─► decode (Pillow's libjpeg) + checks
    ─► augment (numpy, seeded) ─► fixed-size batches (uint8 [B,3,H,W], int64 [B])

Shard assignment. Let perm_e be the permutation of the N shards for epoch e (seeded by
``seed`` and e; identity if ``shuffle_shards=False``) and G = perm_0 ‖ perm_1 ‖ … their
concatenation. Slot s reads G[s], G[s+S], G[s+2S], …

* ``resampled=False``: one epoch per ``__iter__``; slot s reads perm_e[s::S], so the
  S slots together read every shard exactly once (a slot may get none when N < S, and
  ranks may get different batch counts: use it for evaluation and checks). The last
  batch of each worker may be short, so every sample is yielded exactly once.
* ``resampled=True`` (training): an infinite stream; slot s reads its part of G in
  *rounds* of ceil(N/S) shards. Every slot always has data (even with fewer shards
  than slots), each data epoch's shards are spread over the slots, and batches are
  always full (they may span rounds).

Determinism and resume. A worker's output is a pure function of (seed, slot, round):
the shuffle buffer and the augmentation draws are seeded per round, and the buffer
is drained at the end of each round. Every batch carries its worker's position
(round, raw samples consumed in the round) and the main process hands out workers'
batches in a fixed cyclic order, so the position after the last yielded batch is a
small dict (:meth:`state_dict`). Resuming re-reads the current round's tar bytes up to
that position without decoding them (augmentation draws are made per raw sample, good
or bad, so they stay aligned): the cost is at most one round, ≈ 1/S of the data set
read sequentially per worker (ceil(N/S) shards). The stream depends on seed, shard
list, rank, world_size, num_workers and batch_size; a resume with other values is
refused.

Bad data (skipped and counted in :meth:`stats`): undecodable JPEG, missing image,
missing or non-integer label, truncated tar (its readable samples are kept), empty
shard. If bad samples exceed ``max_bad_fraction`` of the samples seen by a worker
(after ``bad_check_min_samples``), iteration fails with a clear error; a label outside
[0, num_classes) fails at once, naming the sample. Counts travel with the position
in :meth:`state_dict`; shards re-read while resuming are not counted twice.
"""
from __future__ import annotations

import io
import math
import random
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import resolve_shards

AUGMENTS = ("flip", "crop", "color")
STATE_FORMAT = "dpface-wds-stream/1"
_SHARD_TAG, _SHUFFLE_TAG, _AUG_TAG = 11, 12, 13
_BAD_KINDS = ("bad_image", "missing_image", "missing_label", "bad_label")
_SHARD_KINDS = ("truncated_shards", "empty_shards", "unreadable_shards")
_N_DRAWS = 5  # uniform draws per raw sample: flip, crop x, crop y, brightness, contrast


_KEEP = frozenset(("jpg", "cls"))
_ZERO_BLOCK = bytes(512)


class TarFormatError(ValueError):
    """A tar stream is truncated or has a corrupt header."""


def iter_tar_members(f, keep=None) -> Iterator[dict]:
    """Regular files of a tar stream as {"fname", "data"} — webdataset's member records.

    A lean replacement for ``tarfile`` streaming (≈10× less CPU per member, which
    matters when members are 4 kB JPEGs): parses ustar/GNU headers directly, checks
    their checksums, follows GNU long names and pax ``path`` records, and skips
    (seeks over) the data of members whose extension is not in ``keep``. Raises
    TarFormatError on a truncated stream, including one that ends without the
    end-of-archive block, after yielding every complete member before the damage.
    """
    long_name = None
    while True:
        hdr = f.read(512)
        if len(hdr) < 512:
            raise TarFormatError("unexpected end of data (no end-of-archive block)")
        if hdr == _ZERO_BLOCK:
            return
        stored = hdr[148:156].strip(b"\0 ")
        try:
            ok = int(stored or b"0", 8) == sum(hdr) - sum(hdr[148:156]) + 256
        except ValueError:
            ok = False
        if not ok:
            raise TarFormatError("bad tar header checksum")
        field = hdr[124:136]
        size = (int.from_bytes(field[1:], "big") if field[0] & 0x80
                else int(field.strip(b"\0 ") or b"0", 8))
        kind = hdr[156:157]
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        padded = (size + 511) & ~511
        special = kind in (b"L", b"x", b"g")
        regular = kind in (b"0", b"\0", b"7")
        fname = (long_name or name).decode("utf-8", "replace")
        wanted = special or (regular and (keep is None or fname.partition(".")[2] in keep))
        if wanted:
            data = f.read(size)
            if len(data) < size:
                raise TarFormatError(f"unexpected end of data in member {fname!r}")
            f.seek(padded - size, 1)
        else:
            f.seek(padded, 1)
        if kind == b"L":
            long_name = data.rstrip(b"\0")
        elif kind == b"x":
            for rec in data.split(b"\n"):
                k, _, v = rec.partition(b" ")[2].partition(b"=")
                if k == b"path":
                    long_name = v
        elif kind != b"g":
            long_name = None
            if wanted:
                yield {"fname": fname, "data": data}


def _seed_int(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])


def _empty_stats() -> dict:
    return {"samples": 0, **{k: 0 for k in _BAD_KINDS + _SHARD_KINDS}}


class _Config:
    """Everything a worker needs; plain data so it pickles into DataLoader workers."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _epoch_perm(cfg: _Config, epoch: int) -> np.ndarray:
    n = len(cfg.tars)
    if not cfg.shuffle_shards:
        return np.arange(n)
    return np.random.default_rng([cfg.seed, _SHARD_TAG, epoch]).permutation(n)


def shards_for(cfg: _Config, slot: int, round_: int) -> list[int]:
    """Shard numbers slot ``slot`` reads in round ``round_`` (see the module docstring)."""
    n, s = len(cfg.tars), cfg.slots
    if not cfg.resampled:
        return [int(i) for i in _epoch_perm(cfg, round_)[slot::s]]
    per_round = math.ceil(n / s)
    out, perms = [], {}
    for i in range(round_ * per_round, (round_ + 1) * per_round):
        g = slot + s * i
        e = g // n
        if e not in perms:
            perms[e] = _epoch_perm(cfg, e)
        out.append(int(perms[e][g % n]))
    return out


class _WorkerStream(IterableDataset):
    """The per-worker half of :class:`WebDatasetStream` (runs inside DataLoader workers)."""

    def __init__(self, cfg: _Config, positions: list[dict], ended: list[int]):
        super().__init__()
        self.cfg, self.positions, self.ended = cfg, positions, set(ended)

    # -- raw samples ---------------------------------------------------------------
    def _shard_samples(self, shard: int, stats: dict, count: bool = True) -> Iterator[dict]:
        """Samples of one shard; truncation/unreadable/empty shards are counted (when
        ``count``), not raised."""
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        path = self.cfg.tars[shard]
        errors = []

        def handler(exn: Exception) -> bool:
            errors.append(exn)
            return True

        try:
            stream = open(path, "rb", buffering=1 << 20)
        except OSError:  # deleted or unreadable since the stream was set up
            stats["unreadable_shards"] += count
            return

        def files():
            try:
                if self.cfg.tar_reader == "fast":
                    members = iter_tar_members(stream, keep=_KEEP)
                else:
                    members = tar_file_iterator(stream, handler=handler)
                for f in members:
                    f["__url__"] = path
                    yield f
            except Exception as exn:  # noqa: BLE001 — tarfile raises many types on bad input
                errors.append(exn)

        n = 0
        with stream:
            for sample in group_by_keys(files(), handler=handler, suffixes=_KEEP):
                n += 1
                yield sample
        if errors:
            stats["truncated_shards"] += count
        elif n == 0:
            stats["empty_shards"] += count

    def _round_samples(self, slot: int, round_: int, stats: dict,
                       progress: dict) -> Iterator[dict]:
        """The round's samples, shuffled. ``progress["done"]`` counts shards read to the
        end (their bad-shard counts made); the first ``progress["counted"]`` were
        counted before a resume and are not counted again."""
        from webdataset.filters import _shuffle

        def raw():
            for i, shard in enumerate(shards_for(self.cfg, slot, round_)):
                yield from self._shard_samples(shard, stats, count=i >= progress["counted"])
                progress["done"] = i + 1

        buf = self.cfg.shuffle_buffer
        if buf <= 1:
            return raw()
        rng = random.Random(_seed_int(self.cfg.seed, _SHUFFLE_TAG, slot, round_))
        return _shuffle(raw(), bufsize=buf, initial=buf, rng=rng)

    # -- decode + augment -----------------------------------------------------------
    def _decode(self, sample: dict, draws: np.ndarray, stats: dict):
        """(HWC uint8 image, label) or None if the sample is bad (counted)."""
        cfg = self.cfg
        key = sample.get("__key__", "?")
        if "cls" not in sample:
            stats["missing_label"] += 1
            return None
        try:
            label = int(bytes(sample["cls"]).decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            stats["bad_label"] += 1
            return None
        if not 0 <= label < cfg.num_classes:
            raise ValueError(f"sample {key!r} in {sample.get('__url__')} has label {label}, "
                             f"outside [0, {cfg.num_classes}) (num_classes of the manifest)")
        data = sample.get("jpg")
        if data is None:
            stats["missing_image"] += 1
            return None
        try:
            im = Image.open(io.BytesIO(data))
            if im.mode != "RGB":
                im = im.convert("RGB")
            s = cfg.image_size
            if im.size != (s, s):
                im = im.resize((s, s), Image.BILINEAR)
            img = np.asarray(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            stats["bad_image"] += 1
            return None
        return _augment(img, draws, cfg.augment), label

    def __iter__(self):
        cfg = self.cfg
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = cfg.rank * cfg.workers + worker
        if worker in self.ended:
            yield None, {"worker": worker, "end": True}
            return
        pos = self.positions[worker]
        round_, skip = pos["round"], pos["raw"]
        stats = dict(pos["stats"])
        progress = {"done": 0, "counted": pos.get("done", 0)}
        images, labels = [], []
        barren = 0  # consecutive shards without any usable sample (guards an endless loop)
        while True:
            aug_rng = np.random.default_rng([cfg.seed, _AUG_TAG, slot, round_])
            raw = 0
            got_any = False
            for sample in self._round_samples(slot, round_, stats, progress):
                draws = aug_rng.random(_N_DRAWS)  # drawn for every raw sample, even skipped ones
                raw += 1
                if raw <= skip:
                    continue
                out = self._decode(sample, draws, stats)
                if out is None:
                    _check_bad_fraction(stats, cfg, sample)
                    continue
                got_any = True
                images.append(out[0])
                labels.append(out[1])
                stats["samples"] += 1
                if len(images) == cfg.batch_size:
                    yield _collate(images, labels), {"worker": worker, "round": round_,
                                                     "raw": raw, "done": progress["done"],
                                                     "stats": dict(stats)}
                    images, labels = [], []
            if not cfg.resampled:
                if images:  # short last batch: every sample exactly once per epoch
                    yield _collate(images, labels), {"worker": worker, "round": round_,
                                                     "raw": raw, "done": progress["done"],
                                                     "stats": dict(stats)}
                yield None, {"worker": worker, "end": True, "stats": dict(stats)}
                return
            skip = 0
            progress = {"done": 0, "counted": 0}
            barren = 0 if got_any else barren + max(1, len(shards_for(cfg, slot, round_)))
            if barren > 2 * len(cfg.tars) + cfg.slots:
                raise RuntimeError(f"worker {worker} of rank {cfg.rank} read {barren} shards in a "
                                   f"row without one usable sample (stats: {stats}); are the "
                                   "shards empty or corrupt?")
            round_ += 1


def _check_bad_fraction(stats: dict, cfg: _Config, sample: dict) -> None:
    bad = sum(stats[k] for k in _BAD_KINDS)
    seen = bad + stats["samples"]
    if seen >= cfg.bad_check_min_samples and bad > cfg.max_bad_fraction * seen:
        raise RuntimeError(
            f"too much bad data: {bad} of {seen} samples seen by one worker are unusable "
            f"({ {k: stats[k] for k in _BAD_KINDS} }), above max_bad_fraction="
            f"{cfg.max_bad_fraction}; last bad sample {sample.get('__key__')!r} in "
            f"{sample.get('__url__')}")


def _augment(img: np.ndarray, draws: np.ndarray, augment: tuple) -> np.ndarray:
    """Small, cheap augmentations on HWC uint8, driven by pre-drawn uniforms."""
    if "crop" in augment:  # random shift by up to ~3.5 % of the side (edge-padded)
        h, w = img.shape[:2]
        p = max(1, h // 28)
        padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode="edge")
        y, x = int(draws[2] * (2 * p + 1)), int(draws[1] * (2 * p + 1))
        img = padded[y:y + h, x:x + w]
    if "color" in augment:  # brightness and contrast in [0.8, 1.2]
        b, c = 0.8 + 0.4 * draws[3], 0.8 + 0.4 * draws[4]
        f = img.astype(np.float32)
        mean = f.mean()
        img = np.clip((f - mean) * c + mean * b, 0, 255).astype(np.uint8)
    if "flip" in augment and draws[0] < 0.5:
        img = img[:, ::-1]
    return img


def _collate(images: list, labels: list) -> tuple[torch.Tensor, torch.Tensor]:
    # Per-image HWC→CHW copies into one buffer: ~10× faster than stacking HWC and
    # permuting the whole uint8 batch in torch.
    h, w = images[0].shape[:2]
    batch = np.empty((len(images), 3, h, w), dtype=np.uint8)
    for i, img in enumerate(images):
        batch[i] = img.transpose(2, 0, 1)
    return torch.from_numpy(batch), torch.tensor(labels, dtype=torch.int64)


class WebDatasetStream:
    """Resumable per-rank stream of (uint8 [B,3,H,W] RGB, int64 [B]) from WebDataset shards.

    Args:
        manifest_or_shards: manifest.json (or its directory), a tar path / brace pattern
            (``"d/shard-{000000..000009}.tar"``), or a list of tar paths.
        batch_size: per-rank batch size.
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: DataLoader worker processes (0: read in the calling process).
        seed: the stream is a pure function of the seed (and the other arguments).
        shuffle_buffer: samples held by each worker's shuffle buffer (0/1: no shuffle).
        augment: subset of ("flip", "crop", "color"): random horizontal flip, random
            shift by ≤ size/28 px, brightness/contrast ±20 %.
        image_size: output side; other sizes are resized (bilinear).
        resampled: True → infinite, always-full batches for training; False → one
            exact pass per ``__iter__`` (short last batch per worker).
        max_bad_fraction: fail when more than this fraction of samples is unusable …
        bad_check_min_samples: … once a worker has seen at least this many samples.
        num_classes: required without a manifest; with one, may only enlarge it.
        shuffle_shards: permute the shard order per epoch (False: manifest order).
        prefetch_factor: batches prefetched per worker.
        tar_reader: "fast" (:func:`iter_tar_members`) or "webdataset" (the library's
            tarfile-based ``tar_file_iterator``); grouping and shuffling are
            webdataset's either way.
    """

    def __init__(self, manifest_or_shards, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 2000,
                 augment=("flip",), image_size: int = 112, resampled: bool = True,
                 max_bad_fraction: float = 0.01, bad_check_min_samples: int = 200,
                 num_classes: int | None = None, shuffle_shards: bool = True,
                 prefetch_factor: int = 4, tar_reader: str = "fast"):
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                            ("num_workers", num_workers, 0), ("seed", seed, 0),
                            ("shuffle_buffer", shuffle_buffer, 0), ("image_size", image_size, 8),
                            ("bad_check_min_samples", bad_check_min_samples, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        augment = tuple(augment or ())
        unknown = [a for a in augment if a not in AUGMENTS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; choose from {AUGMENTS}")
        if tar_reader not in ("fast", "webdataset"):
            raise ValueError(f"tar_reader must be 'fast' or 'webdataset', got {tar_reader!r}")
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        shards = resolve_shards(manifest_or_shards, num_classes)
        workers = max(1, int(num_workers))
        self.cfg = _Config(
            tars=shards.tars, num_classes=shards.num_classes, batch_size=int(batch_size),
            rank=int(rank), world_size=int(world_size), workers=workers,
            slots=int(world_size) * workers, seed=int(seed), shuffle_buffer=int(shuffle_buffer),
            augment=augment, image_size=int(image_size), resampled=bool(resampled),
            max_bad_fraction=float(max_bad_fraction),
            bad_check_min_samples=int(bad_check_min_samples), shuffle_shards=bool(shuffle_shards),
            tar_reader=tar_reader)
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.num_classes = shards.num_classes
        self.num_images = shards.num_images
        self._reset_epoch(0)

    @property
    def batches_per_epoch(self) -> int | None:
        """Global data epoch in per-rank batches (num_images // (B × world)); None if unknown."""
        if self.num_images is None:
            return None
        return self.num_images // (self.cfg.batch_size * self.cfg.world_size)

    @property
    def epoch(self) -> float:
        """Data epochs consumed by this rank, fractional (for logging)."""
        per = self.batches_per_epoch
        if self.cfg.resampled:
            return self._batches / per if per else 0.0
        return self._epoch + (self._batches / per if per else 0.0)

    def _reset_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._batches = 0
        self._cursor = 0
        self._ended: list[int] = []
        start_round = epoch if not self.cfg.resampled else 0
        # Counts are cumulative over epochs: each worker continues from its own.
        old = getattr(self, "_positions", None) or [{"stats": _empty_stats()}] * self.cfg.workers
        self._positions = [{"round": start_round, "raw": 0, "stats": dict(p["stats"])}
                           for p in old]

    # -- the loader protocol ---------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        dataset = _WorkerStream(cfg, [dict(p) for p in self._positions], self._ended)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False)
        # Workers' batches are handed out in a fixed cyclic order (from the saved cursor,
        # skipping workers that ended), whatever order the loader delivers them in.
        pending: dict[int, list] = {w: [] for w in range(cfg.workers)}
        it = iter(loader)
        ended = set(self._ended)
        while len(ended) < cfg.workers:
            w = self._cursor
            if w in ended:
                self._cursor = (w + 1) % cfg.workers
                continue
            while not pending[w]:
                try:
                    batch, meta = next(it)
                except StopIteration:
                    raise RuntimeError(f"data worker {w} stopped without finishing its stream") \
                        from None
                pending[meta["worker"]].append((batch, meta))
            batch, meta = pending[w].pop(0)
            if meta.get("end"):
                ended.add(w)
                self._ended = sorted(ended)
                if "stats" in meta:
                    self._positions[w]["stats"] = meta["stats"]
                self._cursor = (w + 1) % cfg.workers
                continue
            self._positions[w] = {"round": meta["round"], "raw": meta["raw"],
                                  "done": meta["done"], "stats": meta["stats"]}
            self._batches += 1
            self._cursor = (w + 1) % cfg.workers
            yield batch
        self._reset_epoch(self._epoch + 1)  # only reached without resampling

    def state_dict(self) -> dict:
        """Position after the last yielded batch (plain data: JSON/torch.save friendly)."""
        c = self.cfg
        return {"format": STATE_FORMAT, "seed": c.seed, "rank": c.rank,
                "world_size": c.world_size, "workers": c.workers, "batch_size": c.batch_size,
                "resampled": c.resampled, "num_shards": len(c.tars), "epoch": self._epoch,
                "batches": self._batches, "cursor": self._cursor, "ended": list(self._ended),
                "positions": [dict(p, stats=dict(p["stats"])) for p in self._positions]}

    def load_state_dict(self, state: dict) -> None:
        c = self.cfg
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a WebDatasetStream state (format={state.get('format')!r})")
        mine = {"seed": c.seed, "rank": c.rank, "world_size": c.world_size, "workers": c.workers,
                "batch_size": c.batch_size, "resampled": c.resampled, "num_shards": len(c.tars)}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("the saved data position belongs to a different stream "
                             f"(saved vs now: {diff}); the stream is a function of these, so "
                             "it cannot continue where it stopped")
        self._epoch = int(state["epoch"])
        self._batches = int(state["batches"])
        self._cursor = int(state["cursor"])
        self._ended = list(state["ended"])
        self._positions = [dict(p, stats=dict(p["stats"])) for p in state["positions"]]

    def stats(self) -> dict:
        """Counts summed over workers (as of each worker's last delivered batch)."""
        total = _empty_stats()
        for p in self._positions:
            for k, v in p["stats"].items():
                total[k] += v
        total["bad_samples"] = sum(total[k] for k in _BAD_KINDS)
        return total
