"""The registry of data backends: ``data.backend`` names an entry of :data:`STREAMS`; its
builder turns the ``data:`` section into the rank's :class:`~.protocol.BatchStream`
(``DataConfig.build``). The builders import their stream lazily: a config load needs the
names only, and no stream imports this module.
"""
from __future__ import annotations

from dpface.registry import Registry

# name → builder(data: DataConfig, ctx: ParallelContext, seed: int) -> BatchStream
STREAMS = Registry("data backend")


@STREAMS.register("synthetic")
def _synthetic(data, ctx, seed: int):
    from dpface.data.streams.map_stream import MapStream
    from dpface.data.synthetic.faces import SyntheticFaceDataset

    s = data.synthetic
    ds = SyntheticFaceDataset(num_identities=s.num_identities, seed=s.seed, image_size=data.image_size,
                              difficulty=s.difficulty, max_images=s.max_images,
                              min_images=s.min_images, exponent=s.exponent)
    if data.sampler == "pk":
        from dpface.data.streams.pk_sampler import PKMapStream

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


def _sources(data, ctx, seed: int, build):
    """data.sources: one stream per source (``build(manifest, **args)``), mixed by weight
    (streams/mixed.py); else the one data set of data.shards."""
    if not data.sources:
        return build(data.shards.manifest, **_shard_args(data, ctx, seed))
    from dpface.data.formats.shards import ShardError, resolve_shards
    from dpface.data.streams.mixed import MixedStream, split_batch
    from dpface.schema import ConfigError
    from dpface.seeding import Stream, seed_int

    sets = []
    for i, src in enumerate(data.sources):
        try:
            s = resolve_shards(src["manifest"])
        except (ShardError, ValueError, OSError) as e:  # found at start: the config names a bad source
            raise ConfigError(f"data.sources[{i}]: {e}") from None
        if not s.num_images:
            raise ConfigError(f"data.sources[{i}]: {src['manifest']} holds 0 images")
        sets.append(s)
    try:
        shares = split_batch(data.batch_size, [float(src["weight"]) for src in data.sources])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    offsets = [sum(s.num_classes for s in sets[:i]) for i in range(len(sets))]
    parts, first = [], []
    for i, (src, n) in enumerate(zip(data.sources, shares)):
        if n == 0:
            continue
        args = {**_shard_args(data, ctx, seed_int(seed, Stream.DATA_SOURCE, i)), "batch_size": n}
        parts.append((f"source{i}", build(src["manifest"], **args), src["manifest"], n))
        first.append(offsets[i])
    return MixedStream(parts, first, sum(s.num_classes for s in sets), ctx.world_size)


@STREAMS.register("webdataset")
def _webdataset(data, ctx, seed: int):
    from dpface.data.streams.webdataset import WebDatasetStream

    return _sources(data, ctx, seed, WebDatasetStream)


@STREAMS.register("dali")
def _dali(data, ctx, seed: int):
    import functools

    from dpface.data.streams.dali import DaliStream

    on_gpu = ctx.device.type == "cuda"
    return _sources(data, ctx, seed, functools.partial(DaliStream, device="gpu" if on_gpu else "cpu",
                                                       device_id=ctx.local_rank if on_gpu else None))
