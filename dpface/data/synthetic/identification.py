"""A synthetic 1:N set over held-out identities: one gallery image per mated identity,
``probes`` probe images of every identity (the non-mated ones have no gallery entry), and
distractors from identities beyond them, all rendered from the "identification" range of
sample indices."""
from __future__ import annotations

import numpy as np

from dpface.data.synthetic.faces import SyntheticFaces
from dpface.seeding import sample_index


def make_identification(first_identity: int, identities: int, probes: int, nonmated: float,
                        distractors: int, *, seed: int, image_size: int, difficulty: float):
    """(gallery images, gallery ids, probe images, probe ids, distractor images or None)
    over identities [first_identity, +identities); the last ``round(nonmated·identities)``
    are not in the gallery, distractors come from the identities after them."""
    faces = SyntheticFaces(seed=seed, image_size=image_size, difficulty=difficulty)
    n_mated = identities - int(round(nonmated * identities))
    if n_mated < 1:
        raise ValueError(f"--nonmated-fraction {nonmated} leaves no identity in the gallery")
    ids = np.arange(first_identity, first_identity + identities)
    gal = np.stack([faces.render(int(i), sample_index("identification", 0)) for i in ids[:n_mated]])
    prb = np.stack([faces.render(int(i), sample_index("identification", 1 + k))
                    for i in ids for k in range(probes)])
    dis = (np.stack([faces.render(int(first_identity + identities + j), sample_index("identification", 0))
                     for j in range(distractors)]) if distractors else None)
    return gal, ids[:n_mated], prb, np.repeat(ids, probes), dis
