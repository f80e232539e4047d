"""Backbone weights trained elsewhere, mapped onto dpface's backbones.

Three layouts are read (``backbone_state``):

* **arcface_torch** (insightface's PyTorch recipes, ``backbone.pth``): iresnet18/34/50/100/200
  use dpface's own parameter names (the ``fc.bias`` they keep is folded into the final BN,
  ``iresnet.convert_insightface_state_dict``); MobileFaceNet ("mbf", "mbf_large") is mapped by
  :func:`arcface_mbf_key` onto dpface's ``mbf`` backbone, whose structure is theirs.
* **dpface**: the ``backbone`` entry of a checkpoint's ``trainer.pt``, or a state dict saved from
  a dpface backbone.
* **a plain torch state dict** of either: wrapped in ``{"state_dict": …}`` / ``{"model": …}`` /
  ``{"backbone": …}``, with ``module.`` (DDP), ``_orig_mod.`` (torch.compile) or ``backbone.``
  prefixes: unwrapped and stripped. Other names are renamed by a key map
  ``{their_prefix: our_prefix}`` (``train.init_key_map``), applied first.

``infer_backbone`` reads the architecture of an arcface_torch state dict (depth, width, embedding
size, MobileFaceNet scale and blocks) for a file that comes without a config (a teacher).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from dpface.models.iresnet import DEPTHS, convert_insightface_state_dict

WRAPPERS = ("state_dict", "model", "backbone")
PREFIXES = ("module.", "_orig_mod.", "backbone.")


class WeightsError(ValueError):
    """A weights file that cannot be mapped onto the backbone; the message names the key."""


def unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    """The flat tensor mapping inside ``obj`` (a state dict or a dict wrapping one)."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    raise WeightsError(f"{source}: not a state dict (a mapping of parameter names to tensors, or one "
                       f"under {'/'.join(WRAPPERS)})")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes every key shares (``module.``, ``_orig_mod.``, ``backbone.``)."""
    changed = True
    while changed and state:
        changed = False
        for p in PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    return state


def rename(state: dict[str, torch.Tensor], key_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by ``{their_prefix: our_prefix}`` (the longest matching prefix wins)."""
    if not key_map:
        return state
    prefixes = sorted(key_map, key=len, reverse=True)
    out = {}
    for k, v in state.items():
        p = next((p for p in prefixes if k.startswith(p)), None)
        out[k if p is None else key_map[p] + k[len(p):]] = v
    return out


# -- arcface_torch's MobileFaceNet ------------------------------------------------------
# Their module tree (the public layout; the facts, not their code): layers[0] a ConvBlock
# (conv, BN, PReLU); layers[1] a depthwise ConvBlock (blocks[0] == 1) or a Residual of
# blocks[0] DepthWise blocks; layers[2..7] alternate a strided DepthWise and a Residual of
# blocks[1], blocks[2], blocks[3] DepthWise blocks; conv_sep a ConvBlock; features a GDC:
# layers[0] a LinearBlock (depthwise 7×7 conv, BN), layers[2] Linear(512, D), layers[3]
# BatchNorm1d(D). A ConvBlock/LinearBlock keeps its modules in ``.layers``; a DepthWise
# holds ConvBlock, ConvBlock, LinearBlock in ``.layers``; a Residual its DepthWise blocks.
def _mbf_block_offsets(blocks) -> dict[int, int]:
    """arcface ``layers`` index of each DepthWise/Residual → dpface ``blocks`` index of its
    first bottleneck."""
    first = 0 if blocks[0] == 1 else blocks[0]  # a Residual stem occupies blocks[0] bottlenecks
    out = {} if blocks[0] == 1 else {1: 0}
    i = first
    for pos, n in ((2, 1), (3, blocks[1]), (4, 1), (5, blocks[2]), (6, 1), (7, blocks[3])):
        out[pos] = i
        i += n
    return out


def arcface_mbf_key(key: str, blocks) -> str | None:
    """The dpface ``mbf`` name of an arcface_torch MobileFaceNet key (None: no counterpart)."""
    m = re.fullmatch(r"layers\.0\.layers\.(\d+)\.(\w+)", key)
    if m:
        return f"stem.0.{m[1]}.{m[2]}"
    offsets = _mbf_block_offsets(blocks)
    if blocks[0] == 1:
        m = re.fullmatch(r"layers\.1\.layers\.(\d+)\.(\w+)", key)
        if m:
            return f"stem.1.{m[1]}.{m[2]}"
    m = re.fullmatch(r"layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.(\w+)", key)
    if m and int(m[1]) in offsets:  # a Residual: its j-th DepthWise, sub-block k, module i
        return f"blocks.{offsets[int(m[1])] + int(m[2])}.body.{m[3]}.{m[4]}.{m[5]}"
    m = re.fullmatch(r"layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.(\w+)", key)
    if m and int(m[1]) in offsets:  # a strided DepthWise
        return f"blocks.{offsets[int(m[1])]}.body.{m[2]}.{m[3]}.{m[4]}"
    m = re.fullmatch(r"conv_sep\.layers\.(\d+)\.(\w+)", key)
    if m:
        return f"conv_sep.{m[1]}.{m[2]}"
    m = re.fullmatch(r"features\.layers\.0\.layers\.(\d+)\.(\w+)", key)
    if m:
        return f"gdconv.{m[1]}.{m[2]}"
    if key == "features.layers.2.weight":
        return "linear.weight"
    m = re.fullmatch(r"features\.layers\.3\.(\w+)", key)
    if m:
        return f"features.{m[1]}"
    return None


def _mbf_blocks(state) -> tuple[int, ...]:
    """arcface_torch MobileFaceNet ``blocks`` from the keys: a depthwise stem or a Residual of
    n blocks, then the DepthWise counts of the three Residuals."""
    def count(pos):
        return len({int(m[1]) for k in state if (m := re.match(rf"layers\.{pos}\.layers\.(\d+)\.layers\.", k))})

    stem = 1 if "layers.1.layers.0.weight" in state else count(1)
    return (stem, count(3), count(5), count(7))


def layout_of(state: Mapping[str, torch.Tensor]) -> str:
    """"arcface_mbf", "iresnet" (arcface_torch's and dpface's names agree) or "other"."""
    if "layers.0.layers.0.weight" in state and "conv_sep.layers.0.weight" in state:
        return "arcface_mbf"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state and "fc.weight" in state:
        return "iresnet"
    return "other"


def infer_backbone(state: Mapping[str, torch.Tensor]) -> dict | None:
    """The dpface model spec of an arcface_torch (or dpface iresnet) state dict, with its
    embedding size: ``({name: …, …}, embedding_size)``; None when the layout is not known."""
    kind = layout_of(state)
    if kind == "iresnet":
        depth = tuple(len({int(m[1]) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
                      for i in range(1, 5))
        name = next((n for n, d in DEPTHS.items() if d == depth), None)
        width = int(state["conv1.weight"].shape[0])
        if name is None:
            return None
        spec = {"name": name}
        if width != 64:
            spec["base_width"] = width
        return {"model": spec, "embedding_size": int(state["fc.weight"].shape[0])}
    if kind == "arcface_mbf":
        scale = int(state["layers.0.layers.0.weight"].shape[0]) // 64
        return {"model": {"name": "mbf", "scale": scale, "blocks": list(_mbf_blocks(state))},
                "embedding_size": int(state["features.layers.2.weight"].shape[0])}
    return None


LAYOUT_NAMES = {"iresnet": "iresnet state dict (arcface_torch / dpface names)",
                "arcface_mbf": "arcface_torch MobileFaceNet state dict", "other": "state dict"}


def backbone_state(obj, source: str, key_map: Mapping[str, str] | None = None):
    """(state dict in dpface's names, model spec inferred or None, what the file is) of a
    loaded weights file (module doc)."""
    state = rename(strip_prefixes(unwrap(obj, source)), key_map or {})
    kind = layout_of(state)
    spec = infer_backbone(state)
    if kind == "iresnet":
        return convert_insightface_state_dict(state), spec, LAYOUT_NAMES[kind]
    if kind == "arcface_mbf":
        blocks = _mbf_blocks(state)
        out = {}
        for k, v in state.items():
            new = arcface_mbf_key(k, blocks)
            if new is None:
                out[k] = v  # reported as dropped by the loader
                continue
            out[new] = v.reshape(*v.shape, 1, 1) if new == "linear.weight" else v
        return out, spec, LAYOUT_NAMES[kind]
    return state, spec, LAYOUT_NAMES[kind]


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Copy ``state`` into ``model`` by name; returns ``{"loaded", "new", "dropped"}`` key
    lists (new: the model's keys the file lacks; dropped: the file's keys the model lacks).
    A shape mismatch raises :class:`WeightsError` naming the key and both shapes; nothing is
    copied then."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise WeightsError(f"{source}: '{k}' has shape {list(v.shape)} in the file but "
                               f"{list(own[k].shape)} in the model")
    loaded = [k for k in own if k in state]
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(state[k].to(own[k].dtype))
    return {"loaded": loaded, "new": [k for k in own if k not in state],
            "dropped": [k for k in state if k not in own]}


__all__ = ["WeightsError", "arcface_mbf_key", "backbone_state", "infer_backbone", "layout_of",
           "load_into", "rename", "strip_prefixes", "unwrap"]
