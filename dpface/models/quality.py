"""Quality-aware backbone for set-to-set recognition (after Liu, Yan & Ouyang, "Quality
Aware Network for Set to Set Recognition", CVPR 2017).

``QualityAware`` wraps any backbone that splits its forward as ``embed(feature_map(x))``
(IResNet, MobileFaceNet, RangeNet) and adds a small quality branch on that feature map:

    conv3x3(C → hidden) → BN → PReLU → global average pool → FC(hidden → 1) → activation

giving one positive score per image. A set (template) is then pooled as the
quality-weighted mean of its normalised embeddings (``dpface.eval.sets.quality_pool``);
the branch learns only through a set-level loss (``dpface.losses.set_loss``), which
rewards weights that make same-identity sets agree, i.e. that down-weight images the
embedding cannot be trusted on. No quality labels are needed.

``forward(x)`` returns the base backbone's embedding [B, D], bit for bit what the base
alone returns, so training, evaluation and ONNX export treat the wrapper like any
backbone; ``forward(x, with_quality=True)`` returns (embedding, quality [B]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpface.models.iresnet import at_least_fp32, init_weights, positive_int

ACTIVATIONS = ("sigmoid", "softplus")
# A floor on the score: weights are normalised within a set, so a score that underflows
# to 0 would silently drop an image (and a set of such images would have no weights).
QUALITY_EPS = 1e-4


class QualityAware(nn.Module):
    def __init__(self, embedding_size: int, base: nn.Module, hidden: int = 64,
                 activation: str = "sigmoid", detach_features: bool = False):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"qan: base must be a backbone module (or a spec in a config), "
                            f"got {type(base).__name__}")
        if isinstance(base, QualityAware):
            raise ValueError("qan: base is already a qan backbone; wrap a plain backbone")
        for attr in ("feature_map", "embed", "feature_channels"):
            if not hasattr(base, attr):
                raise ValueError(
                    f"qan: base backbone {type(base).__name__} has no '{attr}'; the quality "
                    "branch needs a backbone whose forward is embed(feature_map(x)) "
                    "(iresnet*, mobilefacenet, rangenet)")
        positive_int("hidden", hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"qan: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if getattr(base, "embedding_size", embedding_size) != embedding_size:
            raise ValueError(f"qan: base embeds into D={base.embedding_size}, not {embedding_size}")
        self.base = base
        self.embedding_size = embedding_size
        self.input_size = getattr(base, "input_size", None)
        self.activation = activation
        self.detach_features = bool(detach_features)
        c = base.feature_channels
        self.quality = nn.Sequential(
            nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
            nn.PReLU(hidden), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1))
        init_weights(self.quality)
        # Start every score at the same value: pooling begins as the plain mean.
        nn.init.zeros_(self.quality[-1].weight)
        nn.init.zeros_(self.quality[-1].bias)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, detach_features={self.detach_features}"

    def score(self, fmap: torch.Tensor) -> torch.Tensor:
        """Positive quality [B] from the base's feature map."""
        if self.detach_features:
            fmap = fmap.detach()
        with torch.autocast(device_type=fmap.device.type, enabled=False):
            z = self.quality(at_least_fp32(fmap)).squeeze(1)
            if self.activation == "sigmoid":
                return QUALITY_EPS + (1 - QUALITY_EPS) * torch.sigmoid(z)
            return QUALITY_EPS + F.softplus(z)

    def forward(self, x: torch.Tensor, with_quality: bool = False):
        fmap = self.base.feature_map(x)
        emb = self.base.embed(fmap)
        if not with_quality:
            return emb
        return emb, self.score(fmap)


class QualityOutputs(nn.Module):
    """(embedding, quality) as a plain two-output module, for export (ONNX)."""

    def __init__(self, model: QualityAware):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x, with_quality=True)


def qan(embedding_size: int, base: nn.Module, hidden: int = 64, activation: str = "sigmoid",
        detach_features: bool = False) -> QualityAware:
    """Quality-aware wrapper: ``base`` is a backbone spec (``{name: iresnet18, ...}``), built
    with the same embedding size; ``hidden`` channels in the quality branch; ``activation``
    sigmoid (QAN's, scores in (0, 1)) or softplus; ``detach_features`` keeps the set loss's
    gradient out of the backbone (only the branch learns from it)."""
    return QualityAware(embedding_size, base, hidden=hidden, activation=activation,
                        detach_features=detach_features)
