"""Loss registry: a config names a loss as ``{name: arcface, s: 64, m: 0.5}``."""
from dpface.losses.margin import (CombinedMargin, LogitTransform, Softmax, arcface, combined,
                                  cosface, normface)
from dpface.registry import Registry

LOSSES = Registry("loss")
LOSSES.register("softmax", Softmax)
LOSSES.register("normface", normface)
LOSSES.register("cosface", cosface)
LOSSES.register("arcface", arcface)
LOSSES.register("combined", combined)


# Embedding losses added to the classification loss with a weight. A constructor takes
# ``num_classes`` and ``embedding_size`` (filled in by the trainer) plus its own
# parameters; the module is called as ``loss(embeddings [B_local, D] fp32, labels
# [B_local], step) -> scalar`` on every rank (it may gather across ranks itself).
AUX_LOSSES = Registry("auxiliary loss")


def build_loss(spec) -> LogitTransform:
    return LOSSES.build(spec)


def build_aux_loss(spec, num_classes: int, embedding_size: int):
    """Build one auxiliary loss from ``{name, weight, **params}``; returns (module, weight)."""
    spec = dict(spec)
    weight = float(spec.pop("weight"))
    return AUX_LOSSES.build(spec, num_classes=num_classes, embedding_size=embedding_size), weight


__all__ = ["LOSSES", "AUX_LOSSES", "build_loss", "build_aux_loss", "LogitTransform", "CombinedMargin", "Softmax"]
