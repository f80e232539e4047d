"""Procedural synthetic faces: a download-free, deterministic data set for demos and tests.

An *identity* is a set of face parameters (geometry, colours, skin texture) drawn from
``rng(seed, Stream.SYNTH_IDENTITY, identity)``; an *image* of it adds nuisance drawn
from ``rng(seed, Stream.SYNTH_SAMPLE, identity, sample)``: pose (shift, rotation,
scale, squash), lighting (brightness, contrast, colour cast, directional gradient),
blur, noise, occlusion and background clutter, all scaled by one ``difficulty`` knob.
No global RNG state is touched, so an image is a pure function of
(seed, identity, sample, difficulty, image_size) on any machine and in any worker.

Identities live in one global index space: a training set uses [0, N), evaluation
uses [N, N + M) (``identity_offset``), so train/eval disjointness holds by
construction. Each set renders its own range of sample indices
(``seeding.SAMPLE_RANGES``), so no two sets share an image.

Speed: the identity's canonical face (RGBA, in its own frame) is rendered once with
vectorised numpy and kept in a small per-instance LRU cache; each image is then one
PIL affine warp plus a few whole-image numpy operations.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image, ImageDraw

from dpface.seeding import Stream
from dpface.seeding import rng as stream_rng

# Internal nuisance strength at difficulty 1.0 (the default). Tuned with a small
# 4-conv CNN + ArcFace (s=32, m=0.3), 600 steps of 64 on one CPU thread, 200 identities
# with the cpu_demo counts (min 6, exponent 0.8): held-out pair accuracy ~65% untrained,
# 92–94% trained (3 seeds). Stronger nuisance mostly hurts the trained net: the
# untrained one sits near 60–65% whatever the strength.
NUISANCE_AT_DIFFICULTY_1 = 0.45

_HAIR_COLOURS = np.array(
    [[25, 20, 18], [60, 40, 25], [110, 75, 40], [200, 165, 100], [150, 60, 25], [170, 170, 165]],
    dtype=np.float32,
)
_IRIS_COLOURS = np.array(
    [[60, 40, 25], [90, 60, 30], [60, 110, 170], [80, 130, 80], [120, 125, 130]], dtype=np.float32
)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_difficulty(difficulty) -> float:
    d = float(difficulty)
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"difficulty must be a finite number >= 0, got {difficulty!r}")
    return d


def long_tail_counts(num_identities: int, max_images: int = 60, min_images: int = 2,
                     exponent: float = 1.0) -> np.ndarray:
    """Images per identity: floor(max_images·(i+1)^(−exponent)) clipped to [min, max].

    Non-increasing in i (identity 0 is the head of the tail); exponent 0 gives a
    balanced set of ``max_images`` each.
    """
    n = _check_int("num_identities", num_identities, 1)
    lo = _check_int("min_images", min_images, 1)
    hi = _check_int("max_images", max_images, 1)
    if hi < lo:
        raise ValueError(f"max_images ({hi}) must be >= min_images ({lo})")
    e = float(exponent)
    if not math.isfinite(e) or e < 0:
        raise ValueError(f"exponent must be a finite number >= 0, got {exponent!r}")
    raw = np.floor(hi * np.arange(1, n + 1, dtype=np.float64) ** -e)
    return np.clip(raw, lo, hi).astype(np.int64)


def _blur3(img: np.ndarray, w: float) -> None:
    """In place: one [w, 1−2w, w] pass along rows and one along columns (edges kept)."""
    nb = img[:-2] + img[2:]  # a copy, taken before the rows are updated
    mid = img[1:-1]
    mid *= 1 - 2 * w
    mid += w * nb
    nb = img[:, :-2] + img[:, 2:]
    mid = img[:, 1:-1]
    mid *= 1 - 2 * w
    mid += w * nb


def _window(grid_x: np.ndarray, grid_y: np.ndarray, cx: float, cy: float, r: float):
    """Slices of the pixel grid covering the square of half-side ``r`` around (cx, cy)."""
    h, w = grid_y.shape[0], grid_x.shape[0]
    c0 = max(int(((cx - r) + 1) * 0.5 * w) - 1, 0)
    c1 = min(int(((cx + r) + 1) * 0.5 * w) + 2, w)
    r0 = max(int(((cy - r) + 1) * 0.5 * h) - 1, 0)
    r1 = min(int(((cy + r) + 1) * 0.5 * h) + 2, h)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


class SyntheticFaces:
    """Renders image ``sample`` of identity ``identity`` as uint8 [H, W, 3] RGB."""

    def __init__(self, seed: int = 0, image_size: int = 112, difficulty: float = 1.0,
                 cache_size: int = 1024):
        self.seed = _check_int("seed", seed, 0)
        self.image_size = _check_int("image_size", image_size, 16)
        self.difficulty = _check_difficulty(difficulty)
        self.cache_size = _check_int("cache_size", cache_size, 0)
        s = self.image_size
        # Pixel centres in [−1, 1]; ``px`` is one pixel in those units (sets edge softness).
        self._x = ((np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1)
        self._y = self._x.copy()
        self._px = 2.0 / s
        self._X, self._Y = np.meshgrid(self._x, self._y)  # [H, W] each
        # A noise bank twice the image size, cropped at a per-sample offset: drawing
        # fresh Gaussian noise for every image would cost more than the rest of it.
        bank_rng = stream_rng(self.seed, Stream.SYNTH_NOISE)
        self._noise = bank_rng.standard_normal((2 * s, 2 * s, 3), dtype=np.float32)
        self._cache: OrderedDict[int, tuple[Image.Image, float]] = OrderedDict()

    # Pickled into DataLoader workers: the cache is rebuilt there, not shipped.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ identity
    def identity_params(self, identity: int) -> dict:
        """The procedural parameters of one identity (pure function of seed, identity).

        Coordinates are in the face's own frame, [−1, 1] across the image, y down.
        """
        identity = _check_int("identity", identity, 0)
        rng = stream_rng(self.seed, Stream.SYNTH_IDENTITY, identity)
        u = rng.uniform
        p: dict = {}
        p["face_c"] = (u(-0.03, 0.03), u(0.0, 0.1))
        p["face_r"] = (u(0.40, 0.56), u(0.56, 0.72))
        p["face_egg"] = u(-0.35, 0.35)       # width change from forehead to chin
        p["face_pow"] = u(1.7, 2.8)          # superellipse exponent: pointed ↔ square jaw
        tone = u(0.0, 1.0)
        skin = (1 - tone) * np.array([240, 200, 170]) + tone * np.array([95, 60, 40])
        p["skin"] = np.clip(skin + rng.normal(0, 10, 3), 0, 255).astype(np.float32)
        hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]
        p["hair"] = np.clip(hair + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
        p["bald"] = bool(u() < 0.12)
        p["hair_r"] = (u(1.0, 1.25), u(0.9, 1.2))    # hair ellipse / face radii
        p["hair_up"] = u(0.05, 0.25)                  # how far the hair rises above the face
        p["fringe"] = (u(0.25, 0.75), u(-0.6, 0.6), u(-0.4, 0.4))  # level, bend, side part
        p["eye_dx"] = u(0.15, 0.28)
        p["eye_y"] = u(-0.22, -0.02)
        p["eye_r"] = (u(0.07, 0.12), u(0.03, 0.065))
        p["eye_tilt"] = u(-0.3, 0.3)
        p["iris_frac"] = u(0.45, 0.85)
        iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]
        p["iris"] = np.clip(iris + rng.normal(0, 10, 3), 0, 255).astype(np.float32)
        p["brow_dy"] = u(0.06, 0.14)
        p["brow_r"] = (u(0.08, 0.15), u(0.012, 0.035))
        p["brow_tilt"] = u(-0.4, 0.4)
        p["nose_len"] = u(0.10, 0.26)
        p["nose_w"] = u(0.04, 0.11)
        p["mouth_y"] = u(0.22, 0.42)
        p["mouth_w"] = u(0.10, 0.24)
        p["mouth_th"] = u(0.018, 0.05)
        p["mouth_curve"] = u(-0.06, 0.06)
        p["lip_red"] = u(0.1, 0.6)
        p["beard"] = bool(u() < 0.25)
        p["moustache"] = bool(u() < 0.25)
        # Identity-specific skin texture: low-frequency blotches, stripes, freckles.
        p["blotch_amp"] = u(0.0, 0.25)
        p["blotch"] = rng.normal(0, 1, (5, 5)).astype(np.float32)
        p["stripe_amp"] = u(0.0, 0.22)
        p["stripe_freq"] = u(4.0, 14.0)
        p["stripe_angle"] = u(0, math.pi)
        p["stripe_phase"] = u(0, 2 * math.pi)
        p["stripe_tint"] = rng.uniform(-1, 1, 3).astype(np.float32)
        n_freckles = int(rng.integers(0, 30))
        p["freckles"] = rng.uniform(-0.8, 0.8, (n_freckles, 2)).astype(np.float32)
        p["freckle_r"] = u(0.012, 0.03)
        return p

    def _paint(self, canvas, alpha, cov, colour, win=None):
        """Alpha-blend ``colour`` (3,) or [h, w, 3] over ``canvas`` with coverage ``cov``."""
        if win is None:
            win = (slice(None), slice(None))
        c = cov[..., None]
        canvas[win] += c * (colour - canvas[win])
        alpha[win] = np.maximum(alpha[win], cov)

    def _ellipse(self, cx, cy, rx, ry, angle=0.0, win=None):
        """Coverage in [0, 1] of a rotated ellipse, soft over about one pixel."""
        if win is None:
            win = _window(self._x, self._y, cx, cy, max(rx, ry) + self._px)
        x = self._x[win[1]][None, :] - cx
        y = self._y[win[0]][:, None] - cy
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            x, y = ca * x + sa * y, -sa * x + ca * y
        d = np.sqrt((x / rx) ** 2 + (y / ry) ** 2)
        return np.clip(0.5 - (d - 1) * (min(rx, ry) / self._px), 0, 1), win

    def _canonical(self, identity: int) -> tuple[Image.Image, float]:
        """The identity's face, hair and neck as RGBA in its own (upright, centred) frame,
        and the height of its eyes in that frame (where glasses go)."""
        cached = self._cache.get(identity)
        if cached is not None:
            self._cache.move_to_end(identity)
            return cached
        p = self.identity_params(identity)
        s = self.image_size
        X, Y, px = self._X, self._Y, self._px
        skin = p["skin"]
        canvas = np.empty((s, s, 3), np.float32)
        canvas[:] = skin  # outside colour = skin, so warped edges do not fringe
        alpha = np.zeros((s, s), np.float32)
        fx, fy = p["face_c"]
        rx, ry = p["face_r"]

        # Neck and ears go behind the face.
        neck = np.clip((0.5 - (np.abs(X - fx) - 0.55 * rx) / px), 0, 1) * (Y > fy).astype(np.float32)
        self._paint(canvas, alpha, neck, skin * 0.85)
        for side in (-1, 1):
            cov, win = self._ellipse(fx + side * rx * 0.97, fy - 0.05 * ry, 0.08, 0.15)
            self._paint(canvas, alpha, cov, skin * 0.9, win)
        hx, hy = p["hair_r"]
        hair_c = (fx, fy - p["hair_up"])
        if not p["bald"]:
            hair_cov, _ = self._ellipse(hair_c[0], hair_c[1], rx * hx, ry * hy,
                                        win=(slice(None), slice(None)))
            hair_cov = hair_cov * (Y < fy + 0.2 * ry)  # hair stops above the jaw line
            self._paint(canvas, alpha, hair_cov, p["hair"])

        # Face: superellipse whose width varies from forehead to chin ("egg").
        v = (Y - fy) / ry
        width = rx * (1 + p["face_egg"] * v * 0.5)
        u = (X - fx) / width
        d = (np.abs(u) ** p["face_pow"] + np.abs(v) ** p["face_pow"]) ** (1 / p["face_pow"])
        face = np.clip(0.5 - (d - 1) * (rx / px), 0, 1)
        # Skin texture, in the face frame so it moves with the pose.
        blotch = np.asarray(Image.fromarray(p["blotch"], mode="F").resize((s, s), Image.BICUBIC))
        a = p["stripe_angle"]
        stripes = np.sin(p["stripe_freq"] * (math.cos(a) * X + math.sin(a) * Y) + p["stripe_phase"])
        lum = 1 + p["blotch_amp"] * blotch
        colour = skin * lum[..., None] + (p["stripe_amp"] * 80) * stripes[..., None] * p["stripe_tint"]
        self._paint(canvas, alpha, face, colour)
        for fxr, fyr in p["freckles"]:
            cx, cy = fx + fxr * rx * 0.8, fy + fyr * ry * 0.8
            cov, win = self._ellipse(cx, cy, p["freckle_r"], p["freckle_r"])
            self._paint(canvas, alpha, cov * face[win] * 0.7, skin * 0.55, win)

        # Fringe: hair in front of the forehead above a bent, possibly side-parted line.
        if not p["bald"]:
            level, bend, part = p["fringe"]
            line = fy - ry * level + bend * (X - fx) ** 2 + part * (X - fx) * 0.3
            fringe = hair_cov * np.clip(0.5 - (Y - line) / px, 0, 1)
            self._paint(canvas, alpha, fringe, p["hair"])

        ey = fy + p["eye_y"] * ry
        erx, ery = p["eye_r"]
        for side in (-1, 1):
            ex = fx + side * p["eye_dx"]
            tilt = side * p["eye_tilt"]
            cov, win = self._ellipse(ex, ey, erx + 0.6 * px, ery + 0.6 * px, tilt)
            self._paint(canvas, alpha, cov, np.float32([30, 20, 20]), win)  # lid line
            cov, win = self._ellipse(ex, ey, erx, ery, tilt)
            self._paint(canvas, alpha, cov, np.float32([235, 232, 225]), win)
            sclera = cov
            ir = ery * p["iris_frac"] + 0.5 * px
            cov, _ = self._ellipse(ex, ey, ir, ir, win=win)
            self._paint(canvas, alpha, cov * sclera, p["iris"], win)
            cov, _ = self._ellipse(ex, ey, ir * 0.45, ir * 0.45, win=win)
            self._paint(canvas, alpha, cov * sclera, np.float32([10, 10, 10]), win)
            bx = ex + side * 0.02
            by = ey - p["brow_dy"] - ery
            brx, bry = p["brow_r"]
            cov, win = self._ellipse(bx, by, brx, bry, side * p["brow_tilt"])
            self._paint(canvas, alpha, cov, p["hair"] * 0.8, win)

        # Nose: a shaded ridge and two nostrils.
        ny = ey + ery + p["nose_len"] * 0.5
        cov, win = self._ellipse(fx, ny, p["nose_w"], p["nose_len"] * 0.6)
        self._paint(canvas, alpha, cov * 0.35, skin * 0.6, win)
        for side in (-1, 1):
            cov, win = self._ellipse(fx + side * p["nose_w"] * 0.55, ny + p["nose_len"] * 0.45,
                                     0.025, 0.015)
            self._paint(canvas, alpha, cov, skin * 0.35, win)

        my = fy + p["mouth_y"] * ry
        mw, mth = p["mouth_w"], p["mouth_th"]
        if p["beard"]:
            beard = face * np.clip(0.5 - (my - 0.08 - Y) / px, 0, 1) * 0.85
            self._paint(canvas, alpha, beard, p["hair"])
        if p["moustache"]:
            cov, win = self._ellipse(fx, my - mth - 0.03, mw * 0.9, 0.03)
            self._paint(canvas, alpha, cov * 0.9, p["hair"], win)
        # Mouth: lips along a parabola (smile > 0, frown < 0) and a dark parting line.
        win = _window(self._x, self._y, fx, my, mw + 0.1)
        x = self._x[win[1]][None, :] - fx
        y = self._y[win[0]][:, None] - (my - p["mouth_curve"] * ((x / mw) ** 2) * 2)
        lips = np.clip(0.5 - (np.sqrt((x / mw) ** 2 + (y / mth) ** 2) - 1) * (mth / px), 0, 1)
        lip_colour = skin * (1 - p["lip_red"]) + np.float32([170, 40, 50]) * p["lip_red"]
        self._paint(canvas, alpha, lips, lip_colour, win)
        line = lips * np.clip(1.0 - np.abs(y) / px, 0, 1)
        self._paint(canvas, alpha, line, np.float32([50, 15, 20]), win)

        rgba = np.empty((s, s, 4), np.uint8)
        rgba[..., :3] = np.clip(canvas, 0, 255)
        rgba[..., 3] = np.clip(alpha * 255, 0, 255)
        # Premultiplied, so the warp's averaging does not bleed the outside colour in.
        entry = (Image.fromarray(rgba, mode="RGBA").convert("RGBa"), float(ey))
        if self.cache_size:
            self._cache[identity] = entry
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry

    # ------------------------------------------------------------------ one image
    def _draws(self, identity: int, sample: int):
        """(generator, normal draws, uniform draws) of one image: every nuisance has its slot."""
        rng = stream_rng(self.seed, Stream.SYNTH_SAMPLE, identity, sample)
        return rng, rng.standard_normal(16), rng.random(16)

    def nuisance(self, identity: int, sample: int) -> dict[str, float]:
        """The degradations :meth:`render` (identity, sample) applies: its blur and its noise,
        each as a fraction of their largest amount at this difficulty, and whether an
        occluder covers part of the face (1.0 or 0.0)."""
        _, _, r = self._draws(_check_int("identity", identity, 0), _check_int("sample", sample, 0))
        d = self.difficulty * NUISANCE_AT_DIFFICULTY_1
        return {"blur": float(r[1]), "noise": float(r[4]), "occluded": float(r[0] < 0.4 * min(d, 1.5))}

    def degradation(self, identity: int, sample: int) -> float:
        """One number in [0, 3]: the sum of :meth:`nuisance`'s (the quality axis of the
        adaptive-margin benchmark)."""
        return sum(self.nuisance(identity, sample).values())

    def render(self, identity: int, sample: int) -> np.ndarray:
        """uint8 [H, W, 3] RGB; a pure function of (seed, identity, sample, difficulty,
        image_size)."""
        identity = _check_int("identity", identity, 0)
        sample = _check_int("sample", sample, 0)
        face, eye_y = self._canonical(identity)
        d = self.difficulty * NUISANCE_AT_DIFFICULTY_1
        s = self.image_size
        rng, n, r = self._draws(identity, sample)

        # Pose: rotate/scale/squash about the image centre, then shift. Spreads are per
        # unit of internal strength d (d = 0.45 at difficulty 1: rotation sd ≈ 4°).
        angle = float(np.clip(n[0] * 0.16 * d, -0.5, 0.5))
        scale = math.exp(float(np.clip(n[1] * 0.09 * d, -0.3, 0.3)))
        squash = math.exp(float(np.clip(n[2] * 0.07 * d, -0.25, 0.25)))  # cheap yaw proxy
        shift = np.clip(n[3:5] * 0.07 * d, -0.2, 0.2) * (s / 2)
        ca, sa = math.cos(angle), math.sin(angle)
        fwd = np.array([[ca, -sa], [sa, ca]]) @ np.diag([scale * squash, scale])
        inv = np.linalg.inv(fwd)
        c = np.array([s / 2, s / 2])
        # input = inv·(out − c − shift) + c. The warp samples a 2× output grid nearest-
        # neighbour and averages 2×2 blocks: anti-aliased, and ~4× cheaper than PIL's
        # bilinear affine warp (a generic per-pixel filter).
        off = c - inv @ (c + shift)
        face = face.transform((2 * s, 2 * s), Image.AFFINE,
                              (inv[0, 0] / 2, inv[0, 1] / 2, off[0], inv[1, 0] / 2, inv[1, 1] / 2, off[1]),
                              resample=Image.NEAREST).reduce(2)

        img = self._background(rng, d)
        img.paste(face, (0, 0), face)
        if r[0] < 0.4 * min(d, 1.5):
            self._occlude(img, rng, fwd, shift, eye_y)

        out = np.asarray(img, dtype=np.float32)
        # Blur: repeated 3-tap [w, 1−2w, w] passes per axis, each adds 2w px² of variance.
        var = (r[1] * 1.3 * d * s / 112) ** 2  # sigma in pixels, relative to a 112 px face
        while var > 0.05:
            w = min(var / 2, 0.25)
            _blur3(out, w)
            var -= 2 * w
        # Lighting: contrast about the mean, brightness, colour cast, directional ramp.
        mean = float(out.mean())
        contrast = math.exp(float(np.clip(n[5] * 0.25 * d, -0.9, 0.9)))
        bright = math.exp(float(np.clip(n[6] * 0.22 * d, -0.9, 0.9)))
        cast = np.exp(np.clip(n[7:10] * 0.12 * d, -0.5, 0.5)).astype(np.float32)
        g_angle = r[2] * 2 * math.pi
        g_amp = r[3] * 0.45 * min(d, 2.0)
        ramp = 1 + g_amp * (math.cos(g_angle) * self._X + math.sin(g_angle) * self._Y)
        out -= mean
        out *= contrast
        out += mean * bright
        out *= ramp[..., None] * cast
        sigma = r[4] * 9.0 * d
        if sigma > 0.5:
            oy, ox = rng.integers(0, s, 2)
            out += sigma * self._noise[oy:oy + s, ox:ox + s]
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)

    def _background(self, rng: np.random.Generator, d: float) -> Image.Image:
        """A smooth random colour field plus a few random shapes (clutter)."""
        s = self.image_size
        base = rng.uniform(40, 215, 3)
        k = int(rng.integers(2, 7))
        field = base + rng.normal(0, 45 * min(d, 2.0), (k, k, 3))
        small = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), mode="RGB")
        img = small.resize((s, s), Image.BILINEAR)
        n_shapes = int(rng.poisson(3 * d))
        if n_shapes:
            draw = ImageDraw.Draw(img)
            for _ in range(min(n_shapes, 10)):
                x0, y0 = rng.uniform(-0.2 * s, s, 2)
                w, h = rng.uniform(0.05 * s, 0.5 * s, 2)
                fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                if rng.random() < 0.5:
                    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
                else:
                    draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        return img

    def _occlude(self, img: Image.Image, rng: np.random.Generator, fwd, shift, eye_y: float):
        """Draw one occluder: glasses-like bar over the eyes, a hand-like blob, or a bar."""
        s = self.image_size
        kind = rng.integers(3)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw = ImageDraw.Draw(img)
        centre = np.array([s / 2, s / 2]) + shift
        if kind == 0:  # glasses / sunglasses band, following the head's pose
            half_w, half_h = 0.21 * s, rng.uniform(0.03, 0.08) * s
            cy = eye_y * s / 2
            corners = np.array([[-half_w, cy - half_h], [half_w, cy - half_h],
                                [half_w, cy + half_h], [-half_w, cy + half_h]])
            pts = corners @ fwd.T + centre
            draw.polygon([tuple(map(float, q)) for q in pts], fill=fill)
        elif kind == 1:  # hand / object: a big ellipse entering from an edge
            w, h = rng.uniform(0.25, 0.5, 2) * s
            x0 = rng.choice([-0.15 * s, s - 0.85 * w]) if rng.random() < 0.5 else rng.uniform(0, s - w)
            y0 = rng.uniform(0.3 * s, s - 0.6 * h)
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        else:  # a thin bar at a random angle (strap, microphone, pole)
            a = rng.uniform(0, math.pi)
            length, half_t = s * 1.5, rng.uniform(0.02, 0.06) * s
            cx, cy = rng.uniform(0.2 * s, 0.8 * s, 2)
            dx, dy = math.cos(a), math.sin(a)
            pts = [(cx - dx * length / 2 - dy * half_t, cy - dy * length / 2 + dx * half_t),
                   (cx + dx * length / 2 - dy * half_t, cy + dy * length / 2 + dx * half_t),
                   (cx + dx * length / 2 + dy * half_t, cy + dy * length / 2 - dx * half_t),
                   (cx - dx * length / 2 + dy * half_t, cy - dy * length / 2 - dx * half_t)]
            draw.polygon(pts, fill=fill)


class SyntheticFaceDataset(torch.utils.data.Dataset):
    """Training set over identities [identity_offset, identity_offset + num_identities).

    Identity ``label`` has ``counts[label]`` images (a long tail, see
    :func:`long_tail_counts`), its samples 0..counts[label]−1. Items are
    (uint8 [3, H, W] RGB tensor, label in [0, num_identities)); images are rendered on
    the fly, so the set costs no disk and each DataLoader worker renders its own.
    """

    def __init__(self, num_identities: int, seed: int = 0, image_size: int = 112,
                 difficulty: float = 1.0, max_images: int = 60, min_images: int = 2,
                 exponent: float = 1.0, identity_offset: int = 0):
        self.identity_offset = _check_int("identity_offset", identity_offset, 0)
        self.counts = long_tail_counts(num_identities, max_images, min_images, exponent)
        self.num_classes = int(num_identities)
        # _starts[k] = index of label k's first image; searchsorted on it maps index → label.
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.faces = SyntheticFaces(seed=seed, image_size=image_size, difficulty=difficulty)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def labels(self) -> np.ndarray:
        """int64 [len(self)]: the label of every index (for samplers)."""
        return np.repeat(np.arange(self.num_classes, dtype=np.int64), self.counts)

    def locate(self, index) -> tuple[int, int]:
        """(label, sample index within the identity) of a flat index."""
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an integer, got {index!r}")
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        label = int(np.searchsorted(self._starts, i, side="right") - 1)
        return label, i - int(self._starts[label])

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        label, sample = self.locate(index)
        img = self.faces.render(self.identity_offset + label, sample)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), label
