"""Backbone registry: a config names a backbone as ``{name: iresnet50, dropout: 0.0}``.

Every backbone maps float images [B,3,S,S] in [-1,1] to unnormalised float32
features [B,D]; the head normalises them. The trainer supplies D (embedding_size).

A wrapper (``qan``) takes another backbone spec as its ``base``:
``{name: qan, hidden: 64, base: {name: iresnet18}}``; the registry checks and builds
the nested spec (with the same embedding size), so a typo inside ``base`` fails at
config load with the valid names, as one at the top level does.
"""
from __future__ import annotations

from typing import Mapping

from torch import nn

from dpface.models.iresnet import (
    IResNet,
    convert_insightface_state_dict,
    iresnet18,
    iresnet34,
    iresnet50,
    iresnet100,
    iresnet200,
    iresnet_tiny,
)
from dpface.models.mobilefacenet import MobileFaceNet, mbf, mobilefacenet
from dpface.models.quality import QualityAware, qan
from dpface.models.rangenet import RangeNet, rangenet
from dpface.models.vit import ViT, vit_b, vit_l, vit_s, vit_t, vit_tiny_cpu
from dpface.registry import Registry, SpecError

# The constructor parameter of a wrapper that holds another backbone spec.
NESTED_SPEC_PARAM = "base"


class BackboneRegistry(Registry):
    """A Registry whose wrapper specs hold a base backbone spec (one level: a wrapper's
    base must be a plain backbone)."""

    def is_wrapper(self, name: str) -> bool:
        return NESTED_SPEC_PARAM in self.parameters(name)

    def check(self, name, params, provided=()):
        super().check(name, params, provided)
        if not self.is_wrapper(name) or isinstance(params.get(NESTED_SPEC_PARAM), nn.Module):
            return  # a plain backbone, or a base built programmatically
        sub = params.get(NESTED_SPEC_PARAM)
        if not isinstance(sub, Mapping) or "name" not in sub:
            raise SpecError(f"{self.kind} '{name}': '{NESTED_SPEC_PARAM}' must be a {self.kind} spec "
                            f"with a 'name' (e.g. {{name: iresnet18}}); valid names: "
                            f"{', '.join(n for n in self.names() if not self.is_wrapper(n))}")
        try:
            if sub["name"] in self and self.is_wrapper(sub["name"]):
                raise SpecError(f"'{sub['name']}' wraps a backbone itself; the base must be a "
                                "plain backbone")
            # The wrapper passes its own embedding size on: the base must not set one.
            self.check(sub["name"], {k: v for k, v in sub.items() if k != "name"},
                       provided=("embedding_size",))
        except SpecError as e:
            raise SpecError(f"{self.kind} '{name}' -> {NESTED_SPEC_PARAM}: {e}") from None

    def _build_nested(self, name, spec, provided):
        sub = spec.get(NESTED_SPEC_PARAM)
        if self.is_wrapper(name) and isinstance(sub, Mapping):
            spec[NESTED_SPEC_PARAM] = self.build(sub, **provided)

    def input_size(self, spec: Mapping) -> int | None:
        """The input side a spec's backbone takes (a wrapper's is its base's), or None
        when its constructor has no ``input_size``."""
        name = spec["name"]
        if self.is_wrapper(name) and isinstance(spec.get(NESTED_SPEC_PARAM), Mapping):
            return self.input_size(spec[NESTED_SPEC_PARAM])
        p = self.parameters(name).get("input_size")
        return spec.get("input_size", p.default if p is not None else None)


BACKBONES = BackboneRegistry("backbone")
BACKBONES.register("iresnet18", iresnet18)
BACKBONES.register("iresnet34", iresnet34)
BACKBONES.register("iresnet50", iresnet50)
BACKBONES.register("iresnet100", iresnet100)
BACKBONES.register("iresnet200", iresnet200)
BACKBONES.register("iresnet_tiny", iresnet_tiny)
BACKBONES.register("mobilefacenet", mobilefacenet)
BACKBONES.register("mbf", mbf)
BACKBONES.register("vit_t", vit_t)
BACKBONES.register("vit_s", vit_s)
BACKBONES.register("vit_b", vit_b)
BACKBONES.register("vit_l", vit_l)
BACKBONES.register("vit_tiny_cpu", vit_tiny_cpu)
BACKBONES.register("rangenet", rangenet)
BACKBONES.register("qan", qan)


def build_backbone(spec: Mapping, embedding_size: int) -> nn.Module:
    """Build the backbone a config names; unknown names/options raise SpecError."""
    return BACKBONES.build(spec, embedding_size=embedding_size)


__all__ = [
    "BACKBONES",
    "build_backbone",
    "IResNet",
    "MobileFaceNet",
    "ViT",
    "QualityAware",
    "RangeNet",
    "convert_insightface_state_dict",
]
