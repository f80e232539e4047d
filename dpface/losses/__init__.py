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


def build_loss(spec) -> LogitTransform:
    return LOSSES.build(spec)


__all__ = ["LOSSES", "build_loss", "LogitTransform", "CombinedMargin", "Softmax"]
