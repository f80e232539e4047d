"""The batch-stream protocol every data backend implements, and the registry of backends.

``data.backend`` names an entry of :data:`STREAMS`; its builder turns the ``data:``
section into the rank's stream (``DataConfig.build``). The trainer and the checkpoint
use a stream only through :class:`BatchStream`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

from dpface.registry import Registry

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


# name → builder(data: DataConfig, ctx: ParallelContext, seed: int) -> BatchStream. The
# builders import their stream lazily: a config load needs the names only.
STREAMS = Registry("data backend")


@STREAMS.register("synthetic")
def _synthetic(data, ctx, seed: int):
    from .loader import MapStream
    from .synthetic import SyntheticFaceDataset

    s = data.synthetic
    ds = SyntheticFaceDataset(num_identities=s.num_identities, seed=s.seed, image_size=data.image_size,
                              difficulty=s.difficulty, max_images=s.max_images,
                              min_images=s.min_images, exponent=s.exponent)
    if data.sampler == "pk":
        from .pk_sampler import PKMapStream

        return PKMapStream(ds, data.batch_size // data.pk_images, data.pk_images, ctx.rank,
                           ctx.world_size, seed=seed, num_workers=data.num_workers)
    return MapStream(ds, data.batch_size, ctx.rank, ctx.world_size, seed=seed,
                     num_workers=data.num_workers)


def _shard_args(data, ctx, seed: int) -> dict:
    """The arguments both shard streams take from the ``data:`` section."""
    s = data.shards
    return dict(batch_size=data.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                num_workers=data.num_workers, seed=seed, shuffle_buffer=s.shuffle_buffer,
                augment=tuple(data.augment), image_size=data.image_size,
                max_bad_fraction=s.max_bad_fraction)


@STREAMS.register("webdataset")
def _webdataset(data, ctx, seed: int):
    from .webdataset_stream import WebDatasetStream

    return WebDatasetStream(data.shards.manifest, **_shard_args(data, ctx, seed))


@STREAMS.register("dali")
def _dali(data, ctx, seed: int):
    from .dali_stream import DaliStream

    on_gpu = ctx.device.type == "cuda"
    return DaliStream(data.shards.manifest, device="gpu" if on_gpu else "cpu",
                      device_id=ctx.local_rank if on_gpu else None, **_shard_args(data, ctx, seed))
