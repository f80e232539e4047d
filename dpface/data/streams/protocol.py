"""The batch-stream protocol every data backend implements (the registry of backends is
streams/registry.py). The trainer and the checkpoint use a stream only through
:class:`BatchStream`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class BatchStream(Protocol):
    """This rank's training batches, resumable.

    * Iteration yields ``(images, labels)``: uint8 ``[B, 3, H, W]`` RGB (normalised on
      the device, data/transforms.py) and int64 ``[B]`` in ``[0, num_classes)``, with B
      the per-rank batch size, the same for every batch and rank. A training stream
      never ends (it wraps around data epochs); the trainer calls ``iter`` once per run.
    * The order is a pure function of (seed, rank, world size) and the stream's own
      arguments: two runs with the same ones see the same batches.
    * ``state_dict()`` is the position after the last yielded batch, plain data
      (``torch.save``-able); it may be a collective (every rank calls it at the same
      step). ``load_state_dict`` on a fresh stream continues exactly after that batch.
      At another world size the trainer loads rank 0's state into every rank: a stream
      either continues the same global stream from it (same global batch) or raises a
      ``ValueError`` saying what differs (a ``PositionError`` for the shard streams).
    """

    num_classes: int  # the classifier's size: every label is below it
    num_images: int | None  # images in one pass over the data (train.epochs); None: unknown

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    @property
    def epoch(self) -> float:
        """Data epochs consumed, fractional (for logging)."""

    def stats(self) -> dict[str, int]:
        """Counts for the logs (``data/<key>``): samples delivered and bad data skipped;
        ``{}`` when the stream has nothing to report."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def batches_per_epoch(num_images: int | None, global_batch: int) -> int | None:
    """Global batches in one pass over the data set; None when its size is unknown."""
    return None if num_images is None else num_images // global_batch


def epochs(batches: int, per_epoch: int | None) -> float:
    """``batches`` in data epochs (0.0 when the epoch length is unknown or zero)."""
    return batches / per_epoch if per_epoch else 0.0
