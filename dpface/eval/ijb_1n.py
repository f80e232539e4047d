"""IJB-B/C 1:N identification in the official meta layout: two disjoint galleries (IJB-C
``*_1N_gallery_G1.csv`` / ``G2``, IJB-B ``S1`` / ``S2``) and the mixed-media probe templates
(``*_1N_probe_mixed.csv``), each a CSV with a header naming at least TEMPLATE_ID and
SUBJECT_ID and one row per image of a template. The faces, their landmarks and media come
from the same files as the 1:1 protocol (``ijb.py``), and templates are pooled exactly as
there (``template_features``).

Every probe template is searched in each gallery separately (open set: a probe whose subject
is in the other gallery is non-mated): CMC at ranks 1/5/10 over the mated probes and TPIR at
FPIR 1e-2 / 1e-1 (``identification.tpir_at_fpir``: the threshold from the non-mated probes'
top scores), per gallery and their mean. Bad input raises :class:`ProtocolError` naming the
file and line.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .identification import cmc, search, tpir_at_fpir
from .ijb import IJBSet, ProtocolError, combine_features, load_ijb, mode_name, template_features

RANKS = (1, 5, 10)
FPIRS = (1e-2, 1e-1)
GALLERY_GLOB, PROBE_SUFFIX = "_1N_gallery_*.csv", "_1N_probe_mixed.csv"


@dataclass
class IJB1NSet:
    faces: IJBSet
    galleries: dict[str, tuple[np.ndarray, np.ndarray]]  # "G1" → (template ids, subject ids), one per template
    probes: tuple[np.ndarray, np.ndarray]

    @property
    def name(self) -> str:
        return self.faces.name


def _meta_files(root: Path, pattern: str) -> list[Path]:
    for d in (root / "meta", root):
        found = sorted(d.glob(pattern)) if d.is_dir() else []
        if found:
            return found
    return []


def read_template_list(path: Path, known: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) of a 1:N list, one entry per template (its rows agree)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{path}: cannot read: {e}") from None
    rows = csv.reader(text.splitlines())
    header = [h.strip().upper() for h in next(rows, [])]
    if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
        raise ProtocolError(f"{path}:1: the header must name TEMPLATE_ID and SUBJECT_ID, got {','.join(header)!r}")
    ti, si = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    subject: dict[int, tuple[int, int]] = {}  # template → (subject, first line)
    for i, row in enumerate(rows, 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(ti, si):
            raise ProtocolError(f"{path}:{i}: expected at least {max(ti, si) + 1} fields, got {len(row)}")
        try:
            t, sub = int(row[ti]), int(row[si])
        except ValueError:
            raise ProtocolError(f"{path}:{i}: TEMPLATE_ID and SUBJECT_ID must be integers, "
                                f"got {row[ti]!r}, {row[si]!r}") from None
        if t not in known:
            raise ProtocolError(f"{path}:{i}: template {t} has no faces in the *_face_tid_mid.txt file")
        if t in subject and subject[t][0] != sub:
            raise ProtocolError(f"{path}:{i}: template {t} is subject {sub} here but {subject[t][0]} at line "
                                f"{subject[t][1]}")
        subject.setdefault(t, (sub, i))
    if not subject:
        raise ProtocolError(f"{path}: no templates listed (an empty list)")
    tids = np.array(sorted(subject), np.int64)
    return tids, np.array([subject[t][0] for t in tids], np.int64)


def load_ijb_1n(root) -> IJB1NSet:
    root = Path(root)
    faces = load_ijb(root, pairs=False)
    known = set(faces.templates.tolist())
    gallery_files = _meta_files(root, f"*{GALLERY_GLOB}")
    probe_files = _meta_files(root, f"*{PROBE_SUFFIX}")
    if not gallery_files or len(probe_files) != 1:
        raise ProtocolError(f"{root}: the 1:N protocol needs *{GALLERY_GLOB} gallery lists and one *{PROBE_SUFFIX} "
                            f"(looked in {root / 'meta'} and {root}); found {len(gallery_files)} and "
                            f"{len(probe_files)}")
    galleries = {}
    for path in gallery_files:
        galleries[path.stem.rsplit("_", 1)[-1]] = read_template_list(path, known)
    return IJB1NSet(faces=faces, galleries=galleries, probes=read_template_list(probe_files[0], known))


def evaluate_ijb_1n_features(s: IJB1NSet, feats, flipped=None, flip: bool = True, norm_score: bool = True,
                             detector_score: bool = True, ranks=RANKS, fpirs=FPIRS) -> dict:
    """One test mode on precomputed face features → {"mode", gallery: {...}, "mean": {...},
    "cmc": {gallery: (ranks, rates)}}, each gallery with ``rank<k>`` (CMC), ``tpir@fpir=<f>``,
    and its mated / non-mated probe counts."""
    if flip and flipped is None:
        raise ValueError("flip=True needs the flipped features")
    x = combine_features(feats, flipped if flip else None, s.faces.det_scores if detector_score else None,
                         norm_score)
    tids, tf = template_features(x, s.faces.templates, s.faces.medias)

    def feat(ids):
        return tf[np.searchsorted(tids, ids)]

    p_ids, p_sub = s.probes
    out: dict = {"mode": mode_name(flip, norm_score, detector_score), "cmc": {}}
    for name, (g_ids, g_sub) in s.galleries.items():
        r = search(feat(g_ids), g_sub, feat(p_ids), p_sub)
        if not r["mated"].any():
            raise ProtocolError(f"{s.name} 1:N gallery {name}: no probe's subject is in it")
        row = {f"rank{k}": v for k, v in cmc(r, ranks).items()}
        row.update({f"tpir@fpir={f:g}": v for f, v in tpir_at_fpir(r, fpirs).items()})
        row.update(mated=int(r["mated"].sum()), non_mated=int((~r["mated"]).sum()), gallery=int(g_ids.size))
        out[name] = row
        ks = np.arange(1, min(int(g_ids.size), 20) + 1)
        out["cmc"][name] = (ks, [cmc(r, (int(k),))[int(k)] for k in ks])
    names = list(s.galleries)
    keys = [k for k in out[names[0]] if k.startswith(("rank", "tpir"))]
    out["mean"] = {k: float(np.mean([out[n][k] for n in names])) for k in keys}
    return out


__all__ = ["IJB1NSet", "load_ijb_1n", "evaluate_ijb_1n_features", "read_template_list"]
