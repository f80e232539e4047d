"""insightface-format ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds 2·P encoded images
(JPEG/PNG bytes), pair i being images 2i and 2i+1; ``issame_list`` holds P booleans.

Security: unpickling can execute code. ``load_bin`` therefore uses a restricted unpickler that
refuses every global except the few numpy/codec constructors some published files need; still,
load only files from a source you trust.
"""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import torch
from PIL import Image

from dpface.io import atomic_write

# The published sets need no globals at all (lists of bytes and bools); numpy reconstructors
# cover sets re-saved with numpy arrays, _codecs.encode covers bytes pickled by Python 3 at
# protocol < 3. Anything else (os.system, eval, ...) is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: not expected in a .bin set")
        return super().find_class(module, name)


def _as_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _to_bytes(item, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(
        f"image {index}: expected encoded image bytes, got {type(item).__name__}")


def load_bin(path, image_size=112) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load a ``.bin`` set → (images_a uint8 [P,H,W,3], images_b uint8 [P,H,W,3], issame bool [P]).

    Images are decoded with PIL to RGB and resized (bilinear) to ``image_size`` (int or (H, W))
    when they differ. Strings are read with ``encoding='bytes'`` because the published files
    were written by Python 2. See the module docstring for the unpickling security caveat.
    """
    path = os.fspath(path)
    h, w = _as_size(image_size)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification set not found: {path}")
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
        except Exception as e:  # garbage input can raise almost any exception type
            raise ValueError(f"{path} is not a readable .bin pickle: {e}") from e

    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(
            f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, issame_list = obj
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: bins must be a list of encoded images, got {type(bins).__name__}")
    if not isinstance(issame_list, (list, tuple, np.ndarray)):
        raise ValueError(
            f"{path}: issame_list must be a list of bools, got {type(issame_list).__name__}")
    n_img, n_pairs = len(bins), len(issame_list)
    if n_img % 2:
        raise ValueError(f"{path}: odd number of images ({n_img}); pairs need 2 images each")
    if n_img != 2 * n_pairs:
        raise ValueError(
            f"{path}: {n_img} images make {n_img // 2} pairs but issame_list has {n_pairs} entries")
    issame = np.asarray(issame_list)
    if issame.dtype != np.bool_:
        if issame.size and not np.isin(issame, (0, 1)).all():
            raise ValueError(f"{path}: issame_list must hold booleans")
        issame = issame.astype(bool)
    if n_pairs == 0:
        raise ValueError(f"{path}: holds no pairs: nothing to verify")
    if issame.all() or not issame.any():
        raise ValueError(f"{path}: all {n_pairs} pairs are {'matches' if issame.all() else 'mismatches'}; "
                         "verification needs both (a threshold separates them)")

    images = np.empty((n_img, h, w, 3), dtype=np.uint8)
    for i, item in enumerate(bins):
        data = _to_bytes(item, i)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                images[i] = np.asarray(im)
        except Exception as e:
            raise ValueError(
                f"{path}: image {i} (pair {i // 2}, side {'ab'[i % 2]}) failed to decode: {e}"
            ) from e
    return images[0::2], images[1::2], issame


def _to_nhwc_uint8(images, name: str) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}: torch images must be [P,3,H,W], got {tuple(images.shape)}")
        images = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"{name}: expected uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name}: numpy images must be [P,H,W,3], got {images.shape}")
    return images


def write_bin(path, images_a, images_b, issame, format: str = "png", quality: int = 95) -> None:
    """Write pairs as an insightface ``.bin`` set (the inverse of ``load_bin``).

    ``images_*``: uint8 numpy [P,H,W,3] or torch [P,3,H,W]. ``format``: ``"png"`` (lossless,
    the default so a round trip is exact) or ``"jpeg"`` (``quality``; what published sets use).
    The file is written under a temporary name and renamed, so it is never left half-written.
    """
    a = _to_nhwc_uint8(images_a, "images_a")
    b = _to_nhwc_uint8(images_b, "images_b")
    if a.shape != b.shape:
        raise ValueError(f"images_a {a.shape} and images_b {b.shape} differ in shape")
    issame = np.asarray(issame)
    if issame.shape != (a.shape[0],):
        raise ValueError(f"issame must have shape ({a.shape[0]},), got {issame.shape}")
    fmt = format.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")
    pil_fmt = "PNG" if fmt == "png" else "JPEG"
    opts = {"quality": int(quality)} if pil_fmt == "JPEG" else {}

    bins = []
    for pa, pb in zip(a, b):
        for img in (pa, pb):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img)).save(buf, format=pil_fmt, **opts)
            bins.append(buf.getvalue())
    payload = (bins, [bool(v) for v in issame])

    atomic_write(path, lambda f: pickle.dump(payload, f, protocol=4))
