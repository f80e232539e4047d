"""Loss registries: a config names a loss as ``{name: arcface, s: 64, m: 0.5}``.

Wrapper transforms (``km``, ``mv_softmax``, ``sv_softmax``) take another loss spec as
their ``base`` parameter: ``{name: km, gamma: 1, base: {name: arcface, s: 64}}``. The
registry checks and builds nested specs recursively, so a typo inside ``base`` fails
at config load with the valid names, like one at the top level.
"""
from __future__ import annotations

from collections.abc import Mapping

from dpface.losses.adacos import AdaCos, adacos
from dpface.losses.adaptive import (
    AdaFace,
    CurricularFace,
    ElasticFace,
    MagFace,
    adaface,
    curricularface,
    elasticface,
    magface,
)
from dpface.losses.center import CenterLoss
from dpface.losses.contrastive import ContrastiveLoss
from dpface.losses.distill import DistillLoss
from dpface.losses.km import KnotMagnify, km
from dpface.losses.large_margin import LSoftmax, SphereFace, lsoftmax, sphereface
from dpface.losses.margin import (
    CombinedMargin,
    HeadContext,
    LogitTransform,
    NormFace,
    Softmax,
    arcface,
    combined,
    cosface,
    normface,
)
from dpface.losses.mv_softmax import MVSoftmax, mv_softmax, sv_softmax
from dpface.losses.range_loss import RangeLoss
from dpface.losses.set_loss import SetToSetLoss
from dpface.losses.triplet import TripletLoss
from dpface.registry import Registry, SpecError

# Parameters of a loss constructor that hold another loss spec.
NESTED_SPEC_PARAMS = ("base",)


class LossRegistry(Registry):
    """A Registry whose specs may nest other specs of the same registry."""

    def _nested(self, name: str, params: Mapping):
        accepted = self.parameters(name)
        return [(k, params[k]) for k in NESTED_SPEC_PARAMS
                if k in accepted and params.get(k) is not None]

    def check(self, name, params, provided=()):
        super().check(name, params, provided)
        for key, sub in self._nested(name, params):
            if isinstance(sub, LogitTransform):
                continue  # built programmatically
            if not isinstance(sub, Mapping) or "name" not in sub:
                raise SpecError(f"{self.kind} '{name}': '{key}' must be a {self.kind} spec "
                                f"with a 'name' (e.g. {{name: arcface, s: 64}}); valid names: "
                                f"{', '.join(self.names())}")
            try:
                self.check(sub["name"], {k: v for k, v in sub.items() if k != "name"})
            except SpecError as e:
                raise SpecError(f"{self.kind} '{name}' -> {key}: {e}") from None

    def _build_nested(self, name, spec, provided):
        for key, sub in self._nested(name, spec):
            if not isinstance(sub, LogitTransform):
                spec[key] = self.build(sub)


LOSSES = LossRegistry("loss")
LOSSES.register("softmax", Softmax)
LOSSES.register("normface", normface)
LOSSES.register("cosface", cosface)
LOSSES.register("arcface", arcface)
LOSSES.register("combined", combined)
LOSSES.register("lsoftmax", lsoftmax)
LOSSES.register("sphereface", sphereface)
LOSSES.register("adacos", adacos)
LOSSES.register("km", km)
LOSSES.register("mv_softmax", mv_softmax)
LOSSES.register("sv_softmax", sv_softmax)
LOSSES.register("adaface", adaface)
LOSSES.register("magface", magface)
LOSSES.register("curricularface", curricularface)
LOSSES.register("elasticface", elasticface)


# Embedding losses added to the classification loss with a weight. A constructor takes
# ``num_classes`` and ``embedding_size`` (filled in by the trainer) plus its own
# parameters; the module is called as ``loss(embeddings [B_local, D] fp32, labels
# [B_local], step) -> scalar`` on every rank (it may gather across ranks itself). One with
# ``needs_quality = True`` (qan_set) is also given ``quality=`` the backbone's scores [B_local].
AUX_LOSSES = Registry("auxiliary loss")
AUX_LOSSES.register("range", RangeLoss)
AUX_LOSSES.register("center", CenterLoss)
AUX_LOSSES.register("triplet", TripletLoss)
AUX_LOSSES.register("contrastive", ContrastiveLoss)
AUX_LOSSES.register("qan_set", SetToSetLoss)
AUX_LOSSES.register("distill", DistillLoss)


def build_loss(spec) -> LogitTransform:
    return LOSSES.build(spec)


def build_aux_loss(spec, num_classes: int, embedding_size: int, group=None, **extra):
    """Build one auxiliary loss from ``{name, weight, **params}``; returns (module, weight).
    ``group`` (the head group) goes to losses that shard class state across ranks; ``extra``
    (what the trainer resolved: a teacher network, the AMP dtype) to losses that take it."""
    spec = dict(spec)
    weight = float(spec.pop("weight"))
    provided = dict(num_classes=num_classes, embedding_size=embedding_size)
    accepted = AUX_LOSSES.parameters(spec["name"])
    if "group" in accepted:
        provided["group"] = group
    provided.update({k: v for k, v in extra.items() if k in accepted})
    return AUX_LOSSES.build(spec, **provided), weight


__all__ = ["LOSSES", "AUX_LOSSES", "build_loss", "build_aux_loss", "LogitTransform",
           "HeadContext", "CombinedMargin", "Softmax", "NormFace", "SphereFace", "LSoftmax",
           "AdaCos", "KnotMagnify", "MVSoftmax", "RangeLoss", "CenterLoss", "TripletLoss",
           "ContrastiveLoss", "SetToSetLoss", "DistillLoss", "AdaFace", "CurricularFace", "ElasticFace", "MagFace",
           "LossRegistry"]
