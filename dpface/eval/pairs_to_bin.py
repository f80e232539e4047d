"""An image folder and an LFW-style ``pairs.txt`` → an insightface ``.bin`` verification set
(``dpface convert pairs-to-bin``), so a user's own photos can be verified like LFW.

``pairs.txt``: an optional header line of one or two integers (LFW's ``10 300``: folds and
pairs per fold), then one pair per line, ``NAME I J`` (the same person: images I and J of
NAME) or ``NAME1 I NAME2 J`` (two people). Image I of NAME is ``ROOT/NAME/NAME_{I:04d}.EXT``
(LFW's naming; .jpg, .jpeg, .png or .bmp). With ``landmarks`` (lines ``NAME/FILE x1 y1 … x5
y5``, five points in image pixels: eyes, nose, mouth corners) every image is aligned to the
ArcFace template; without, images are taken as crops and resized to ``image_size``.

Every line is read and every image decoded before anything is written; a bad line, a missing
or undecodable image, an image without landmarks is a :class:`PairsError` naming the file and
line, and the output is left as it was.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bin_sets import write_bin

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class PairsError(ValueError):
    """A pairs.txt / landmarks line or an image it names is unusable; the message names it."""


def read_pairs(path: Path) -> list[tuple[int, tuple[str, int], tuple[str, int], bool]]:
    """(line number, (name, index) of side a, of side b, same person) per pair line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PairsError(f"{path}: cannot read: {e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        f = line.split()
        if not f or (not out and len(f) <= 2 and all(v.isdigit() for v in f)):
            continue  # blank, or the header
        try:
            if len(f) == 3:
                out.append((i, (f[0], int(f[1])), (f[0], int(f[2])), True))
            elif len(f) == 4:
                out.append((i, (f[0], int(f[1])), (f[2], int(f[3])), False))
            else:
                raise ValueError
        except ValueError:
            raise PairsError(f"{path}:{i}: expected 'NAME I J' or 'NAME1 I NAME2 J', got {line.strip()!r}") from None
    if not out:
        raise PairsError(f"{path}: no pairs listed")
    same = [p[3] for p in out]
    if all(same) or not any(same):
        raise PairsError(f"{path}: all {len(out)} pairs are {'matches' if all(same) else 'mismatches'}; "
                         "verification needs both")
    return out


def read_landmarks(path: Path) -> dict[str, np.ndarray]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PairsError(f"{path}: cannot read: {e}") from None
    out = {}
    for i, line in enumerate(lines, 1):
        f = line.split()
        if not f:
            continue
        try:
            if len(f) != 11:
                raise ValueError
            pts = np.array([float(v) for v in f[1:]]).reshape(5, 2)
            if not np.isfinite(pts).all():
                raise ValueError
        except ValueError:
            raise PairsError(f"{path}:{i}: expected 'NAME/FILE x1 y1 ... x5 y5' (10 finite numbers), "
                             f"got {line.strip()!r}") from None
        out[f[0]] = pts
    return out


def _image_path(root: Path, name: str, index: int) -> Path | None:
    stem = root / name / f"{name}_{index:04d}"
    return next((p for p in (stem.with_suffix(e) for e in EXTENSIONS) if p.is_file()), None)


def pairs_to_bin(root, pairs_txt, out, image_size: int = 112, landmarks=None, format: str = "png",
                 overwrite: bool = False) -> dict:
    """Write the ``.bin``; returns {"pairs", "same", "images", "aligned", "resized"}."""
    from PIL import Image

    from dpface.data.align import align_face

    root, pairs_txt, out = Path(root), Path(pairs_txt), Path(out)
    if out.exists() and not overwrite:
        raise PairsError(f"{out}: exists (pass --overwrite to replace it)")
    if not root.is_dir():
        raise PairsError(f"{root}: no image folder there")
    pairs = read_pairs(pairs_txt)
    lm = read_landmarks(landmarks) if landmarks else None
    cache: dict[Path, np.ndarray] = {}
    resized = 0

    def load(line: int, name: str, index: int) -> np.ndarray:
        nonlocal resized
        p = _image_path(root, name, index)
        if p is None:
            raise PairsError(f"{pairs_txt}:{line}: image {root / name / f'{name}_{index:04d}'}"
                             f"{{{','.join(EXTENSIONS)}}} not found")
        if p not in cache:
            try:
                with Image.open(p) as im:
                    img = np.asarray(im.convert("RGB"))
            except Exception as e:  # any decoder failure
                raise PairsError(f"{pairs_txt}:{line}: image {p} does not decode: {e}") from None
            if lm is not None:
                key = p.relative_to(root).as_posix()
                if key not in lm:
                    raise PairsError(f"{pairs_txt}:{line}: image {key} has no landmarks in {landmarks}")
                img = align_face(img, lm[key], image_size)
            elif img.shape[:2] != (image_size, image_size):
                img = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BILINEAR))
                resized += 1
            cache[p] = img
        return cache[p]

    a = np.stack([load(line, *sa) for line, sa, _, _ in pairs])
    b = np.stack([load(line, *sb) for line, _, sb, _ in pairs])
    same = np.array([p[3] for p in pairs])
    write_bin(out, a, b, same, format=format)
    return {"pairs": len(pairs), "same": int(same.sum()), "images": len(cache), "aligned": lm is not None,
            "resized": resized}


__all__ = ["PairsError", "pairs_to_bin", "read_landmarks", "read_pairs"]
