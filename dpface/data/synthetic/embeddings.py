"""Simulated embedding pools for tests and benchmarks (no network needed).

An identity is a random centre on the unit sphere in R^D; its images are centre + noise,
the noise isotropic Gaussian with per-coordinate sd ``spread / sqrt(D)`` (so its norm is
about ``spread``), then L2-normalised. Identity sizes follow dpface's long tail,
floor(max_size · (i+1)^-exponent) clipped to [min_size, max_size], shuffled.
"""
from __future__ import annotations

import numpy as np

from dpface import seeding
from dpface.data.synthetic.faces import long_tail_counts
from dpface.seeding import Stream


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embedding_pool(num_identities: int, dim: int = 64, *, spread=0.5, max_size: int = 30, min_size: int = 2,
                   exponent: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, D] unit embeddings, int64 [N] identity labels). ``spread`` is one number or
    a (low, high) range each identity draws its own spread from, uniformly."""
    rng = seeding.rng(seed, Stream.CLUSTER_POOL, 0)
    sizes = rng.permutation(long_tail_counts(num_identities, max_size, min_size, exponent))
    centres = _unit(rng.standard_normal((num_identities, dim)))
    lo, hi = (spread, spread) if np.isscalar(spread) else spread
    spreads = rng.uniform(lo, hi, num_identities)
    labels = np.repeat(np.arange(num_identities), sizes)
    noise = rng.standard_normal((labels.size, dim)) * (spreads[labels] / np.sqrt(dim))[:, None]
    return _unit(centres[labels] + noise).astype(np.float32), labels.astype(np.int64)


def twins_pool(num_twins: int, num_loose: int, dim: int = 32, *, size: int = 10, tight: float = 0.15,
               twin_cos: float = 0.85, loose: float = 0.9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pool one global distance threshold cannot cluster: ``num_twins`` pairs of tight
    identities (spread ``tight``) whose centres are only ``twin_cos`` apart, and ``num_loose``
    isolated identities of a wide spread ``loose``, ``size`` images each.

    The two twins' members are closer to each other (cosine ~ twin_cos) than a loose
    identity's members are to one another (~1/(1+loose²)), so a threshold that joins the loose
    identities merges the twins, and one that separates the twins splits the loose ones. Locally
    the two are easy to tell apart: around a twin member its own identity is a tight group with
    a clear gap to the other one, around a loose member there is no other identity near at all.
    """
    rng = seeding.rng(seed, Stream.CLUSTER_POOL, 1)
    feats, labels, ident = [], [], 0
    for _ in range(num_twins):
        a = _unit(rng.standard_normal(dim))
        r = _unit(rng.standard_normal(dim) - a * (a @ rng.standard_normal(dim)))
        r = _unit(r - a * (a @ r))  # orthogonal to a
        b = twin_cos * a + np.sqrt(1 - twin_cos ** 2) * r
        for c in (a, b):
            feats.append(c + rng.standard_normal((size, dim)) * tight / np.sqrt(dim))
            labels += [ident] * size
            ident += 1
    for _ in range(num_loose):
        c = _unit(rng.standard_normal(dim))
        feats.append(c + rng.standard_normal((size, dim)) * loose / np.sqrt(dim))
        labels += [ident] * size
        ident += 1
    return _unit(np.concatenate(feats)).astype(np.float32), np.asarray(labels, np.int64)


def face_like_pool(num_identities: int, dim: int = 128, *, max_size: int = 40, min_size: int = 3,
                   exponent: float = 0.7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pool whose difficulty varies the way a trained network's face embeddings do, so that
    no single global threshold fits every identity (:func:`embedding_pool` has one isotropic
    spread per identity, which a threshold separates almost perfectly):

    * demographics: identity centres lean towards one of 32 group directions, so impostors of
      one group are more alike than others;
    * per-identity spread, log-normal: some people vary little across photos, some a lot;
    * modes: a third of the identities have two (age, pose, make-up), ~0.74 cosine apart
      (the second is the centre plus noise of norm 0.9);
    * quality: each image has a quality q ~ Beta(4, 1.5); a degraded image drifts towards a
      shared "low quality" direction, so low-quality images of different people look alike
      (the hub of poor crops real pools have) while it moves away from its own identity.

    The resulting statistics (within/between identity cosine and the spread of the former
    across identities) are printed by ``benchmarks/gcn_vs_baselines.py``.
    """
    rng = seeding.rng(seed, Stream.CLUSTER_POOL, 2)
    sizes = rng.permutation(long_tail_counts(num_identities, max_size, min_size, exponent))
    groups = _unit(rng.standard_normal((32, dim)))
    centres = _unit(0.45 * groups[rng.integers(0, 32, num_identities)]
                    + rng.standard_normal((num_identities, dim)) / np.sqrt(dim))
    spreads = np.exp(rng.normal(np.log(0.7), 0.3, num_identities))
    two_modes = rng.random(num_identities) < 1 / 3
    modes = np.stack([centres, _unit(centres + rng.standard_normal((num_identities, dim)) * 0.9 / np.sqrt(dim))], 1)
    labels = np.repeat(np.arange(num_identities), sizes)
    mode = np.where(two_modes[labels], rng.integers(0, 2, labels.size), 0)
    noise = rng.standard_normal((labels.size, dim)) * (spreads[labels] / np.sqrt(dim))[:, None]
    clean = _unit(modes[labels, mode] + noise)
    low = _unit(rng.standard_normal(dim))
    q = rng.beta(4.0, 1.5, labels.size)[:, None]
    junk = _unit(low + rng.standard_normal((labels.size, dim)) * 1.2 / np.sqrt(dim))
    return _unit(q * clean + (1 - q) * junk).astype(np.float32), labels.astype(np.int64)
