"""Per-rank batch stream over WebDataset shards decoded by NVIDIA DALI (GPU or CPU).

Graph::

    fn.readers.webdataset(tar + .idx, ext jpg/cls, shard_id=rank, num_shards=world,
                          shuffle buffer)  ─► fn.decoders.image ('mixed' on GPU, 'cpu')
    ─► [resize to image_size if needed] ─► data.augment's DALI forms (augment.py: crop
    resizes to size+2p and takes a random size² window; color; flip mirrors in the last op)
    ─► crop_mirror_normalize(uint8, CHW)

Labels: DALI hands ``.cls`` over as raw bytes, i.e. the ASCII digits of the label
(b"17" → [49, 55]). Using those bytes as the label would train against a constant-ish
garbage target; they are parsed to int64 here, per sample (decode.parse_label).

The stream is infinite (DALI's reader wraps around epochs; each rank reads its own
1/world_size of the samples, so no rank starves). It is deterministic from ``seed``
and ``rank``. Resume uses DALI checkpointing: :meth:`state_dict` holds the pipeline's
serialized state (reader position, shuffle buffer, random generators) after the last
yielded batch, and a rebuilt pipeline continues from it at no replay cost.

Bad data:
* Samples lacking a jpg or cls member are skipped by the reader; they are counted
  from the index files before iteration (``missing_image``/``missing_label``).
* Truncated (index points past the end of the tar) and empty shards are dropped
  before iteration and counted (``truncated_shards``, ``empty_shards``).
* A non-integer label: the sample is replaced by another good sample of the same
  batch (batches keep their fixed size) and counted (``bad_label``).
* An undecodable JPEG fails DALI's whole batch: that batch is dropped and its
  samples counted as ``lost_samples`` (converters trial-decode every image, so this
  only happens to data damaged after conversion).
* Labels outside [0, num_classes) raise, naming the sample; too much bad data
  (above ``max_bad_fraction`` after ``bad_check_min_samples``) raises (quality.py).
"""
from __future__ import annotations

import base64
import os

import numpy as np
import torch

from dpface.data.augment import apply_dali, check_augment
from dpface.data.formats.shards import ShardError, read_index, resolve_shards
from dpface.data.streams.bad_data import BadDataLimit, with_totals
from dpface.data.streams.decode import check_label, parse_label
from dpface.data.streams.position import PositionError, check_format, differences, require_same
from dpface.data.streams.protocol import batches_per_epoch, epochs
from dpface.seeding import Stream, seed_int

STATE_FORMAT = "dpface-dali-stream/1"


def _import_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise ImportError(
            "data.backend 'dali' needs NVIDIA DALI, which is not installed: "
            "pip install nvidia-dali-cuda120 (or -cuda110/-cuda130 to match your CUDA), "
            "or use the 'webdataset' backend") from e
    return fn, pipeline_def, types


def _empty_stats() -> dict:
    return {"samples": 0, "bad_label": 0, "lost_samples": 0, "failed_batches": 0,
            "missing_image": 0, "missing_label": 0, "truncated_shards": 0, "empty_shards": 0,
            "lost_index_samples": 0}


class DaliStream:
    """Resumable per-rank stream of (uint8 [B,3,H,W] RGB, int64 [B]) decoded by DALI
    (a :class:`~dpface.data.streams.protocol.BatchStream`).

    Args:
        manifest_or_shards: manifest.json (or its directory), a tar path / brace
            pattern, or a list of tar paths (their ``.idx`` files are used if present).
        batch_size: per-rank batch size.
        rank, world_size: this process's place among data-parallel ranks (DALI reader
            shard_id / num_shards).
        num_workers: DALI CPU threads.
        seed: base seed (the pipeline's seed is derived from seed and rank).
        shuffle_buffer: reader shuffle buffer (``initial_fill``); 0/1 → read in order.
        augment: names in :data:`dpface.data.augment.AUGMENTS` ("flip", "crop", "color").
        image_size: output side.
        device: "gpu" (decode on the GPU via 'mixed') or "cpu"; default: gpu if CUDA is
            available to torch.
        device_id: CUDA device for device="gpu" (default: torch's current device);
            ignored for "cpu" (the pipeline is built with device_id=None).
        max_bad_fraction, bad_check_min_samples: see the module docstring.
        num_classes: required without a manifest; with one, may only enlarge it.
        prefetch: DALI prefetch queue depth.
    """

    def __init__(self, manifest_or_shards, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 2000,
                 augment=("flip",), image_size: int = 112, device: str | None = None,
                 device_id: int | None = None, max_bad_fraction: float = 0.01,
                 bad_check_min_samples: int = 200, num_classes: int | None = None,
                 prefetch: int = 2):
        _import_dali()
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        augment = check_augment(augment)
        limit = BadDataLimit(float(max_bad_fraction), int(bad_check_min_samples))
        if device is None:
            device = "gpu" if torch.cuda.is_available() else "cpu"
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu":
            if not torch.cuda.is_available():
                raise RuntimeError("DaliStream(device='gpu') needs CUDA, which torch cannot see; "
                                   "use device='cpu'")
            device_id = torch.cuda.current_device() if device_id is None else int(device_id)
        else:
            device_id = None
        shards = resolve_shards(manifest_or_shards, num_classes)
        self.num_classes = shards.num_classes
        self.num_images = shards.num_images
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.num_workers, self.seed = max(1, int(num_workers)), int(seed)
        self.shuffle_buffer, self.augment = int(shuffle_buffer), augment
        self.image_size, self.device, self.device_id = int(image_size), device, device_id
        self.limit = limit
        self.prefetch = int(prefetch)
        self._stored_size = shards.image_size
        self._stats = _empty_stats()
        self._indexed = 0  # samples listed in the usable shards' index files
        self.tars, self.indexes = self._usable_shards(shards)
        self._check_bad_fraction("the index files", seen=self._indexed)
        self._pipe = None
        self._checkpoint: bytes | None = None
        self._batches = 0

    @property
    def batches_per_epoch(self) -> int | None:
        return batches_per_epoch(self.num_images, self.batch_size * self.world_size)

    @property
    def epoch(self) -> float:
        """Data epochs consumed by this rank, fractional (for logging)."""
        return epochs(self._batches, self.batches_per_epoch)

    def _usable_shards(self, shards):
        """Drop truncated/empty shards (counted) and count incomplete samples, from the indexes."""
        if shards.indexes is None:  # DALI will infer indexes itself (slow start for big sets)
            return list(shards.tars), None
        tars, idxs = [], []
        for tar, idx in zip(shards.tars, shards.indexes):
            try:
                samples = read_index(idx)
            except ShardError as e:
                raise ShardError(f"index file of shard {tar} is unusable: {e}") from e
            if not samples or os.path.getsize(tar) == 0:  # a 0-byte tar is empty, not truncated
                self._stats["empty_shards"] += 1
                self._stats["lost_index_samples"] += len(samples)
                continue
            end = max(off + size for s in samples for off, size in s.values())
            if end > os.path.getsize(tar):
                self._stats["truncated_shards"] += 1
                self._stats["lost_index_samples"] += len(samples)  # DALI skips the whole shard
                continue
            self._stats["missing_image"] += sum("jpg" not in s for s in samples)
            self._stats["missing_label"] += sum("jpg" in s and "cls" not in s for s in samples)
            self._indexed += len(samples)
            tars.append(tar)
            idxs.append(idx)
        if not tars:
            raise ValueError(f"none of the {len(shards.tars)} shards is usable "
                             f"(stats: {self._stats})")
        return tars, idxs

    def _check_bad_fraction(self, where: str, seen: int | None = None) -> None:
        """Index-time counts are judged against the indexed total (``seen``); run-time
        counts against the samples delivered so far."""
        s = self._stats
        if seen is not None:  # lost shards count against the data set too
            bad = s["missing_image"] + s["missing_label"] + s["lost_index_samples"]
            seen += s["lost_index_samples"]
        else:
            bad = s["bad_label"] + s["lost_samples"]
            seen = bad + s["samples"]
        self.limit.check(bad, seen, f"in {where}", s)

    def _build(self):
        fn, pipeline_def, types = _import_dali()
        size = self.image_size
        shuffle = self.shuffle_buffer > 1
        decode_device = "mixed" if self.device == "gpu" else "cpu"
        reader_kw = dict(paths=self.tars, ext=["jpg", "cls"], missing_component_behavior="skip",
                         random_shuffle=shuffle, shard_id=self.rank, num_shards=self.world_size,
                         name="reader")
        if self.indexes is not None:
            reader_kw["index_paths"] = self.indexes
        if shuffle:
            reader_kw["initial_fill"] = self.shuffle_buffer
        augment, stored_size = self.augment, self._stored_size
        seed = seed_int(self.seed, Stream.DALI, self.rank) % (2**31 - 1)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_workers,
                      device_id=self.device_id, seed=seed, prefetch_queue_depth=self.prefetch,
                      enable_checkpointing=True)
        def pipeline():
            jpegs, cls = fn.readers.webdataset(**reader_kw)
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images, final = apply_dali(fn, images, augment, size, stored_size)
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", **final)
            return images, cls

        kw = {}
        if self._checkpoint is not None:
            kw["checkpoint"] = self._checkpoint
        pipe = pipeline(**kw)
        pipe.build()
        return pipe

    def _to_torch(self, images) -> torch.Tensor:
        tensor = images.as_tensor()
        if self.device == "cpu":
            return torch.from_numpy(np.array(tensor))  # copy: DALI reuses its buffers
        from nvidia.dali.plugin.pytorch import feed_ndarray
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out

    def _labels(self, cls) -> tuple[torch.Tensor, list[int]]:
        """int64 labels and the positions of good ones; bad ones are counted."""
        labels, good = [], []
        for i in range(len(cls)):
            try:
                label = parse_label(cls[i])
            except (UnicodeDecodeError, ValueError):
                self._stats["bad_label"] += 1
                labels.append(-1)
                continue
            labels.append(check_label(label, self.num_classes, f"sample {cls[i].source_info()!r}"))
            good.append(i)
        return torch.tensor(labels, dtype=torch.int64), good

    # -- the BatchStream protocol ----------------------------------------------------
    def __iter__(self):
        if self._pipe is None:
            self._pipe = self._build()
        while True:
            try:
                images, cls = self._pipe.run()
            except RuntimeError as e:
                if "decod" not in str(e).lower():
                    raise
                self._stats["failed_batches"] += 1
                self._stats["lost_samples"] += self.batch_size
                self._check_bad_fraction(f"shards {self.tars[:3]}…")
                continue
            labels, good = self._labels(cls)
            if not good:
                self._check_bad_fraction("a batch without one good label")
                continue
            x = self._to_torch(images)
            if len(good) < len(labels):  # keep the batch size: reuse good samples
                fill = torch.tensor([good[i % len(good)] for i in range(len(labels))])
                keep = torch.zeros(len(labels), dtype=torch.bool)
                keep[good] = True
                src = torch.where(keep, torch.arange(len(labels)), fill)
                x, labels = x[src.to(x.device)], labels[src]
                self._check_bad_fraction("the labels")
            self._stats["samples"] += len(good)
            self._checkpoint = self._pipe.checkpoint()
            self._batches += 1
            yield x, labels

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "batches": self._batches, "stats": dict(self._stats),
                "checkpoint": None if self._checkpoint is None
                else base64.b64encode(self._checkpoint).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        check_format(state, STATE_FORMAT, "DaliStream")
        mine = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size}
        diff = differences(state, mine)
        if set(diff) == {"world_size", "batch_size"} and (
                state["world_size"] * state["batch_size"] == self.world_size * self.batch_size):
            raise PositionError(
                f"a DALI stream position saved at world size {state['world_size']} cannot continue "
                f"at world size {self.world_size}, even at the same global batch: DALI's reader "
                "checkpoint is tied to its shard_id/num_shards split. Resume at world size "
                f"{state['world_size']}, or use data.backend: webdataset (same shards), which reshards")
        require_same(state, mine)
        self._batches = int(state["batches"])
        self._stats = dict(state["stats"])
        ck = state.get("checkpoint")
        self._checkpoint = None if ck is None else base64.b64decode(ck)
        self._pipe = None  # rebuilt from the checkpoint on the next __iter__

    def stats(self) -> dict:
        # An undecodable image fails DALI's whole batch: its lost samples are bad samples.
        return with_totals(self._stats, ("bad_label", "lost_samples", "missing_image", "missing_label"),
                           ("truncated_shards", "empty_shards"))
