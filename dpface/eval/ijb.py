"""IJB-B/C-style 1:1 template verification, reading insightface's meta-file layout.

A set directory holds ``meta/`` (or the files at its top level) with

- ``*_face_tid_mid.txt``: one face per line, ``IMAGE TEMPLATE_ID MEDIA_ID``;
- ``*_name_5pts_score.txt``: ``IMAGE x1 y1 … x5 y5 DETECTOR_SCORE`` (left eye, right eye,
  nose, left and right mouth corner, in image pixels);
- ``*_template_pair_label.txt``: ``TEMPLATE_1 TEMPLATE_2 LABEL`` (1 = same person);

and the images under ``loose_crop/`` (or the top level). Faces are joined by image name.

The protocol is insightface's ``eval_ijbc.py``: every face is aligned to the ArcFace
112×112 five-point template by a similarity transform (scikit-image estimates and warps),
embedded (raw backbone output; with ``flip`` the features of the image and its mirror are
summed), optionally L2-normalised (``norm_score=False``: the feature norm is dropped) and
optionally multiplied by the detector score; within a template, faces of one media (the
frames of one video, or one still) are averaged, media features are summed, and the sum is
L2-normalised. A pair's score is the cosine of its two templates. TAR at FAR 1e-6 … 1e-1
uses ``tar_at_far``: strict by default (accept when score > t; NaN where there are fewer than
1/FAR impostor pairs), or with ``eval.tar_convention: nearest`` insightface's nearest ROC point
(which can report a FAR it did not reach) for comparison with published tables.

Bad input raises :class:`ProtocolError` with the file and line it comes from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpface.data.align import align_face

from .verification import roc_curve, tar_at_far

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
META_SUFFIXES = {"tid_mid": "_face_tid_mid.txt", "pairs": "_template_pair_label.txt",
                 "landmarks": "_name_5pts_score.txt"}


class ProtocolError(ValueError):
    """An evaluation set is malformed; the message names the file (and line)."""


# ----------------------------------------------------------------------------- meta files


@dataclass
class IJBSet:
    name: str                # the meta files' prefix, e.g. "ijbc"
    image_dir: Path
    images: list[str]        # face f's image file, relative to image_dir
    landmarks: np.ndarray    # float64 [F, 5, 2]
    det_scores: np.ndarray   # float64 [F]
    templates: np.ndarray    # int64 [F]
    medias: np.ndarray       # int64 [F]
    pairs: np.ndarray        # int64 [P, 2] template ids
    issame: np.ndarray       # bool [P]
    where: list[str]         # face f's landmark line "file:line", for error messages

    def __len__(self) -> int:
        return len(self.images)


def _find_meta(root: Path, kind: str) -> Path:
    suffix = META_SUFFIXES[kind]
    for d in (root / "meta", root):
        found = sorted(d.glob(f"*{suffix}")) if d.is_dir() else []
        if len(found) > 1:
            raise ProtocolError(f"{d}: several *{suffix} files ({', '.join(f.name for f in found)})")
        if found:
            return found[0]
    raise ProtocolError(f"{root}: missing meta file *{suffix} (looked in {root / 'meta'} and {root})")


def _rows(path: Path, nfields: int, form: str):
    """(line number, fields) of every non-blank line; a wrong field count names the line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{path}: cannot read: {e}") from None
    for i, line in enumerate(text.splitlines(), 1):
        f = line.split()
        if not f:
            continue
        if len(f) != nfields:
            raise ProtocolError(
                f"{path}:{i}: expected '{form}' ({nfields} fields), got {len(f)}: {line.strip()!r}")
        yield i, f


def _num(path: Path, i: int, value: str, kind, what: str):
    try:
        x = kind(value)
    except ValueError:
        raise ProtocolError(f"{path}:{i}: {what} must be {'an integer' if kind is int else 'a number'}, "
                            f"got {value!r}") from None
    if kind is float and not math.isfinite(x):
        raise ProtocolError(f"{path}:{i}: {what} must be finite, got {value!r}")
    return x


def load_ijb(root, pairs: bool = True) -> IJBSet:
    """Read and cross-check the three meta files of an IJB-format set directory (without the
    template pairs when ``pairs`` is False: the 1:N protocol needs only the faces)."""
    root = Path(root)
    if not root.is_dir():
        raise ProtocolError(f"{root}: no IJB set directory there")
    tm_path, lm_path = (_find_meta(root, k) for k in ("tid_mid", "landmarks"))
    pair_path = _find_meta(root, "pairs") if pairs else None
    image_dir = root / "loose_crop" if (root / "loose_crop").is_dir() else root

    lm: dict[str, tuple[int, np.ndarray, float]] = {}
    for i, f in _rows(lm_path, 12, "IMAGE x1 y1 ... x5 y5 SCORE"):
        if f[0] in lm:
            raise ProtocolError(f"{lm_path}:{i}: image {f[0]} listed twice (first at line {lm[f[0]][0]})")
        pts = np.array([_num(lm_path, i, v, float, "a landmark coordinate") for v in f[1:11]]).reshape(5, 2)
        score = _num(lm_path, i, f[11], float, "the detector score")
        lm[f[0]] = (i, pts, score)

    images, where, pts, scores, tids, mids = [], [], [], [], [], []
    for i, f in _rows(tm_path, 3, "IMAGE TEMPLATE_ID MEDIA_ID"):
        tid = _num(tm_path, i, f[1], int, "the template id")
        mid = _num(tm_path, i, f[2], int, "the media id")
        if f[0] not in lm:
            raise ProtocolError(f"{tm_path}:{i}: image {f[0]} has no landmarks in {lm_path}")
        j, p, s = lm[f[0]]
        images.append(f[0])
        where.append(f"{lm_path}:{j}")
        pts.append(p)
        scores.append(s)
        tids.append(tid)
        mids.append(mid)
    if not images:
        raise ProtocolError(f"{tm_path}: no faces listed")
    have = set(tids)
    pairs, same = [], []
    for i, f in _rows(pair_path, 3, "TEMPLATE_1 TEMPLATE_2 LABEL") if pair_path else ():
        a = _num(pair_path, i, f[0], int, "a template id")
        b = _num(pair_path, i, f[1], int, "a template id")
        y = _num(pair_path, i, f[2], int, "the label")
        if y not in (0, 1):
            raise ProtocolError(f"{pair_path}:{i}: the label must be 0 or 1, got {f[2]!r}")
        for t in (a, b):
            if t not in have:
                raise ProtocolError(f"{pair_path}:{i}: template {t} has no faces in {tm_path}")
        pairs.append((a, b))
        same.append(bool(y))
    if pair_path and not pairs:
        raise ProtocolError(f"{pair_path}: no template pairs listed")
    prefix = tm_path.name[: -len(META_SUFFIXES["tid_mid"])] or root.name
    return IJBSet(name=prefix, image_dir=image_dir, images=images,
                  landmarks=np.asarray(pts, np.float64), det_scores=np.asarray(scores, np.float64),
                  templates=np.asarray(tids, np.int64), medias=np.asarray(mids, np.int64),
                  pairs=np.asarray(pairs, np.int64).reshape(-1, 2), issame=np.asarray(same, bool), where=where)


def read_aligned(s: IJBSet, f: int, size: int = 112) -> np.ndarray:
    """Face ``f`` of the set, decoded, checked and aligned: uint8 [size, size, 3]."""
    from PIL import Image

    path = s.image_dir / s.images[f]
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ProtocolError(f"{path} (listed at {s.where[f]}): image file not found") from None
    except Exception as e:  # PIL raises several kinds for a corrupt file
        raise ProtocolError(f"{path} (listed at {s.where[f]}): image does not decode: "
                            f"{type(e).__name__}: {e}") from None
    h, w = img.shape[:2]
    p = s.landmarks[f]
    bad = np.nonzero((p[:, 0] < 0) | (p[:, 0] > w - 1) | (p[:, 1] < 0) | (p[:, 1] > h - 1))[0]
    if bad.size:
        k = int(bad[0])
        raise ProtocolError(f"{s.where[f]}: landmark {k + 1} of {s.images[f]} at "
                            f"({p[k, 0]:g}, {p[k, 1]:g}) lies outside its {w}x{h} image")
    try:
        return align_face(img, p, size)
    except ValueError as e:
        raise ProtocolError(f"{s.where[f]}: {e}") from None


# ----------------------------------------------------------------------------- features


def face_features(model: torch.nn.Module, s: IJBSet, batch_size: int = 64, device="cpu",
                  size: int = 112, flip: bool = True, progress=None):
    """Raw (un-normalised) features of every face → (feats [F, D], flipped [F, D] or None),
    float32 numpy. Images are read and aligned one batch at a time."""
    from dpface.data.transforms import hflip, normalize

    from .embeddings import _forward

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    feats, flipped = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(s), batch_size):
                crops = np.stack([read_aligned(s, f, size)
                                  for f in range(start, min(start + batch_size, len(s)))])
                x = torch.from_numpy(crops).permute(0, 3, 1, 2).to(device)
                feats.append(_forward(model, normalize(x)).float().cpu().numpy())
                if flip:
                    flipped.append(_forward(model, normalize(hflip(x))).float().cpu().numpy())
                if progress is not None:
                    progress(min(start + batch_size, len(s)), len(s))
    finally:
        for m, was in modes:
            m.training = was
    return np.concatenate(feats), (np.concatenate(flipped) if flip else None)


def combine_features(feats, flipped=None, det_scores=None, norm_score: bool = True) -> np.ndarray:
    """insightface's test modes on raw features: ``flipped`` given → the sum of both views;
    ``norm_score=False`` → each face L2-normalised (its norm no longer weighs it);
    ``det_scores`` given → each face multiplied by its detector score."""
    x = np.asarray(feats, np.float64)
    if flipped is not None:
        x = x + np.asarray(flipped, np.float64)
    if not norm_score:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if det_scores is not None:
        x = x * np.asarray(det_scores, np.float64)[:, None]
    return x


def template_features(face_feats, templates, medias) -> tuple[np.ndarray, np.ndarray]:
    """Media pooling → (template ids sorted [T], L2-normalised template features [T, D]):
    faces of one media are averaged, the media of a template are summed, the sum normalised."""
    x = np.asarray(face_feats, np.float64)
    templates = np.asarray(templates)
    medias = np.asarray(medias)
    tids, t_index = np.unique(templates, return_inverse=True)
    # one row per (template, media): its mean face feature
    keys = np.stack([t_index, medias], axis=1)
    _, tm_index = np.unique(keys, axis=0, return_inverse=True)
    tm_index = tm_index.reshape(-1)
    n_tm = int(tm_index.max()) + 1
    sums = np.zeros((n_tm, x.shape[1]))
    np.add.at(sums, tm_index, x)
    counts = np.bincount(tm_index, minlength=n_tm)[:, None]
    media_t = np.zeros(n_tm, np.int64)
    media_t[tm_index] = t_index
    out = np.zeros((tids.size, x.shape[1]))
    np.add.at(out, media_t, sums / counts)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return tids, out


def template_pair_scores(tids, tfeats, pairs) -> np.ndarray:
    """Cosine of each pair's two (normalised) template features → float64 [P]."""
    pairs = np.asarray(pairs, np.int64)
    idx = np.searchsorted(tids, pairs)
    return np.einsum("ij,ij->i", tfeats[idx[:, 0]], tfeats[idx[:, 1]])


def evaluate_ijb_features(s: IJBSet, feats, flipped=None, flip: bool = True, norm_score: bool = True,
                          detector_score: bool = True, fars=IJB_FARS, tar_convention: str = "strict") -> dict:
    """One test mode on precomputed features → {"scores", "tar_at_far", "roc", "mode"}."""
    if flip and flipped is None:
        raise ValueError("flip=True needs the flipped features")
    x = combine_features(feats, flipped if flip else None,
                         s.det_scores if detector_score else None, norm_score)
    tids, tf = template_features(x, s.templates, s.medias)
    scores = template_pair_scores(tids, tf, s.pairs)
    return {"mode": mode_name(flip, norm_score, detector_score), "scores": scores,
            "tar_at_far": tar_at_far(scores, s.issame, fars, tar_convention), "roc": roc_curve(scores, s.issame)}


def mode_name(flip: bool, norm_score: bool, detector_score: bool) -> str:
    """A short key for a test mode, e.g. ``flip+norm+det`` or ``noflip-nonorm-nodet``."""
    return "".join([("flip" if flip else "noflip"), ("+norm" if norm_score else "-nonorm"),
                    ("+det" if detector_score else "-nodet")])
