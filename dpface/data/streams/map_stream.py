"""Map-style datasets as a resumable stream of fixed-size per-rank batches.

The order is a pure function of (seed, epoch): each epoch is a permutation of the
dataset cut into global batches of ``batch_size × world_size``; rank r takes the r-th
slice of each. So the stream position is one number (global batches consumed), a
resumed run continues with exactly the batches it would have seen, and the same
position is meaningful at another world size with the same global batch.
The incomplete tail of each epoch is dropped: every rank always gets a full batch.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from dpface.data.streams.protocol import batches_per_epoch, epochs
from dpface.seeding import Stream, rng


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of every training stream. Ctrl-C (and SLURM's
    scancel) signal the whole process group: a worker killed by it makes the main process
    fail with "DataLoader worker exited unexpectedly" before it can checkpoint. The
    main process's handler (engine/preempt.py) decides; it shuts the workers down."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def loader_generator(seed: int) -> torch.Generator:
    """Every DataLoader gets its own generator: without one, each new iterator (a resume,
    a new epoch) draws its workers' base seed from the global RNG, which shifts every later
    random draw of the model (dropout masks) away from the uninterrupted run's."""
    return torch.Generator().manual_seed(int(seed))


@contextlib.contextmanager
def loader_iter(loader: DataLoader):
    """``iter(loader)`` whose worker processes are shut down however the caller leaves —
    the end, close(), or an error. An error's traceback keeps the iterator (and so the
    workers) alive, the workers ignore SIGTERM (above), and the process then hung at exit
    joining them, after printing its error line."""
    it = iter(loader)
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # DataLoader's multi-process iterator
        if shutdown is not None:
            shutdown()


class _BatchIndices:
    """Infinite batch sampler for one rank, starting at global batch ``start``."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start: int):
        self.n, self.b, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.start = seed, start
        self.per_epoch = n // (batch_size * world_size)

    def __iter__(self):
        k = self.start
        while True:
            epoch, j = divmod(k, self.per_epoch)
            perm = rng(self.seed, Stream.LOADER_ORDER, epoch).permutation(self.n)
            lo = (j * self.world + self.rank) * self.b
            yield perm[lo:lo + self.b].tolist()
            k += 1


class MapStream:
    """Resumable per-rank batch stream over a map-style dataset yielding (uint8 CHW, label)
    (a :class:`~dpface.data.streams.protocol.BatchStream`)."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, num_classes: int | None = None):
        n = len(dataset)
        if n < batch_size * world_size:
            raise ValueError(
                f"dataset has {n} samples, fewer than one global batch "
                f"({batch_size} per rank × {world_size} ranks)"
            )
        self.dataset = dataset
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.num_classes = num_classes if num_classes is not None else dataset.num_classes
        self.num_images = n
        self.batches_per_epoch = batches_per_epoch(n, batch_size * world_size)
        self._consumed = 0

    @property
    def epoch(self) -> float:
        return epochs(self._consumed, self.batches_per_epoch)

    def state_dict(self) -> dict:
        return {"batches": self._consumed, "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("global_batch") != self.batch_size * self.world_size:
            raise ValueError(
                f"data position was saved with global batch {state.get('global_batch')}, "
                f"this run uses {self.batch_size * self.world_size}: the stream cannot continue "
                "where it stopped (keep batch_size × world_size constant across a resume)"
            )
        self._consumed = int(state["batches"])

    def stats(self) -> dict:
        return {}

    def _sampler(self):
        """This rank's batches of dataset indices, from the current position on."""
        return _BatchIndices(len(self.dataset), self.batch_size, self.rank, self.world_size,
                             self.seed, self._consumed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_sampler=self._sampler(), num_workers=self.num_workers,
                            worker_init_fn=ignore_stop_signals, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers else None, generator=loader_generator(self.seed))
        with loader_iter(loader) as it:
            for images, labels in it:
                self._consumed += 1
                yield images, labels.long()
