"""Synthetic templates of mixed quality, for set-to-set recognition.

A *template* is several images of one identity. Every image gets a degradation level
u ∈ [0, 1], known exactly, applied on top of the synthetic renderer's own nuisance
(``SyntheticFaces``, rendered at difficulty ``difficulty·(1 + u)``):

- resolution: box-downsampled by 1 + 4u and upsampled back (u = 1: a 32 px face from a
  ~6 px one);
- contrast: blended toward mid grey by 0.5u;
- noise: Gaussian, σ = 35u² grey levels;
- occlusion: with probability u, a random flat-coloured rectangle over 0.15–0.15+0.35u
  of each side.

Levels are drawn from a mixture: with probability ``poor_fraction`` u ~ U(0.6, 1) ("very
poor"), else u ~ U(0, 0.3); the first image of every template is always a good one, so
every template holds some usable evidence (what quality-weighted pooling should find).

``DegradedFaceDataset`` is the same degradation over a training set
(``SyntheticFaceDataset``), so a network and its quality branch see mixed-quality images
in training. Everything is a pure function of the seeds; images of a template set use
sample indices of the "templates" range of ``seeding.SAMPLE_RANGES`` (apart from other sets' images).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dpface.data.synthetic.faces import SyntheticFaceDataset, SyntheticFaces, _check_int
from dpface.seeding import Stream, rng, sample_index

# Tags of this module's random streams (numpy SeedSequence entropy, like ijb.py's set).
_TAG_LEVEL, _TAG_DEGRADE, _TAG_LAYOUT = Stream.TEMPLATE_LEVEL, Stream.TEMPLATE_DEGRADE, Stream.TEMPLATE_LAYOUT
# Renderer difficulties are quantised to these steps of u, so a handful of renderers
# (each with its own face cache) cover every level.
_LEVEL_STEPS = 4


def _check_fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    return float(v)


def draw_level(rng: np.random.Generator, poor_fraction: float, good: bool = False) -> float:
    """One degradation level: very poor (U(0.6, 1)) with probability ``poor_fraction``,
    else good (U(0, 0.3)); ``good`` forces a good one."""
    if not good and rng.random() < poor_fraction:
        return float(rng.uniform(0.6, 1.0))
    return float(rng.uniform(0.0, 0.3))


def degrade(img: np.ndarray, u: float, rng: np.random.Generator) -> np.ndarray:
    """Apply degradation level ``u`` ∈ [0, 1] (module doc) to uint8 [H, W, 3]."""
    u = _check_fraction("degradation level", u)
    h, w = img.shape[:2]
    out = img
    f = 1.0 + 4.0 * u
    if f > 1.05:
        small = (max(2, int(round(w / f))), max(2, int(round(h / f))))
        out = np.asarray(Image.fromarray(img).resize(small, Image.BOX).resize((w, h), Image.BILINEAR))
    x = out.astype(np.float32)
    x = x + 0.5 * u * (128.0 - x)
    sigma = 35.0 * u * u
    noise = rng.standard_normal(x.shape).astype(np.float32)  # drawn always: fixed stream use
    x += sigma * noise
    if rng.random() < u:
        side = rng.uniform(0.15, 0.15 + 0.35 * u, 2)
        ow, oh = int(side[0] * w), int(side[1] * h)
        x0, y0 = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
        x[y0:y0 + oh, x0:x0 + ow] = rng.integers(0, 256, 3)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class _Renderers:
    """SyntheticFaces at difficulty·(1 + u), u quantised to _LEVEL_STEPS steps."""

    def __init__(self, seed: int, image_size: int, difficulty: float):
        self.faces = [SyntheticFaces(seed=seed, image_size=image_size,
                                     difficulty=difficulty * (1 + k / (_LEVEL_STEPS - 1)))
                      for k in range(_LEVEL_STEPS)]

    def render(self, identity: int, sample: int, u: float) -> np.ndarray:
        return self.faces[int(round(u * (_LEVEL_STEPS - 1)))].render(identity, sample)


@dataclass
class TemplateSet:
    images: np.ndarray             # uint8 [F, H, W, 3]
    template: np.ndarray           # int64 [F], template id 0..T-1 of each image
    degradation: np.ndarray        # float64 [F], level u of each image
    template_identity: np.ndarray  # int64 [T], global identity of each template
    gallery: np.ndarray            # bool [T], the gallery template of each identity (1:N)
    pairs: np.ndarray              # int64 [P, 2], every unordered template pair (1:1)
    issame: np.ndarray             # bool [P]

    @property
    def num_templates(self) -> int:
        return int(self.template_identity.shape[0])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def make_templates(num_identities: int, identity_offset: int, templates_per_identity: int = 3,
                   min_images: int = 2, max_images: int = 6, poor_fraction: float = 0.5,
                   seed: int = 0, image_size: int = 112, difficulty: float = 1.0) -> TemplateSet:
    """Templates over identities [identity_offset, +num_identities): each identity gets
    ``templates_per_identity`` templates of ``min_images``..``max_images`` images of mixed
    quality (module doc). The first template of each identity is its gallery entry for 1:N
    (the others are probes); 1:1 pairs are all template pairs."""
    n = _check_int("num_identities", num_identities, 2)
    offset = _check_int("identity_offset", identity_offset, 0)
    tpi = _check_int("templates_per_identity", templates_per_identity, 2)
    lo = _check_int("min_images", min_images, 1)
    hi = _check_int("max_images", max_images, 1)
    if hi < lo:
        raise ValueError(f"max_images ({hi}) must be >= min_images ({lo})")
    poor_fraction = _check_fraction("poor_fraction", poor_fraction)
    seed = _check_int("seed", seed, 0)
    renderers = _Renderers(seed, image_size, difficulty)
    layout = rng(seed, _TAG_LAYOUT, offset, n, tpi, lo, hi)
    images, template, levels, t_ident = [], [], [], []
    for i in range(n):
        g = offset + i
        k = 0
        for _ in range(tpi):
            t = len(t_ident)
            t_ident.append(g)
            for j in range(int(layout.integers(lo, hi + 1))):
                sample = sample_index("templates", k)
                lrng = rng(seed, _TAG_LEVEL, g, sample)
                u = draw_level(lrng, poor_fraction, good=j == 0)
                drng = rng(seed, _TAG_DEGRADE, g, sample)
                images.append(degrade(renderers.render(g, sample, u), u, drng))
                template.append(t)
                levels.append(u)
                k += 1
    t_ident = np.asarray(t_ident, np.int64)
    a, b = np.triu_indices(t_ident.size, k=1)
    gallery = np.zeros(t_ident.size, bool)
    gallery[::tpi] = True
    return TemplateSet(images=np.stack(images), template=np.asarray(template, np.int64),
                       degradation=np.asarray(levels, np.float64), template_identity=t_ident,
                       gallery=gallery, pairs=np.stack([a, b], 1).astype(np.int64),
                       issame=t_ident[a] == t_ident[b])


class DegradedFaceDataset(SyntheticFaceDataset):
    """``SyntheticFaceDataset`` whose image (label, sample) carries degradation level
    ``level(index)`` (the template mixture, no forced good image)."""

    def __init__(self, num_identities: int, seed: int = 0, image_size: int = 112,
                 difficulty: float = 1.0, max_images: int = 60, min_images: int = 2,
                 exponent: float = 1.0, identity_offset: int = 0, poor_fraction: float = 0.5):
        super().__init__(num_identities, seed=seed, image_size=image_size, difficulty=difficulty,
                         max_images=max_images, min_images=min_images, exponent=exponent,
                         identity_offset=identity_offset)
        self.poor_fraction = _check_fraction("poor_fraction", poor_fraction)
        self.seed = int(seed)
        self._renderers = _Renderers(self.seed, image_size, difficulty)

    def level(self, index) -> float:
        label, sample = self.locate(index)
        g = self.identity_offset + label
        return draw_level(rng(self.seed, _TAG_LEVEL, g, sample), self.poor_fraction)

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        label, sample = self.locate(index)
        g = self.identity_offset + label
        u = draw_level(rng(self.seed, _TAG_LEVEL, g, sample), self.poor_fraction)
        img = degrade(self._renderers.render(g, sample, u), u,
                      rng(self.seed, _TAG_DEGRADE, g, sample))
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), label


__all__ = ["TemplateSet", "make_templates", "degrade", "draw_level", "DegradedFaceDataset"]
