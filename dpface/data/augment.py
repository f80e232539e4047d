"""The augmentations of the shard streams: one table, each entry in a numpy and a DALI form.

``data.augment`` names entries of :data:`AUGMENTS`; both forms apply them in the table's
order. WebDatasetStream applies the numpy form to each decoded HWC uint8 image, driven
by :data:`N_DRAWS` uniforms drawn for every raw sample whichever entries are enabled, so
the draws stay aligned with the samples (a resume skips samples without decoding them).
DaliStream builds the DALI form into its pipeline, where DALI's random operators (seeded
by the pipeline) make the draws: the two backends agree in distribution, not per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dpface.registry import closest


@dataclass(frozen=True)
class Augmentation:
    doc: str
    draws: tuple[int, ...]  # which of the N_DRAWS per-sample uniforms the numpy form reads
    numpy: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (HWC uint8, its uniforms) → HWC uint8
    # (fn, images, size, final) → images inside a DALI pipeline; ``final`` collects
    # arguments for the pipeline's closing crop_mirror_normalize.
    dali: Callable[[Any, Any, int, dict], Any]
    resizes: bool = False  # the DALI form resizes to the output side itself


def _pad(size: int) -> int:
    return max(1, size // 28)  # the crop's shift: up to ~3.5 % of the side


def _crop_np(img: np.ndarray, u: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    p = _pad(h)
    padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode="edge")
    x, y = int(u[0] * (2 * p + 1)), int(u[1] * (2 * p + 1))
    return padded[y:y + h, x:x + w]


def _crop_dali(fn, images, size: int, final: dict):
    # slight zoom + shift: resize up by 2p, then a random size² window
    p = _pad(size)
    images = fn.resize(images, resize_x=size + 2 * p, resize_y=size + 2 * p)
    return fn.crop(images, crop=(size, size), crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                   crop_pos_y=fn.random.uniform(range=(0.0, 1.0)))


def _color_np(img: np.ndarray, u: np.ndarray) -> np.ndarray:
    b, c = 0.8 + 0.4 * u[0], 0.8 + 0.4 * u[1]
    f = img.astype(np.float32)
    mean = f.mean()
    return np.clip((f - mean) * c + mean * b, 0, 255).astype(np.uint8)


def _color_dali(fn, images, size: int, final: dict):
    return fn.brightness_contrast(images, brightness=fn.random.uniform(range=(0.8, 1.2)),
                                  contrast=fn.random.uniform(range=(0.8, 1.2)))


def _flip_np(img: np.ndarray, u: np.ndarray) -> np.ndarray:
    return img[:, ::-1] if u[0] < 0.5 else img


def _flip_dali(fn, images, size: int, final: dict):
    final["mirror"] = fn.random.coin_flip(probability=0.5)  # mirrored by the closing op
    return images


AUGMENTS: dict[str, Augmentation] = {
    "crop": Augmentation("random shift by up to size/28 px (edge-padded; DALI: zoom + crop)",
                         (1, 2), _crop_np, _crop_dali, resizes=True),
    "color": Augmentation("brightness and contrast, each in [0.8, 1.2]", (3, 4), _color_np, _color_dali),
    "flip": Augmentation("random horizontal flip", (0,), _flip_np, _flip_dali),
}
N_DRAWS = 1 + max(i for a in AUGMENTS.values() for i in a.draws)


def augment_problem(names) -> str | None:
    """What is wrong with a list of augmentation names (worded to follow the key), or None."""
    if not isinstance(names, (list, tuple)):
        return f"must be a list of augmentation names ({', '.join(AUGMENTS)}), got {names!r}"
    for name in names:
        if name not in AUGMENTS:
            return (f"has unknown augmentation {name!r}{closest(str(name), AUGMENTS)}; "
                    f"valid: {', '.join(AUGMENTS)}")
    return None


def check_augment(names) -> tuple[str, ...]:
    """``names`` as a tuple; ValueError for an unknown name."""
    names = tuple(names or ())
    problem = augment_problem(names)
    if problem:
        raise ValueError(f"augment {problem}")
    return names


def apply_numpy(img: np.ndarray, draws: np.ndarray, names) -> np.ndarray:
    """The enabled augmentations on one HWC uint8 image, from its N_DRAWS uniforms."""
    for name, a in AUGMENTS.items():
        if name in names:
            img = a.numpy(img, draws[list(a.draws)])
    return img


def apply_dali(fn, images, names, size: int, stored_size: int | None):
    """The enabled augmentations as DALI operators on decoded images of side
    ``stored_size`` (None: unknown), output side ``size``. Returns (images, keyword
    arguments for the closing ``fn.crop_mirror_normalize``)."""
    enabled = [a for name, a in AUGMENTS.items() if name in names]
    if stored_size != size and not any(a.resizes for a in enabled):
        images = fn.resize(images, resize_x=size, resize_y=size)
    final = {"mirror": 0}
    for a in enabled:
        images = a.dali(fn, images, size, final)
    return images, final
