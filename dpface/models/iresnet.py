"""Improved ResNet (IResNet) backbones, as used by ArcFace (Deng et al., 2019).

Differences from the ImageNet ResNet, all from the paper's "improved residual unit"
and "embedding setting E":
  * the stem is a stride-1 3x3 conv, since faces are only 112x112;
  * each block is BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN, with the
    stride on the second conv and no activation after the addition;
  * the head is BN → Dropout → Flatten → FC → BN1d, which keeps the spatial
    layout (a 7x7 grid) that global pooling would throw away.

Parameter names follow the insightface layout (conv1, bn1, prelu, layer1..4, bn2,
fc, features) so its published checkpoints load after
:func:`convert_insightface_state_dict`.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

import torch
from torch import nn

from dpface.models.checkpointing import check_checkpoint, run_blocks

# PReLU starts at slope 0.25; the Kaiming gain uses the same slope.
PRELU_INIT = 0.25
STAGE_STRIDE = 16  # four stride-2 stages: 112 → 7


def positive_int(name: str, value) -> int:
    # bool is an int subclass; `True` as a width is a config typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_input_size(input_size: int) -> int:
    positive_int("input_size", input_size)
    if input_size % STAGE_STRIDE:
        raise ValueError(
            f"input_size must be divisible by {STAGE_STRIDE} (the backbone downsamples 4 times), "
            f"got {input_size}; e.g. {STAGE_STRIDE * max(1, round(input_size / STAGE_STRIDE))}"
        )
    return input_size


def check_embedding_size(embedding_size: int) -> int:
    return positive_int("embedding_size", embedding_size)


def check_image(x: torch.Tensor, input_size: int) -> None:
    # Without this a wrong resolution only surfaces as a shape error inside the FC.
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != input_size or x.shape[3] != input_size:
        raise ValueError(
            f"expected images [B,3,{input_size},{input_size}], got {list(x.shape)}"
        )


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast) up to fp32 for the precision-critical tail; fp32/fp64 as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs/linears (fan_in: correct for depthwise convs too, where
    torch's fan_out would count all output channels), BN to identity, PReLU to 0.25.
    Every conv is followed by BN, so the exact gain only matters at step 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=PRELU_INIT, mode="fan_in",
                                    nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.PReLU):
            nn.init.constant_(m.weight, PRELU_INIT)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # No bias: a BN follows every conv and would cancel it.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet over [B,3,S,S] images in [-1,1]; returns unnormalised float32 [B,D]."""

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int,
        base_width: int = 64,
        dropout: float = 0.0,
        input_size: int = 112,
        checkpoint: str = "none",
        checkpoint_every: int = 2,
    ):
        super().__init__()
        layers = check_layers(layers)
        # Activation checkpointing of the residual blocks (dpface/models/checkpointing.py).
        self.checkpoint, self.checkpoint_every = check_checkpoint(checkpoint, checkpoint_every)
        check_embedding_size(embedding_size)
        positive_int("base_width", base_width)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.input_size = check_input_size(input_size)
        self.embedding_size = embedding_size

        widths = [base_width * 2**i for i in range(4)]  # 64/128/256/512 at base 64
        self.conv1 = conv3x3(3, base_width)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.prelu = nn.PReLU(base_width)
        cin = base_width
        for i, (n, cout) in enumerate(zip(layers, widths)):
            blocks = [IBasicBlock(cin, cout, stride=2)]
            blocks += [IBasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        spatial = input_size // STAGE_STRIDE
        self.feature_channels = cin
        self.bn2 = nn.BatchNorm2d(cin)
        self.dropout = nn.Dropout(p=float(dropout))
        # No FC bias: the BN1d right after subtracts the batch mean, so a bias would
        # get zero gradient. (insightface keeps one; the converter folds it away.)
        self.fc = nn.Linear(cin * spatial * spatial, embedding_size, bias=False)
        # insightface freezes this BN's scale at 1; we let it train (the head
        # normalises anyway), which keeps "every parameter gets a gradient" true.
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.feature_map(x))

    # forward = embed ∘ feature_map: wrappers (models/quality.py) read the map in between.
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map after BN, [B, feature_channels, S/16, S/16]."""
        check_image(x, self.input_size)
        x = self.prelu(self.bn1(self.conv1(x)))
        blocks = [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]
        return self.bn2(run_blocks(blocks, x, self.checkpoint, self.checkpoint_every, self.training))

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.dropout(fmap), 1)
        # The 25088-wide FC and the final BN run in fp32 even under autocast: in
        # fp16 the long reduction loses precision and the BN statistics can overflow.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(self.fc(at_least_fp32(x)))


def check_layers(layers: Sequence[int]) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of 4 block counts, got {layers!r}")
    layers = list(layers)
    if len(layers) != 4 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in layers
    ):
        raise ValueError(
            f"layers must be 4 block counts >= 1 (one per stage, e.g. [2, 2, 2, 2]), "
            f"got {layers!r}"
        )
    return layers


# name → blocks per stage (ArcFace / insightface depths; iresnet_tiny is a CPU demo).
DEPTHS: Mapping[str, tuple[int, ...]] = MappingProxyType({
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
})


def _preset(name: str, depth: tuple[int, ...], default_width: int = 64):
    def build(
        embedding_size: int,
        base_width: int = default_width,
        dropout: float = 0.0,
        layers: Sequence[int] | None = None,
        input_size: int = 112,
        checkpoint: str = "none",
        checkpoint_every: int = 2,
    ) -> IResNet:
        return IResNet(
            depth if layers is None else layers,
            embedding_size,
            base_width=base_width,
            dropout=dropout,
            input_size=input_size,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{name}: IResNet with {list(depth)} blocks per stage, widths base_width·(1,2,4,8); "
        "`layers` overrides the depth; `checkpoint` (none | blocks | every_n, with "
        "`checkpoint_every`) checkpoints the residual blocks' activations."
    )
    return build


iresnet18 = _preset("iresnet18", DEPTHS["iresnet18"])
iresnet34 = _preset("iresnet34", DEPTHS["iresnet34"])
iresnet50 = _preset("iresnet50", DEPTHS["iresnet50"])
iresnet100 = _preset("iresnet100", DEPTHS["iresnet100"])
iresnet200 = _preset("iresnet200", DEPTHS["iresnet200"])
# One block per stage at width 16: the CPU demo backbone.
iresnet_tiny = _preset("iresnet_tiny", (1, 1, 1, 1), default_width=16)


def convert_insightface_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an insightface iresnet checkpoint onto :class:`IResNet`.

    The names already match; only ``fc.bias`` differs. In eval mode the BN1d after
    the FC computes (Wx + b − μ)/σ, so dropping b and using μ − b is exact; in
    training mode BN removes any constant shift anyway.
    """
    out = dict(state)
    bias = out.pop("fc.bias", None)
    if bias is not None:
        if "features.running_mean" not in out:
            raise KeyError("checkpoint has fc.bias but no features.running_mean to fold it into")
        out["features.running_mean"] = out["features.running_mean"] - bias
    return out
