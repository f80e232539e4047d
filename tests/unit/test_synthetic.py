"""Procedural synthetic faces: determinism, long tail, dataset indexing, verification pairs."""
import pickle

import numpy as np
import pytest
import torch

from dpface.data.synthetic.faces import SyntheticFaceDataset, SyntheticFaces, long_tail_counts
from dpface.data.synthetic.pairs import PairSet, make_verification_pairs
from dpface.seeding import sample_index

SIZE = 48  # small images keep the file fast; the geometry is resolution independent


# ---------------------------------------------------------------- rendering
def test_render_shape_dtype_default_size():
    img = SyntheticFaces(seed=0).render(0, 0)
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    assert img.std() > 10  # not a blank canvas


def test_same_seed_same_bytes_across_instances():
    a = SyntheticFaces(seed=7, image_size=SIZE)
    b = SyntheticFaces(seed=7, image_size=SIZE)
    for identity, sample in [(0, 0), (3, 5), (1000, 2), (3, 5)]:  # (3, 5) twice: cache hit
        assert a.render(identity, sample).tobytes() == b.render(identity, sample).tobytes()
    # Order of rendering (and so the cache state) does not matter.
    c = SyntheticFaces(seed=7, image_size=SIZE)
    assert c.render(1000, 2).tobytes() == a.render(1000, 2).tobytes()


def test_numpy_integer_arguments_match_python_ints():
    f = SyntheticFaces(seed=1, image_size=SIZE)
    assert np.array_equal(f.render(np.int64(4), np.int32(2)), f.render(4, 2))


def test_different_seed_sample_identity_give_different_images():
    f = SyntheticFaces(seed=0, image_size=SIZE)
    base = f.render(2, 0)
    assert not np.array_equal(base, f.render(2, 1))
    assert not np.array_equal(base, f.render(3, 0))
    assert not np.array_equal(base, SyntheticFaces(seed=1, image_size=SIZE).render(2, 0))


def test_identity_parameters_differ_across_identities():
    f = SyntheticFaces(seed=0)
    params = [f.identity_params(i) for i in range(20)]
    for key in ("face_r", "eye_dx", "mouth_w", "skin", "blotch"):
        values = [np.asarray(p[key]).tobytes() for p in params]
        assert len(set(values)) == len(values), key
    # Pure function of (seed, identity): asking again, or from another instance, agrees.
    again = SyntheticFaces(seed=0).identity_params(5)
    assert again["eye_dx"] == params[5]["eye_dx"]
    assert SyntheticFaces(seed=1).identity_params(5)["eye_dx"] != params[5]["eye_dx"]


def test_difficulty_scales_nuisance():
    """At difficulty 0 only the background varies, so the face centre is identical;
    with nuisance on, images of one identity differ much more."""
    still = SyntheticFaces(seed=0, image_size=SIZE, difficulty=0.0)
    c = slice(SIZE // 3, 2 * SIZE // 3)
    assert np.array_equal(still.render(1, 0)[c, c], still.render(1, 9)[c, c])

    def spread(difficulty):
        f = SyntheticFaces(seed=0, image_size=SIZE, difficulty=difficulty)
        imgs = np.stack([f.render(1, s).astype(np.float32) for s in range(8)])
        return float(np.abs(imgs[:, c, c] - imgs[:1, c, c]).mean())

    assert spread(0.0) == 0.0
    assert spread(1.0) > 10.0
    assert spread(2.0) > spread(1.0)


def test_pickled_instance_renders_the_same_and_drops_cache():
    f = SyntheticFaces(seed=3, image_size=SIZE)
    expected = f.render(2, 4)
    g = pickle.loads(pickle.dumps(f))
    assert len(g._cache) == 0  # the cache is rebuilt in the worker, not shipped
    assert np.array_equal(g.render(2, 4), expected)


def test_cache_is_bounded():
    f = SyntheticFaces(seed=0, image_size=SIZE, cache_size=3)
    for i in range(6):
        f.render(i, 0)
    assert len(f._cache) == 3


@pytest.mark.parametrize("kwargs", [dict(seed=-1), dict(image_size=0), dict(image_size=-112),
                                    dict(difficulty=-0.5), dict(difficulty=float("nan")),
                                    dict(cache_size=-1), dict(seed=1.5)])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticFaces(**kwargs)


def test_bad_render_arguments():
    f = SyntheticFaces(image_size=SIZE)
    with pytest.raises(ValueError, match="identity"):
        f.render(-1, 0)
    with pytest.raises(ValueError, match="sample"):
        f.render(0, -3)


# ---------------------------------------------------------------- long tail
def test_long_tail_counts_shape_order_and_bounds():
    c = long_tail_counts(500, max_images=60, min_images=2, exponent=1.0)
    assert c.dtype == np.int64 and c.shape == (500,)
    assert np.all(np.diff(c) <= 0)
    assert c.max() == 60 and c.min() == 2
    assert c[1] == 30 and c[2] == 20  # floor(60 / (i+1))
    assert np.array_equal(c, long_tail_counts(500, 60, 2, 1.0))


def test_long_tail_exponent_controls_the_tail():
    assert np.all(long_tail_counts(10, 7, 2, exponent=0.0) == 7)
    steep = long_tail_counts(100, 60, 2, exponent=2.0)
    mild = long_tail_counts(100, 60, 2, exponent=0.5)
    assert steep.sum() < mild.sum()
    assert np.all(steep >= 2) and np.all(mild <= 60)


@pytest.mark.parametrize("args", [(0,), (-3,), (10, 5, 6), (10, 60, 0), (10, 60, 2, -1.0),
                                  (10, 60, 2, float("inf"))])
def test_long_tail_bad_arguments(args):
    with pytest.raises(ValueError):
        long_tail_counts(*args)


# ---------------------------------------------------------------- training dataset
def test_dataset_length_labels_and_locate_agree():
    ds = SyntheticFaceDataset(25, image_size=SIZE, max_images=9, min_images=2, exponent=1.0)
    assert ds.num_classes == 25
    assert np.array_equal(ds.counts, long_tail_counts(25, 9, 2, 1.0))
    assert len(ds) == int(ds.counts.sum())
    labels = ds.labels
    seen = {}
    for i in range(len(ds)):
        label, sample = ds.locate(i)
        assert label == labels[i]
        assert 0 <= sample < ds.counts[label]
        seen.setdefault(label, []).append(sample)
    # Every identity's samples are exactly 0..count-1, in order.
    assert all(seen[k] == list(range(ds.counts[k])) for k in range(25))
    assert ds.locate(-1) == (24, int(ds.counts[24]) - 1)
    with pytest.raises(IndexError):
        ds.locate(len(ds))
    with pytest.raises(IndexError):
        ds.locate(-len(ds) - 1)


def test_dataset_item_is_chw_uint8_and_matches_render():
    ds = SyntheticFaceDataset(6, seed=4, image_size=SIZE, max_images=5, identity_offset=100)
    faces = SyntheticFaces(seed=4, image_size=SIZE)
    for i in (0, 3, len(ds) - 1):
        img, label = ds[i]
        assert isinstance(img, torch.Tensor) and img.dtype == torch.uint8
        assert img.shape == (3, SIZE, SIZE) and img.is_contiguous()
        lab, sample = ds.locate(i)
        assert label == lab and 0 <= label < 6
        expected = faces.render(100 + label, sample)  # global identity = offset + label
        assert np.array_equal(img.permute(1, 2, 0).numpy(), expected)


def test_dataset_is_deterministic_across_instances():
    a = SyntheticFaceDataset(5, seed=2, image_size=SIZE, max_images=4)
    b = SyntheticFaceDataset(5, seed=2, image_size=SIZE, max_images=4)
    for i in (0, 5, len(a) - 1):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_dataloader_batches():
    ds = SyntheticFaceDataset(4, image_size=SIZE, max_images=3)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert x.shape == (5, 3, SIZE, SIZE) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == ds.labels[:5].tolist()


@pytest.mark.parametrize("kwargs", [dict(num_identities=0), dict(num_identities=3, image_size=-1),
                                    dict(num_identities=3, identity_offset=-1),
                                    dict(num_identities=3, max_images=1, min_images=2)])
def test_dataset_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticFaceDataset(**kwargs)


# ---------------------------------------------------------------- verification pairs
@pytest.fixture(scope="module")
def pairs() -> PairSet:
    return make_verification_pairs(60, identity_offset=50, num_identities=30, seed=0,
                                   image_size=SIZE, num_folds=10)


def test_pairs_shapes_and_dtypes(pairs):
    assert len(pairs) == 60
    assert pairs.images_a.shape == pairs.images_b.shape == (60, SIZE, SIZE, 3)
    assert pairs.images_a.dtype == pairs.images_b.dtype == np.uint8
    assert pairs.issame.dtype == bool and pairs.issame.shape == (60,)
    assert pairs.fold.dtype == np.int64 and pairs.identities_a.dtype == np.int64


def test_pairs_balanced_overall_and_per_fold(pairs):
    assert pairs.issame.sum() == 30
    assert np.array_equal(np.bincount(pairs.fold, minlength=10), np.full(10, 6))
    for f in range(10):
        assert pairs.issame[pairs.fold == f].sum() == 3


def test_pairs_identities_are_held_out_and_consistent(pairs):
    ids = np.concatenate([pairs.identities_a, pairs.identities_b])
    assert ids.min() >= 50 and ids.max() < 80  # disjoint from training identities [0, 50)
    assert np.array_equal(pairs.identities_a == pairs.identities_b, pairs.issame)
    # With >= 2 identities per fold the folds use disjoint identities.
    fold_ids = [set(pairs.identities_a[pairs.fold == f]) | set(pairs.identities_b[pairs.fold == f])
                for f in range(10)]
    for f in range(10):
        for g in range(f + 1, 10):
            assert not fold_ids[f] & fold_ids[g]


def test_pairs_images_are_distinct_and_match_render(pairs):
    flat = [im.tobytes() for im in np.concatenate([pairs.images_a, pairs.images_b])]
    assert len(set(flat)) == len(flat)  # every image in the set is a different sample
    # The first image of an identity is the first sample of the "verification" range.
    first = int(pairs.identities_a[0])
    expected = SyntheticFaces(seed=0, image_size=SIZE).render(first, sample_index("verification", 0))
    assert np.array_equal(pairs.images_a[0], expected)


def test_pairs_deterministic_and_seeded(pairs):
    again = make_verification_pairs(60, identity_offset=50, num_identities=30, seed=0, image_size=SIZE)
    for field in ("images_a", "images_b", "issame", "fold", "identities_a", "identities_b"):
        assert np.array_equal(getattr(pairs, field), getattr(again, field)), field
    other = make_verification_pairs(60, identity_offset=50, num_identities=30, seed=1, image_size=SIZE)
    assert not np.array_equal(pairs.images_a, other.images_a)


def test_pairs_with_two_identities():
    p = make_verification_pairs(20, identity_offset=10, num_identities=2, image_size=16)
    assert set(p.identities_a) | set(p.identities_b) == {10, 11}
    assert p.issame.sum() == 10


@pytest.mark.parametrize("kwargs", [dict(num_identities=1), dict(num_identities=0),
                                    dict(num_pairs=0), dict(num_pairs=30),  # 30 % (2*10) != 0
                                    dict(identity_offset=-5), dict(image_size=-8),
                                    dict(num_folds=0), dict(difficulty=-1.0)])
def test_pairs_bad_arguments(kwargs):
    args = dict(num_pairs=20, identity_offset=0, num_identities=5, image_size=16)
    args.update(kwargs)
    with pytest.raises(ValueError):
        make_verification_pairs(**args)


def test_nuisance_is_what_render_applies():
    """The reported degradations are the ones in the pixels: noisy renders carry more
    high-frequency energy than clean ones of the same blur, blurred renders less (at a
    difficulty where the blur reaches ~2 px)."""
    faces = SyntheticFaces(seed=3, image_size=112, difficulty=3)

    def high_freq(img):
        f = img.astype(np.float64).mean(2)
        return float(np.abs(f[1:, 1:] - (f[:-1, 1:] + f[1:, :-1]) / 2).mean())

    rows = [(faces.nuisance(i % 7, k), high_freq(faces.render(i % 7, k))) for i, k in
            zip(range(240), range(1000, 1240))]
    noisy = [h for n, h in rows if n["noise"] > 0.7 and n["blur"] < 0.3]
    quiet = [h for n, h in rows if n["noise"] < 0.1 and n["blur"] < 0.3]
    blurred = [h for n, h in rows if n["noise"] < 0.1 and n["blur"] > 0.7]
    assert min(len(noisy), len(quiet), len(blurred)) >= 5
    assert np.mean(noisy) > 2 * np.mean(quiet) and np.mean(blurred) < 0.85 * np.mean(quiet)
    assert faces.degradation(2, 1001) == pytest.approx(sum(faces.nuisance(2, 1001).values()))
    assert {n["occluded"] for n, _ in rows} == {0.0, 1.0}
