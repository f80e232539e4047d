"""P×K identity-balanced batches: shape, balance, rank disjointness, determinism."""
from collections import Counter

import numpy as np
import pytest
import torch

from dpface.data.streams.pk_sampler import PKBatchSampler, PKMapStream

# Long tail: identity i has max(1, 20 // (i+1)) images; labels shuffled in index order.
COUNTS = [max(1, 20 // (i + 1)) for i in range(30)]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(30), COUNTS))
P, K = 4, 3


def first(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_batches_are_p_identities_times_k_images():
    s = PKBatchSampler(LABELS, P, K, seed=1)
    assert s.batch_size == P * K
    for batch in first(s, 50):
        assert len(batch) == P * K
        labels = LABELS[batch]
        groups = [labels[i:i + K] for i in range(0, P * K, K)]
        assert all(len(set(g)) == 1 for g in groups), "K consecutive images per identity"
        assert len({g[0] for g in groups}) == P, "P distinct identities"
        for g, idx in zip(groups, (batch[i:i + K] for i in range(0, P * K, K))):
            n = COUNTS[g[0]]
            # Distinct images when the identity has K; all of them (plus repeats) if not.
            assert len(set(idx)) == min(n, K)


def test_ranks_get_disjoint_identities_and_same_draw_as_one_rank():
    world = 3
    ranks = [PKBatchSampler(LABELS, P, K, rank=r, world_size=world, seed=5) for r in range(world)]
    for k in range(20):
        ids = [set(LABELS[s.batch(k)]) for s in ranks]
        assert sum(map(len, ids)) == P * world and len(set.union(*ids)) == P * world
    # A rank's identities do not depend on how the draw is split: one rank with
    # P·world identities sees the same identities, and the same images of each.
    whole = PKBatchSampler(LABELS, P * world, K, seed=5)
    assert whole.batch(4) == sum((s.batch(4) for s in ranks), [])


def test_deterministic_and_resumable():
    a = first(PKBatchSampler(LABELS, P, K, seed=9), 12)
    assert a == first(PKBatchSampler(LABELS, P, K, seed=9), 12)
    assert first(PKBatchSampler(LABELS, P, K, seed=9, start=7), 5) == a[7:12]
    assert a != first(PKBatchSampler(LABELS, P, K, seed=10), 12)
    assert a[0] != a[1]


def test_identities_are_drawn_uniformly():
    """Identity balance: over many batches every identity appears about equally often,
    regardless of its image count (head 20 images, tail 1)."""
    s = PKBatchSampler(LABELS, P, K, seed=2)
    counts = Counter()
    n_batches = 1500
    for batch in first(s, n_batches):
        counts.update(set(LABELS[batch].tolist()))
    expected = n_batches * P / 30  # 200
    assert set(counts) == set(range(30))
    assert all(abs(c - expected) < 5 * expected ** 0.5 for c in counts.values())


def test_errors():
    with pytest.raises(ValueError, match=r"needs 40 distinct identities per step \(20 per rank "
                                         r"× 2 ranks\) but the dataset has 30"):
        PKBatchSampler(LABELS, 20, K, world_size=2)
    with pytest.raises(ValueError, match="images_per_identity must be an integer >= 1"):
        PKBatchSampler(LABELS, P, 0)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        PKBatchSampler(LABELS, P, K, rank=2, world_size=2)
    with pytest.raises(ValueError, match="1-D integer array"):
        PKBatchSampler(LABELS.astype(float), P, K)


class TinySet(torch.utils.data.Dataset):
    def __init__(self):
        self.labels = LABELS
        self.num_classes = 30

    def __len__(self):
        return len(LABELS)

    def __getitem__(self, i):
        return torch.full((1, 2, 2), i, dtype=torch.uint8), int(LABELS[i])


def test_stream_batches_and_resume():
    s = PKMapStream(TinySet(), P, K, seed=3)
    it = iter(s)
    batches = [next(it) for _ in range(4)]
    assert all(img.shape == (P * K, 1, 2, 2) for img, _ in batches)
    sampler = PKBatchSampler(LABELS, P, K, seed=3)
    for k, (img, lab) in enumerate(batches):
        assert img[:, 0, 0, 0].tolist() == sampler.batch(k)
        assert lab.tolist() == LABELS[sampler.batch(k)].tolist()
    state = s.state_dict()
    again = PKMapStream(TinySet(), P, K, seed=3)
    again.load_state_dict(state)
    img, _ = next(iter(again))
    assert img[:, 0, 0, 0].tolist() == sampler.batch(4)
