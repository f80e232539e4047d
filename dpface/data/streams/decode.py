"""One sample's bytes → (image, label), with the checks every shard stream makes.

A bad sample (undecodable image, missing image or label, non-integer label) is not an
error: :class:`BadSample` names its kind, which the stream counts (data/streams/bad_data.py). A
label outside [0, num_classes) is: the data set and the manifest disagree, so training
would index outside the classifier (:class:`LabelError`).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dpface.data.formats.shards import ShardError


class LabelError(ShardError, ValueError):
    """A sample's label is outside [0, num_classes): the data set and the manifest disagree."""


class BadSample(Exception):
    """An unusable sample; ``kind`` is its count's name in the stream's stats."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def parse_label(raw) -> int:
    """The ASCII digits of a .cls member (bytes, or DALI's uint8 array) → int; ValueError
    if they are not an integer."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.asarray(raw, dtype=np.uint8).tobytes()
    return int(bytes(raw).decode("ascii").strip())


def check_label(label: int, num_classes: int, sample: str) -> int:
    if not 0 <= label < num_classes:
        raise LabelError(f"{sample} has label {label}, outside [0, {num_classes}) "
                         "(num_classes of the manifest)")
    return label


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image → HWC uint8 RGB of side ``size`` (bilinear resize when it differs)."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise BadSample("bad_image") from None


def decode_sample(sample: dict, num_classes: int, size: int) -> tuple[np.ndarray, int]:
    """A grouped tar sample ({"__key__", "__url__", "jpg", "cls"}) → (HWC uint8, label);
    the label is checked before the image is decoded."""
    if "cls" not in sample:
        raise BadSample("missing_label")
    try:
        label = parse_label(sample["cls"])
    except ValueError:  # UnicodeDecodeError included
        raise BadSample("bad_label") from None
    check_label(label, num_classes, f"sample {sample.get('__key__', '?')!r} in {sample.get('__url__')}")
    data = sample.get("jpg")
    if data is None:
        raise BadSample("missing_image")
    return decode_image(data, size), label
