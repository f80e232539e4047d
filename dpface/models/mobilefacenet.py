"""MobileFaceNet (Chen et al., 2018): a < 1M-parameter face backbone.

Table 1 of the paper, for a 112x112 input (t: expansion, c: channels, n: repeats,
s: stride of the first repeat):

    conv3x3            -  64  1  2     112 → 56
    depthwise conv3x3  -  64  1  1
    bottleneck         2  64  5  2     56 → 28
    bottleneck         4 128  1  2     28 → 14
    bottleneck         2 128  6  1
    bottleneck         4 128  1  2     14 → 7
    bottleneck         2 128  2  1
    conv1x1            - 512  1  1
    linear GDConv7x7   - 512  1  1     7 → 1
    linear conv1x1     -   D  1  1

Bottlenecks are MobileNetV2 inverted residuals with PReLU. The global depthwise
conv (GDConv) replaces global average pooling: it learns a weight per position,
because the centre of an aligned face matters more than its corners.
"""
from __future__ import annotations

import torch
from torch import nn

from dpface.models.checkpointing import check_checkpoint, run_blocks
from dpface.models.iresnet import (
    STAGE_STRIDE,
    at_least_fp32,
    check_embedding_size,
    check_image,
    check_input_size,
    init_weights,
)

# (t, c, n, s) rows of Table 1's bottleneck stages.
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    """conv → BN (→ PReLU unless linear). No conv bias: BN follows."""
    layers = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2 if kernel == 3 else 0,
                  groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand to ``hidden`` → depthwise 3x3(stride) → linear 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            conv_bn(hidden, cout, 1, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


def paper_layout(width: float) -> tuple[list, list, int]:
    """Table 1 at channel multiplier ``width``: (stem convs (cin, cout, stride, groups),
    bottlenecks (cin, cout, stride, hidden), 1x1 conv channels)."""
    def ch(c: int) -> int:
        # Multiples of 8 keep vectorised conv kernels efficient.
        return max(8, int(round(c * width / 8)) * 8)

    c64 = ch(64)
    stem = [(3, c64, 2, 1), (c64, c64, 1, c64)]
    blocks, cin = [], c64
    for t, c, n, s in BOTTLENECKS:
        for i in range(n):
            blocks.append((cin, ch(c), s if i == 0 else 1, cin * t))
            cin = ch(c)
    return stem, blocks, ch(512)


def insightface_layout(scale: int, blocks) -> tuple[list, list, int]:
    """insightface arcface_torch's MobileFaceNet ("mbf": scale 2, blocks (1, 4, 6, 2);
    "mbf_large": scale 4, blocks (2, 8, 12, 4)): Table 1's stages with the channels × scale
    but the expansion widths fixed at 128/256/512, the stem's 3x3 conv in 64 groups (or
    blocks[0] residual bottlenecks), and the 1x1 conv at 512 channels."""
    c64, c128 = 64 * scale, 128 * scale
    stem = [(3, c64, 2, 1)] + ([(c64, c64, 1, 64)] if blocks[0] == 1 else [])
    out = [(c64, c64, 1, 128)] * (blocks[0] if blocks[0] > 1 else 0)
    out += [(c64, c64, 2, 128)] + [(c64, c64, 1, 128)] * blocks[1]
    out += [(c64, c128, 2, 256)] + [(c128, c128, 1, 256)] * blocks[2]
    out += [(c128, c128, 2, 512)] + [(c128, c128, 1, 256)] * blocks[3]
    return stem, out, 512


class MobileFaceNet(nn.Module):
    """MobileFaceNet over [B,3,S,S] images in [-1,1]; returns unnormalised float32 [B,D]."""

    def __init__(self, embedding_size: int, width: float = 1.0, input_size: int = 112,
                 checkpoint: str = "none", checkpoint_every: int = 2, layout=None):
        super().__init__()
        check_embedding_size(embedding_size)
        # Activation checkpointing of the bottlenecks (dpface/models/checkpointing.py).
        self.checkpoint, self.checkpoint_every = check_checkpoint(checkpoint, checkpoint_every)
        if isinstance(width, bool) or not isinstance(width, (int, float)) \
                or not 0 < width < float("inf"):
            raise ValueError(f"width must be a positive number, got {width!r}")
        self.input_size = check_input_size(input_size)
        self.embedding_size = embedding_size
        layout = paper_layout(width) if layout is None else layout
        stem, blocks, c512 = layout
        self.stem = nn.Sequential(*(conv_bn(ci, co, 3, stride=s, groups=g) for ci, co, s, g in stem))
        self.blocks = nn.Sequential(*(Bottleneck(ci, co, stride=s, hidden=h) for ci, co, s, h in blocks))
        cin = blocks[-1][1]
        self.conv_sep = conv_bn(cin, c512, 1)
        self.feature_channels = c512
        spatial = input_size // STAGE_STRIDE
        # GDConv: one spatial filter per channel covering the whole final map; linear.
        self.gdconv = conv_bn(c512, c512, spatial, groups=c512, act=False)
        self.linear = nn.Conv2d(c512, embedding_size, 1, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.feature_map(x))

    # forward = embed ∘ feature_map, as in IResNet (wrappers read the map in between).
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 conv's map before GDConv, [B, feature_channels, S/16, S/16]."""
        check_image(x, self.input_size)
        x = run_blocks(self.blocks, self.stem(x), self.checkpoint, self.checkpoint_every, self.training)
        return self.conv_sep(x)

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.linear(self.gdconv(fmap)), 1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(at_least_fp32(x))


def mobilefacenet(embedding_size: int, width: float = 1.0, input_size: int = 112,
                  checkpoint: str = "none", checkpoint_every: int = 2) -> MobileFaceNet:
    """MobileFaceNet (Chen et al. 2018); ``width`` scales every channel count; ``checkpoint``
    (none | blocks | every_n, with ``checkpoint_every``) checkpoints the bottlenecks."""
    return MobileFaceNet(embedding_size, width=width, input_size=input_size,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every)


def mbf(embedding_size: int, scale: int = 2, blocks=(1, 4, 6, 2), input_size: int = 112,
        checkpoint: str = "none", checkpoint_every: int = 2) -> MobileFaceNet:
    """insightface arcface_torch's MobileFaceNet ("mbf"; scale 4 with blocks (2, 8, 12, 4) is
    their "mbf_large"): its weights load by name (models/pretrained.py)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if isinstance(blocks, (str, bytes)) or len(blocks) != 4 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in blocks):
        raise ValueError(f"blocks must be 4 block counts >= 1, e.g. [1, 4, 6, 2], got {blocks!r}")
    return MobileFaceNet(embedding_size, input_size=input_size, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, layout=insightface_layout(scale, list(blocks)))
