"""Synthetic LFW-style verification pairs over held-out identities."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpface.data.synthetic.faces import SyntheticFaces, _check_int
from dpface.seeding import Stream, sample_index
from dpface.seeding import rng as stream_rng


@dataclass
class PairSet:
    """LFW-style verification pairs; images HWC uint8 like :meth:`SyntheticFaces.render`."""

    images_a: np.ndarray     # uint8 [P, H, W, 3]
    images_b: np.ndarray     # uint8 [P, H, W, 3]
    issame: np.ndarray       # bool [P]
    fold: np.ndarray         # int64 [P], in [0, num_folds)
    identities_a: np.ndarray  # int64 [P], global identity indices
    identities_b: np.ndarray  # int64 [P]
    degradation_a: np.ndarray  # float64 [P], SyntheticFaces.degradation of each image
    degradation_b: np.ndarray  # float64 [P]

    def __len__(self) -> int:
        return int(self.issame.shape[0])


def make_verification_pairs(num_pairs: int, identity_offset: int, num_identities: int,
                            seed: int = 0, image_size: int = 112, difficulty: float = 1.0,
                            num_folds: int = 10) -> PairSet:
    """Balanced same/different pairs over identities [identity_offset, +num_identities).

    Every fold holds num_pairs/num_folds pairs, half of them same-identity. When there
    are at least 2·num_folds identities, the identities are split into num_folds
    disjoint groups and each fold draws only from its own group (as LFW's folds are
    identity-disjoint), so a threshold tuned on nine folds is tested on unseen people.
    No image appears twice in the set: each identity's images use fresh sample indices
    (the "verification" range of ``seeding.SAMPLE_RANGES``).
    """
    num_pairs = _check_int("num_pairs", num_pairs, 1)
    offset = _check_int("identity_offset", identity_offset, 0)
    n_ids = _check_int("num_identities", num_identities, 2)
    num_folds = _check_int("num_folds", num_folds, 1)
    seed = _check_int("seed", seed, 0)
    if num_pairs % (2 * num_folds):
        raise ValueError(
            f"num_pairs ({num_pairs}) must be a multiple of 2*num_folds ({2 * num_folds}) "
            "so every fold holds equally many same and different pairs")
    faces = SyntheticFaces(seed=seed, image_size=image_size, difficulty=difficulty)
    rng = stream_rng(seed, Stream.SYNTH_PAIRS, offset, n_ids, num_pairs, num_folds)
    per_fold = num_pairs // num_folds
    if n_ids >= 2 * num_folds:
        groups = np.array_split(np.arange(n_ids), num_folds)
    else:
        groups = [np.arange(n_ids)] * num_folds
    ids_a, ids_b, same, fold = [], [], [], []
    for f, group in enumerate(groups):
        for k in range(per_fold):
            is_same = k % 2 == 0
            if is_same:
                a = b = rng.choice(group)
            else:
                a, b = rng.choice(group, 2, replace=False)
            ids_a.append(a)
            ids_b.append(b)
            same.append(is_same)
            fold.append(f)
    ids_a = np.asarray(ids_a, np.int64) + offset
    ids_b = np.asarray(ids_b, np.int64) + offset
    next_sample: dict[int, int] = {}

    def fresh(identity: int) -> tuple[np.ndarray, float]:
        k = next_sample.get(identity, 0)
        next_sample[identity] = k + 1
        sample = sample_index("verification", k)
        return faces.render(identity, sample), faces.degradation(identity, sample)

    size = faces.image_size
    images_a = np.empty((num_pairs, size, size, 3), np.uint8)
    images_b = np.empty_like(images_a)
    deg = np.empty((2, num_pairs))
    for i in range(num_pairs):
        images_a[i], deg[0, i] = fresh(int(ids_a[i]))
        images_b[i], deg[1, i] = fresh(int(ids_b[i]))
    return PairSet(images_a=images_a, images_b=images_b, issame=np.asarray(same, bool),
                   fold=np.asarray(fold, np.int64), identities_a=ids_a, identities_b=ids_b,
                   degradation_a=deg[0], degradation_b=deg[1])
