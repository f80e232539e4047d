"""Sub-centre ArcFace's rules (after Deng et al., "Sub-center ArcFace", ECCV 2020): which
transforms and options it takes, and the sample weights of its drop of likely-noisy
samples. Shared by PartialFC and FullFC."""
from __future__ import annotations

import math

import torch

from dpface.losses.margin import LogitTransform


def check_subcenter_args(transform: LogitTransform, subcenters, drop_after, drop_angle) -> tuple[int, int, float]:
    """Validated (subcenters, drop_after, drop_angle) of sub-centre ArcFace (both heads)."""
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or subcenters < 1:
        raise ValueError(f"subcenters must be an integer >= 1 (sub-centres per class), got {subcenters!r}")
    if isinstance(drop_after, bool) or not isinstance(drop_after, int) or drop_after < 0:
        raise ValueError(f"drop_after must be an integer step >= 0 (0: never drop), got {drop_after!r}")
    if isinstance(drop_angle, bool) or not isinstance(drop_angle, (int, float)) or not 0.0 < drop_angle < 180.0:
        raise ValueError(f"drop_angle must be in (0, 180) degrees, got {drop_angle!r}")
    if (subcenters > 1 or drop_after > 0) and not transform.normalize:
        what = f"subcenters={subcenters}" if subcenters > 1 else f"drop_after={drop_after}"
        raise ValueError(f"{what} needs a cosine transform (normalised scores: the class cosine is the "
                         f"max over its sub-centres, samples are dropped by angle); "
                         f"{type(transform).__name__} scores raw dot products")
    return subcenters, drop_after, float(drop_angle)


def drop_weights(target_cos: torch.Tensor, drop_angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample weights, fraction dropped) for the global batch's target cosines [B]: a
    sample whose angle to its class (closest sub-centre) exceeds ``drop_angle`` gets
    weight 0, the others B/kept, so the loss is the mean over the kept samples."""
    keep = target_cos >= math.cos(math.radians(drop_angle))
    kept = keep.sum()
    w = keep.to(target_cos.dtype) * (keep.numel() / kept.clamp_min(1).to(target_cos.dtype))
    return w, 1.0 - kept.to(target_cos.dtype) / keep.numel()


__all__ = ["check_subcenter_args", "drop_weights"]
