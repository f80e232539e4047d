"""The residual network of the Range-loss paper (Zhang et al., "Range Loss for Deep Face
Recognition with Long-Tailed Training Data", ICCV 2017), as this repo reads it.

What the paper fixes: 3x3 convolutions with stride 1, 2x2 max-pooling with stride 2,
feature maps growing from 32 to 512 channels, residual units, and the features of the
last two convolutional stages concatenated into the embedding layer (the DeepID2-style
multi-scale connection: the FC sees both a mid-level and the top-level map).

Our layout (block counts and normalisation are our choice; the paper trains without BN
in Caffe, we add BN after every conv as the other backbones do):

    stage i (i = 1..5, width base_width·2^(i−1): 32 … 512 at base 32):
        conv3x3(stride 1) → BN → PReLU, then ``layers[i]`` residual units
        (conv3x3 → BN → PReLU → conv3x3 → BN, + identity, → PReLU)
    2x2 max-pool (stride 2) after stages 1–4: 112 → 56 → 28 → 14 → 7
    feature map = concat(stage 4 after its pool, stage 5)  [B, w4 + w5, S/16, S/16]
    embedding   = BN1d(FC(flatten(Dropout(feature map))))

Stage 4's map is taken after its pool, the same tensor stage 5 reads, so both parts
share the S/16 grid and are flattened together (the spatial layout is kept, as in
IResNet, rather than pooled away).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dpface.models.iresnet import (
    STAGE_STRIDE,
    at_least_fp32,
    check_embedding_size,
    check_image,
    check_input_size,
    conv3x3,
    init_weights,
    positive_int,
)

NUM_STAGES = 5
DEFAULT_LAYERS = (1, 2, 3, 4, 2)  # residual units per stage (ours; the paper does not pin them)


class ResidualUnit(nn.Module):
    """conv3x3 → BN → PReLU → conv3x3 → BN, plus the identity, then PReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1, self.prelu1 = conv3x3(c, c), nn.BatchNorm2d(c), nn.PReLU(c)
        self.conv2, self.bn2, self.prelu2 = conv3x3(c, c), nn.BatchNorm2d(c), nn.PReLU(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu2(x + self.bn2(self.conv2(self.prelu1(self.bn1(self.conv1(x))))))


def check_rangenet_layers(layers: Sequence[int]) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of {NUM_STAGES} residual-unit counts, got {layers!r}")
    layers = list(layers)
    if len(layers) != NUM_STAGES or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in layers):
        raise ValueError(f"layers must be {NUM_STAGES} residual-unit counts >= 0 (one per stage, "
                         f"e.g. {list(DEFAULT_LAYERS)}), got {layers!r}")
    return layers


class RangeNet(nn.Module):
    """Range-loss residual net over [B,3,S,S] images in [-1,1]; unnormalised float32 [B,D]."""

    def __init__(self, embedding_size: int, base_width: int = 32,
                 layers: Sequence[int] = DEFAULT_LAYERS, dropout: float = 0.0,
                 input_size: int = 112):
        super().__init__()
        check_embedding_size(embedding_size)
        positive_int("base_width", base_width)
        layers = check_rangenet_layers(layers)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.input_size = check_input_size(input_size)  # four 2x2 pools: divisible by 16
        self.embedding_size = embedding_size
        self.widths = [base_width * 2**i for i in range(NUM_STAGES)]
        cin = 3
        for i, (n, w) in enumerate(zip(layers, self.widths)):
            units = [conv3x3(cin, w), nn.BatchNorm2d(w), nn.PReLU(w)]
            units += [ResidualUnit(w) for _ in range(n)]
            setattr(self, f"stage{i + 1}", nn.Sequential(*units))
            cin = w
        self.pool = nn.MaxPool2d(2, stride=2)
        self.feature_channels = self.widths[-2] + self.widths[-1]
        spatial = input_size // STAGE_STRIDE
        self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(self.feature_channels * spatial * spatial, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self)

    def stage_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage 4 after its pool, stage 5): the two maps the embedding concatenates."""
        check_image(x, self.input_size)
        x = self.pool(self.stage1(x))
        x = self.pool(self.stage2(x))
        x = self.pool(self.stage3(x))
        c4 = self.pool(self.stage4(x))
        return c4, self.stage5(c4)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.stage_outputs(x), dim=1)

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.dropout(fmap), 1)
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32, as IResNet
            return self.features(self.fc(at_least_fp32(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.feature_map(x))


def rangenet(embedding_size: int, base_width: int = 32, layers: Sequence[int] | None = None,
             dropout: float = 0.0, input_size: int = 112) -> RangeNet:
    """Range-loss paper's residual net: widths base_width·(1,2,4,8,16), ``layers`` residual
    units per stage (default 1,2,3,4,2), stages 4+5 concatenated into the FC."""
    return RangeNet(embedding_size, base_width=base_width,
                    layers=DEFAULT_LAYERS if layers is None else layers, dropout=dropout,
                    input_size=input_size)
