"""Several data sets at once (``data.sources``): one shard stream per source, mixed in every
batch by weight, their label spaces concatenated.

Source i (in the listed order) owns labels [offset_i, offset_i + classes_i), offset_i the
classes of the sources before it, so labels never collide and the head is sized by the
total. Every per-rank batch of B holds exactly b_i images of source i, the b_i the largest-
remainder rounding of w_i·B / Σw (each ≥ 1): over any number of batches, the sample counts
are the weights to within that rounding. Each source is an ordinary shard stream of batch
b_i (WebDataset or DALI) with its own seed, so each source's position resumes and
reshards exactly as one source's does (its global batch b_i × world must stay the same).
The state also holds each source's manifest hash, class count and offset: a source whose
manifest changed since the checkpoint is refused on resume, with the source named.
"""
from __future__ import annotations

from typing import Iterator

import torch

from dpface.data.formats.shards import manifest_hash
from dpface.data.streams.position import PositionError
from dpface.data.streams.protocol import batches_per_epoch, epochs

FORMAT = "dpface-mixed/1"


def split_batch(batch: int, weights: list[float]) -> list[int]:
    """Per-source shares of ``batch`` by ``weights`` (largest remainder; ties to the earlier
    source). A positive weight whose share rounds to 0 is an error naming the source."""
    total = float(sum(weights))
    exact = [batch * w / total for w in weights]
    out = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: batch - sum(out)]:
        out[i] += 1
    for i, (w, n) in enumerate(zip(weights, out)):
        if w > 0 and n == 0:
            raise ValueError(f"data.sources[{i}]: weight {w:g} of {total:g} gives it no image of a per-rank "
                             f"batch of {batch}: raise its weight or data.batch_size")
    return out


class MixedStream:
    """A :class:`~dpface.data.streams.protocol.BatchStream` over several sources (module doc).
    ``parts``: (name, stream, manifest path, per-rank batch) per source with a positive share, in order, and
    ``offsets`` their first labels; ``num_classes``: every source's classes (a source of weight
    0 still owns its labels)."""

    def __init__(self, parts: list[tuple[str, object, str, int]], offsets: list[int], num_classes: int,
                 world_size: int):
        self.parts = parts
        self.offsets = offsets
        self.num_classes = int(num_classes)
        images = [getattr(s, "num_images", None) for _, s, _, _ in parts]
        self.num_images = None if any(n is None for n in images) else sum(images)
        self.batch_size = sum(b for *_, b in parts)
        self.world_size = world_size
        self._hashes = [manifest_hash(m) for _, _, m, _ in parts]
        self._batches = 0

    @property
    def epoch(self) -> float:
        return epochs(self._batches, batches_per_epoch(self.num_images, self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        its = [iter(s) for _, s, _, _ in self.parts]
        while True:
            imgs, labels = [], []
            for it, off in zip(its, self.offsets):
                x, y = next(it)
                imgs.append(x)
                labels.append(y + off)
            self._batches += 1
            yield torch.cat(imgs), torch.cat(labels)

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, s, _, _ in self.parts:
            for k, v in s.stats().items():
                out[k] = out.get(k, 0) + v
                out[f"{name}/{k}"] = v
        return out

    def state_dict(self) -> dict:
        return {"format": FORMAT, "batches": self._batches,
                "sources": [{"name": name, "manifest": str(m), "hash": h, "offset": off,
                             "classes": s.num_classes, "batch": b, "state": s.state_dict()}
                            for (name, s, m, b), h, off in zip(self.parts, self._hashes, self.offsets)]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise PositionError("the checkpoint's data position is not of data.sources (a single data set?): "
                                "resume with the sources it was saved with")
        saved = state["sources"]
        if len(saved) != len(self.parts):
            raise PositionError(f"the checkpoint was saved with {len(saved)} data.sources, this run has "
                                f"{len(self.parts)}")
        for (name, s, m, _), h, off, old in zip(self.parts, self._hashes, self.offsets, saved):
            if old["hash"] != h:
                raise PositionError(f"{name} ({m}): its manifest changed since the checkpoint (saved "
                                    f"{old['hash'][:19]}…, now {h[:19]}…): the data set is not the one the run "
                                    "trained on; resume with the original, or start a new run")
            if (old["offset"], old["classes"]) != (off, s.num_classes):
                raise PositionError(f"{name} ({m}): its labels were [{old['offset']}, "
                                    f"{old['offset'] + old['classes']}) in the checkpoint, now [{off}, "
                                    f"{off + s.num_classes}): keep the sources in their order")
        for (_, s, _, _), old in zip(self.parts, saved):
            s.load_state_dict(old["state"])
        self._batches = int(state["batches"])


__all__ = ["MixedStream", "split_batch"]
