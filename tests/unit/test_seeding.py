"""dpface.seeding: named streams never coincide; pre-existing streams keep their values; the
synthetic sets render disjoint sample indices."""
import itertools

import numpy as np
import pytest

from dpface.seeding import SAMPLE_RANGES, Stream, rng, sample_index, seed_int

# The parts each consumer passes (data/streams, data/synthetic, heads/), over small values.
SMALL = range(4)
PARTS = {
    Stream.LOADER_ORDER: [(e,) for e in SMALL],
    Stream.DALI: [(r,) for r in SMALL],
    Stream.DATA_SOURCE: [(i,) for i in SMALL],
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
    Stream.ELASTIC_MARGIN: [(s,) for s in SMALL],
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


# -- synthetic sample-index ranges -------------------------------------------------------
def test_sample_ranges_are_disjoint_and_bounded():
    spans = sorted(SAMPLE_RANGES.values())
    assert all(lo < hi for lo, hi in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    lo, hi = SAMPLE_RANGES["templates"]
    assert sample_index("templates", 0) == lo and sample_index("templates", hi - lo - 1) == hi - 1
    with pytest.raises(ValueError, match="outside its range"):
        sample_index("templates", hi - lo)


def test_each_synthetic_set_renders_only_its_own_sample_indices(monkeypatch, tmp_path):
    """Every generator, run on the same identities, renders (identity, sample) pairs from its
    own range only, so no two sets share an image (the 1:N set once rendered the templates')."""
    pytest.importorskip("skimage")
    from dpface.data.synthetic import faces, identification, ijb, pairs, templates

    seen: dict[str, set] = {}
    current = []

    def record(self, identity, sample):
        seen.setdefault(current[0], set()).add((int(identity), int(sample)))
        return np.zeros((self.image_size, self.image_size, 3), np.uint8)

    monkeypatch.setattr(faces.SyntheticFaces, "render", record)
    runs = {
        "verification": lambda: pairs.make_verification_pairs(8, identity_offset=10, num_identities=4,
                                                               image_size=16, num_folds=2),
        "templates": lambda: templates.make_templates(4, identity_offset=10, image_size=16),
        "identification": lambda: identification.make_identification(
            10, 4, 2, 0.25, 2, seed=0, image_size=16, difficulty=1.0),
        "ijb": lambda: ijb.make_synthetic_ijb(tmp_path / "ijb", num_identities=4, identity_offset=10,
                                              image_size=16),
    }
    for kind, run in runs.items():
        current[:] = [kind]
        run()
    lo_hi = {k: SAMPLE_RANGES[k] for k in runs}
    for kind, pairs_seen in seen.items():
        lo, hi = lo_hi[kind]
        assert pairs_seen and all(lo <= s < hi for _, s in pairs_seen), kind
    kinds = sorted(seen)
    for a, b in itertools.combinations(kinds, 2):
        assert not seen[a] & seen[b], (a, b)
    assert {i for i, _ in seen["identification"]} & {i for i, _ in seen["templates"]}  # same people
