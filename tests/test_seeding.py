"""dpface.seeding: named streams never coincide; pre-existing streams keep their values."""
import itertools

import numpy as np

from dpface.seeding import Stream, rng, seed_int

# The parts each consumer passes (data/loader, data/synthetic, data/pk_sampler,
# data/webdataset_stream, heads/partial_fc, eval/ijb, data/templates, cluster/), over small values.
SMALL = range(4)
PARTS = {
    Stream.LOADER_ORDER: [(e,) for e in SMALL],
    Stream.DALI: [(r,) for r in SMALL],
    Stream.SYNTH_IDENTITY: [(i,) for i in SMALL],
    Stream.SYNTH_SAMPLE: list(itertools.product(SMALL, SMALL)),
    Stream.SYNTH_NOISE: [()],
    Stream.SYNTH_PAIRS: [(o, n, 4, 2) for o in SMALL for n in (2, 3)],
    Stream.PK_BATCH: [(k,) for k in SMALL],
    Stream.PK_IMAGES: list(itertools.product(SMALL, SMALL)),
    Stream.SHARD_ORDER: [(e,) for e in SMALL],
    Stream.SHUFFLE: list(itertools.product(SMALL, SMALL)),
    Stream.AUGMENT: list(itertools.product(SMALL, SMALL)),
    Stream.HEAD_INIT: [(b, d) for b in SMALL for d in (8, 512)],
    Stream.NEGATIVES: list(itertools.product(SMALL, SMALL)),
    Stream.IJB_SET: [(o, n) for o in (0, 100_000) for n in (4, 30)],
    Stream.TEMPLATE_LEVEL: list(itertools.product(SMALL, SMALL)),
    Stream.TEMPLATE_DEGRADE: list(itertools.product(SMALL, SMALL)),
    Stream.TEMPLATE_LAYOUT: [(o, n, 3, 2, 6) for o in SMALL for n in (2, 3)],
    Stream.CLUSTER_POOL: [(w,) for w in (0, 1)],
    Stream.CLUSTER_GCN: [(w,) for w in (0, 1, 2)],
}


def test_every_stream_is_listed():
    assert set(PARTS) == set(Stream)


def test_streams_never_coincide():
    seen = {}
    for seed in SMALL:
        for tag, parts in PARTS.items():
            for p in parts:
                key = (rng(seed, tag, *p).integers(0, 2**63, 2).tobytes(), seed_int(seed, tag, *p))
                assert key not in seen, f"{(seed, tag.name, p)} repeats {seen[key]}"
                seen[key] = (seed, tag.name, p)


def test_loader_order_no_longer_equals_the_noise_bank():
    # the collision that motivated the tags: [seed 0, epoch 3] == [seed 0, NOISE_STREAM = 3]
    a = rng(0, Stream.LOADER_ORDER, 3).standard_normal(4)
    b = rng(0, Stream.SYNTH_NOISE).standard_normal(4)
    assert not np.array_equal(a, b)


def test_ijb_set_no_longer_equals_the_webdataset_shuffle():
    # eval/ijb.py drew from default_rng([seed, 12, offset, n]): the shuffle stream of slot
    # ``offset``, round ``n``. Its own tag now.
    old = np.random.default_rng([0, 12, 100_000, 30]).random(3)
    assert np.array_equal(old, rng(0, Stream.SHUFFLE, 100_000, 30).random(3))
    assert not np.array_equal(old, rng(0, Stream.IJB_SET, 100_000, 30).random(3))


def test_existing_streams_keep_their_values():
    assert np.array_equal(rng(5, Stream.SYNTH_SAMPLE, 7, 2).random(3),
                          np.random.default_rng([5, 2, 7, 2]).random(3))
    assert seed_int(1, Stream.SHUFFLE, 2, 3) == int(
        np.random.SeedSequence([1, 12, 2, 3]).generate_state(1, np.uint64)[0])
