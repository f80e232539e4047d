"""A synthetic IJB-style template set on disk, in the meta-file layout eval/ijb.py (1:1) and
eval/ijb_1n.py (1:N: galleries G1 and G2, mixed probes) read: mixed-quality faces placed into
loose crops, with noisy landmarks and detector scores (``dpface convert synthetic-ijb``)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpface import seeding
from dpface.data.align import skimage_transform, template_points
from dpface.data.synthetic.faces import SyntheticFaces
from dpface.seeding import Stream, sample_index


def make_synthetic_ijb(out, num_identities: int = 30, templates_per_identity: int = 2,
                       max_media: int = 3, max_faces_per_media: int = 3, identity_offset: int = 100_000,
                       seed: int = 0, image_size: int = 112, prefix: str = "synth",
                       overwrite: bool = False) -> dict:
    """Write an IJB-format set of dpface's synthetic faces to ``out`` in insightface's IJB layout (read by eval/ijb.py).

    Each identity (global synthetic index from ``identity_offset``; keep it beyond the
    training identities) gets ``templates_per_identity`` templates of 1..``max_media``
    media of 1..``max_faces_per_media`` faces each. A face has a quality q ~ U(0, 1): its
    synthetic difficulty is 0.5 + 1.5·(1 − q) and its detector score 0.5 + 0.45·q + noise,
    so low scores mark hard faces. The rendered crop is placed into a 1.5× larger loose
    image by a random similarity (scale 0.75–1.15, rotation ±25°, shift); the landmarks are
    the ArcFace template points carried by that placement, plus noise growing as q falls
    (σ up to 1 px), so alignment brings the crop back. Pairs: every genuine template pair and
    every impostor pair. Returns a summary dict.
    """
    from PIL import Image

    transform = skimage_transform()
    SimilarityTransform, warp = transform.SimilarityTransform, transform.warp

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: not empty (pass overwrite to replace it)")
    (out / "meta").mkdir(parents=True, exist_ok=True)
    (out / "loose_crop").mkdir(exist_ok=True)
    rng = seeding.rng(seed, Stream.IJB_SET, identity_offset, num_identities)
    levels = (0.5, 1.0, 1.5, 2.0)
    renderers = [SyntheticFaces(seed=seed, image_size=image_size, difficulty=d) for d in levels]
    s = image_size
    big = int(round(1.5 * s))
    tmpl = template_points(s)
    lines_tm, lines_lm, template_ident, template_faces = [], [], [], []
    tid = mid = face = 0
    for ident in range(num_identities):
        g = identity_offset + ident
        k = 0
        for _ in range(templates_per_identity):
            tid += 1
            template_ident.append(ident)
            template_faces.append([])
            for _ in range(int(rng.integers(1, max_media + 1))):
                mid += 1
                for _ in range(int(rng.integers(1, max_faces_per_media + 1))):
                    face += 1
                    q = float(rng.random())
                    level = min(int((1 - q) * len(levels)), len(levels) - 1)
                    crop = renderers[level].render(g, sample_index("ijb", k))
                    k += 1
                    scale = float(rng.uniform(0.75, 1.15))
                    rot = float(rng.uniform(-25, 25)) * math.pi / 180
                    place = SimilarityTransform(scale=scale, rotation=rot)
                    corners = place(np.array([[0, 0], [s, 0], [0, s], [s, s]], np.float64))
                    lo, hi = corners.min(0), corners.max(0)
                    shift = [float(rng.uniform(-lo[k], max(-lo[k], big - 1 - hi[k]))) for k in (0, 1)]
                    place = SimilarityTransform(scale=scale, rotation=rot, translation=shift)
                    bg = np.empty((big, big, 3), np.float64)
                    bg[:] = rng.uniform(30, 220, 3)
                    bg += rng.normal(0, 12, (big, big, 1))
                    warped = warp(crop, place.inverse, output_shape=(big, big), order=1,
                                  preserve_range=True)
                    mask = warp(np.ones((s, s)), place.inverse, output_shape=(big, big), order=1)
                    img = mask[..., None] * warped + (1 - mask[..., None]) * bg
                    name = f"{face}.jpg"
                    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(
                        out / "loose_crop" / name, quality=95)
                    pts = place(tmpl) + rng.normal(0, 1.0 * (1 - q), (5, 2))
                    pts = np.clip(pts, 0, big - 1)
                    det = float(np.clip(0.5 + 0.45 * q + rng.normal(0, 0.03), 0.05, 1.0))
                    lines_tm.append(f"{name} {tid} {mid}")
                    template_faces[-1].append(name)
                    lines_lm.append(name + " " + " ".join(f"{v:.2f}" for v in pts.reshape(-1))
                                    + f" {det:.4f}")
    ident_of = np.asarray(template_ident)
    lines_pair = []
    n_pos = 0
    for a in range(tid):
        for b in range(a + 1, tid):
            same = int(ident_of[a] == ident_of[b])
            n_pos += same
            lines_pair.append(f"{a + 1} {b + 1} {same}")
    meta = out / "meta"
    (meta / f"{prefix}_face_tid_mid.txt").write_text("\n".join(lines_tm) + "\n")
    (meta / f"{prefix}_name_5pts_score.txt").write_text("\n".join(lines_lm) + "\n")
    (meta / f"{prefix}_template_pair_label.txt").write_text("\n".join(lines_pair) + "\n")
    # 1:N: the identities split in two galleries (G1, G2) of each one's first template; every
    # other template is a probe (mated in one gallery, non-mated in the other).
    first = {}
    for t, ident in enumerate(template_ident):
        first.setdefault(int(ident), t)
    half = (num_identities + 1) // 2
    lists = {"gallery_G1": [t for i, t in first.items() if i < half],
             "gallery_G2": [t for i, t in first.items() if i >= half],
             "probe_mixed": [t for t in range(tid) if t not in set(first.values())]}
    for kind, ts in lists.items():
        rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"]
        rows += [f"{t + 1},{identity_offset + template_ident[t]},{f}" for t in ts for f in template_faces[t]]
        (meta / f"{prefix}_1N_{kind}.csv").write_text("\n".join(rows) + "\n")
    return {"dir": str(out), "identities": num_identities, "templates": tid, "media": mid,
            "faces": face, "pairs": len(lines_pair), "genuine": n_pos,
            "impostor": len(lines_pair) - n_pos}
