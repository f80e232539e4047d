"""Five-point face alignment: a similarity transform (scikit-image estimates and warps)
taking a face's landmarks (eyes, nose tip, mouth corners) onto the ArcFace 112×112
template, as insightface's evaluation and data preparation align faces."""
from __future__ import annotations

import numpy as np

# The standard ArcFace five-point destination for a 112×112 crop (a similarity transform
# onto these, then an affine warp): eyes, nose tip, mouth corners (x, y).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


class AlignUnavailable(ImportError):
    """scikit-image, which alignment needs, is not installed."""


def skimage_transform():
    """scikit-image's transform module (the five-point alignment), or one clear error."""
    try:
        from skimage import transform
    except ImportError:
        raise AlignUnavailable("IJB sets and `dpface convert synthetic-ijb` need scikit-image for "
                               "five-point alignment: pip install 'dpface[eval]'") from None
    return transform


def template_points(size: int = 112) -> np.ndarray:
    """The five ArcFace template points for a ``size``×``size`` crop (scaled from 112)."""
    return ARCFACE_TEMPLATE * (size / 112.0)


def similarity_to_template(landmarks, size: int = 112):
    """The least-squares similarity transform (scikit-image) taking the five ``landmarks``
    [5, 2] (x, y image pixels) onto the template of a ``size`` crop."""
    SimilarityTransform = skimage_transform().SimilarityTransform

    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dst = template_points(size)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        t = SimilarityTransform.from_estimate(src, dst)
        if not t:
            raise ValueError(f"no similarity transform fits landmarks {src.tolist()}")
        return t
    t = SimilarityTransform()
    if not t.estimate(src, dst):
        raise ValueError(f"no similarity transform fits landmarks {src.tolist()}")
    return t


def align_face(image: np.ndarray, landmarks, size: int = 112) -> np.ndarray:
    """uint8 [H, W, 3] image + five landmarks → the aligned uint8 [size, size, 3] crop
    (bilinear; outside the image is black, as cv2.warpAffine's default border)."""
    warp = skimage_transform().warp

    t = similarity_to_template(landmarks, size)
    out = warp(image, t.inverse, output_shape=(size, size), order=1, mode="constant", cval=0.0,
               preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
