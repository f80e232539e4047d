"""Backbone registry: a config names a backbone as ``{name: iresnet50, dropout: 0.0}``.

Every backbone maps float images [B,3,S,S] in [-1,1] to unnormalised float32
features [B,D]; the head normalises them. The trainer supplies D (embedding_size).
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
from dpface.models.mobilefacenet import MobileFaceNet, mobilefacenet
from dpface.models.vit import ViT, vit_b, vit_l, vit_s, vit_t, vit_tiny_cpu
from dpface.registry import Registry

BACKBONES = Registry("backbone")
BACKBONES.register("iresnet18", iresnet18)
BACKBONES.register("iresnet34", iresnet34)
BACKBONES.register("iresnet50", iresnet50)
BACKBONES.register("iresnet100", iresnet100)
BACKBONES.register("iresnet200", iresnet200)
BACKBONES.register("iresnet_tiny", iresnet_tiny)
BACKBONES.register("mobilefacenet", mobilefacenet)
BACKBONES.register("vit_t", vit_t)
BACKBONES.register("vit_s", vit_s)
BACKBONES.register("vit_b", vit_b)
BACKBONES.register("vit_l", vit_l)
BACKBONES.register("vit_tiny_cpu", vit_tiny_cpu)


def build_backbone(spec: Mapping, embedding_size: int) -> nn.Module:
    """Build the backbone a config names; unknown names/options raise SpecError."""
    return BACKBONES.build(spec, embedding_size=embedding_size)


__all__ = [
    "BACKBONES",
    "build_backbone",
    "IResNet",
    "MobileFaceNet",
    "ViT",
    "convert_insightface_state_dict",
]
