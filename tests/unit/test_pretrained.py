"""Weights trained elsewhere (models/pretrained.py): state dicts in insightface arcface_torch's
public layout — key names and shapes written here as a table from that layout, not from
dpface's modules — load into dpface's backbones and give the embedding an independent
functional forward of that layout computes from the same tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpface.models import build_backbone
from dpface.models.pretrained import WeightsError, backbone_state, infer_backbone, load_into, rename

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the layouts, as tables of (key, shape) ----------------------------------------------
def _bn(prefix: str, c: int) -> list:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def arcface_iresnet_table(depth, emb: int, width: int = 64, size: int = 112) -> list:
    """arcface_torch IResNet: conv1/bn1/prelu, layer1..4 of IBasicBlocks (bn1, conv1 3x3, bn2,
    prelu, conv2 3x3 stride, bn3, downsample conv1x1+BN on each stage's first block), bn2,
    fc (with bias) over the flattened 7×7 map, features (BatchNorm1d)."""
    rows = [("conv1.weight", (width, 3, 3, 3)), *_bn("bn1", width), ("prelu.weight", (width,))]
    cin = width
    for s, n in enumerate(depth):
        cout = width * 2 ** s
        for j in range(n):
            p = f"layer{s + 1}.{j}"
            c_in = cin if j == 0 else cout
            rows += [*_bn(f"{p}.bn1", c_in), (f"{p}.conv1.weight", (cout, c_in, 3, 3)), *_bn(f"{p}.bn2", cout),
                     (f"{p}.prelu.weight", (cout,)), (f"{p}.conv2.weight", (cout, cout, 3, 3)),
                     *_bn(f"{p}.bn3", cout)]
            if j == 0:
                rows += [(f"{p}.downsample.0.weight", (cout, c_in, 1, 1)), *_bn(f"{p}.downsample.1", cout)]
        cin = cout
    spatial = size // 16
    return rows + [*_bn("bn2", cin), ("fc.weight", (emb, cin * spatial * spatial)), ("fc.bias", (emb,)),
                   *_bn("features", emb)]


def _conv_block(prefix, cin, cout, k, groups=1, act=True) -> list:
    rows = [(f"{prefix}.layers.0.weight", (cout, cin // groups, k, k)), *_bn(f"{prefix}.layers.1", cout)]
    return rows + ([(f"{prefix}.layers.2.weight", (cout,))] if act else [])


def _depthwise(prefix, cin, cout, groups) -> list:
    return (_conv_block(f"{prefix}.layers.0", cin, groups, 1) + _conv_block(f"{prefix}.layers.1", groups, groups, 3,
                                                                             groups=groups)
            + _conv_block(f"{prefix}.layers.2", groups, cout, 1, act=False))


# The Table of arcface_torch's MobileFaceNet: layers[2..7] as (out channels / 64·scale, groups)
# of the strided DepthWise and (channels / 64·scale, groups) of the Residual after it.
MBF_STAGES = [((1, 128), (1, 128)), ((2, 256), (2, 256)), ((2, 512), (2, 256))]


def arcface_mbf_table(scale: int, blocks, emb: int) -> list:
    c = 64 * scale
    rows = _conv_block("layers.0", 3, c, 3)
    if blocks[0] == 1:
        rows += _conv_block("layers.1", c, c, 3, groups=64)
    else:
        for j in range(blocks[0]):
            rows += _depthwise(f"layers.1.layers.{j}", c, c, 128)
    cin = c
    for s, ((mult, g_dw), (_, g_res)) in enumerate(MBF_STAGES):
        cout = 64 * scale * mult
        rows += _depthwise(f"layers.{2 + 2 * s}", cin, cout, g_dw)
        for j in range(blocks[1 + s]):
            rows += _depthwise(f"layers.{3 + 2 * s}.layers.{j}", cout, cout, g_res)
        cin = cout
    rows += _conv_block("conv_sep", cin, 512, 1)
    rows += _conv_block("features.layers.0", 512, 512, 7, groups=512, act=False)
    return rows + [("features.layers.2.weight", (emb, 512)), *_bn("features.layers.3", emb)]


def random_state(table, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in table:
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("running_mean", ".bias")) or "prelu" in k or k.endswith("layers.2.weight") and len(shape) == 1:
            out[k] = 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".weight") and len(shape) == 1:  # BN scale
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:  # conv / linear: fan-in scaled so the activations stay O(1) through the depth
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[k] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return out


# -- their forwards, written from the layout ------------------------------------------------
def _bn_f(x, s, p):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"],
                        training=False, eps=1e-5)


def iresnet_forward(s, depth, x):
    x = F.prelu(_bn_f(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"), s["prelu.weight"])
    for st, n in enumerate(depth):
        for j in range(n):
            p = f"layer{st + 1}.{j}"
            stride = 2 if j == 0 else 1
            out = _bn_f(x, s, f"{p}.bn1")
            out = F.conv2d(out, s[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(_bn_f(out, s, f"{p}.bn2"), s[f"{p}.prelu.weight"])
            out = _bn_f(F.conv2d(out, s[f"{p}.conv2.weight"], stride=stride, padding=1), s, f"{p}.bn3")
            short = _bn_f(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), s, f"{p}.downsample.1") \
                if j == 0 else x
            x = out + short
    x = _bn_f(x, s, "bn2").flatten(1)
    return _bn_f(F.linear(x, s["fc.weight"], s["fc.bias"]), s, "features")


def _cb(s, p, x, stride=1, groups=1, act=True):
    w = s[f"{p}.layers.0.weight"]
    x = _bn_f(F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2 if w.shape[-1] == 3 else 0, groups=groups),
              s, f"{p}.layers.1")
    return F.prelu(x, s[f"{p}.layers.2.weight"]) if act else x


def _dw(s, p, x, stride, residual):
    groups = s[f"{p}.layers.0.layers.0.weight"].shape[0]
    out = _cb(s, f"{p}.layers.0", x)
    out = _cb(s, f"{p}.layers.1", out, stride=stride, groups=groups)
    out = _cb(s, f"{p}.layers.2", out, act=False)
    return x + out if residual else out


def mbf_forward(s, blocks, x):
    x = _cb(s, "layers.0", x, stride=2)
    if blocks[0] == 1:
        x = _cb(s, "layers.1", x, groups=64)
    else:
        for j in range(blocks[0]):
            x = _dw(s, f"layers.1.layers.{j}", x, 1, True)
    for st in range(3):
        x = _dw(s, f"layers.{2 + 2 * st}", x, 2, False)
        for j in range(blocks[1 + st]):
            x = _dw(s, f"layers.{3 + 2 * st}.layers.{j}", x, 1, True)
    x = _cb(s, "conv_sep", x)
    x = _cb(s, "features.layers.0", x, groups=512, act=False).flatten(1)
    return _bn_f(F.linear(x, s["features.layers.2.weight"]), s, "features.layers.3")


def faces(n=2, size=112):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5)) * 2 - 1


# -- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, depth", [("iresnet18", (2, 2, 2, 2)), ("iresnet34", (3, 4, 6, 3)),
                                         ("iresnet50", (3, 4, 14, 3)), ("iresnet100", (3, 13, 30, 3)),
                                         ("iresnet200", (6, 26, 60, 6))])
def test_every_arcface_iresnet_layout_loads_with_nothing_new_or_dropped(name, depth):
    table = arcface_iresnet_table(depth, emb=512)
    state = {k: torch.zeros(s) for k, s in table}  # shapes only: loading checks every one
    mapped, spec, kind = backbone_state(state, "backbone.pth")
    assert spec == {"model": {"name": name}, "embedding_size": 512} and "iresnet" in kind
    report = load_into(build_backbone(spec["model"], embedding_size=512), mapped, "backbone.pth")
    assert report["new"] == [] and report["dropped"] == []


def test_arcface_iresnet18_gives_their_embedding():
    depth = (2, 2, 2, 2)
    theirs = random_state(arcface_iresnet_table(depth, emb=64))
    mapped, spec, _ = backbone_state({"state_dict": {f"module.{k}": v for k, v in theirs.items()}}, "x.pth")
    model = build_backbone(spec["model"], embedding_size=spec["embedding_size"]).eval()
    load_into(model, mapped, "x.pth")
    x = faces()
    with torch.no_grad():
        got, ref = model(x), iresnet_forward(theirs, depth, x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("scale, blocks", [(2, (1, 4, 6, 2)), (1, (2, 2, 3, 1))])
def test_arcface_mobilefacenet_gives_their_embedding(scale, blocks):
    theirs = random_state(arcface_mbf_table(scale, blocks, emb=64), seed=1)
    mapped, spec, kind = backbone_state(theirs, "mbf.pth")
    assert spec == {"model": {"name": "mbf", "scale": scale, "blocks": list(blocks)}, "embedding_size": 64}
    model = build_backbone(spec["model"], embedding_size=64).eval()
    report = load_into(model, mapped, "mbf.pth")
    assert report["new"] == [] and report["dropped"] == [], report
    x = faces()
    with torch.no_grad():
        got, ref = model(x), mbf_forward(theirs, blocks, x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_mbf_large_layout_loads():
    state = {k: torch.zeros(s) for k, s in arcface_mbf_table(4, (2, 8, 12, 4), emb=512)}
    mapped, spec, _ = backbone_state(state, "mbf_large.pth")
    report = load_into(build_backbone(spec["model"], embedding_size=512), mapped, "mbf_large.pth")
    assert report["new"] == [] and report["dropped"] == []


def test_a_shape_mismatch_names_the_key_and_both_shapes_and_copies_nothing():
    model = build_backbone({"name": "iresnet_tiny"}, embedding_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() + 1 for k, v in model.state_dict().items() if v.is_floating_point()}
    state["fc.weight"] = torch.zeros(16, state["fc.weight"].shape[1])
    with pytest.raises(WeightsError, match=r"'fc.weight' has shape \[16, \d+\] in the file but \[32, \d+\]"):
        load_into(model, state, "w.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_plain_state_dicts_are_unwrapped_stripped_and_renamed():
    model = build_backbone({"name": "iresnet_tiny"}, embedding_size=32)
    own = model.state_dict()
    renamed = {k.replace("layer", "stage", 1): v + 1 for k, v in own.items()}
    obj = {"model": {f"_orig_mod.{k}": v for k, v in renamed.items()}}
    mapped, spec, kind = backbone_state(obj, "w.pth", {"stage": "layer"})
    assert kind == "iresnet state dict (arcface_torch / dpface names)"  # dpface's names after the map
    report = load_into(model, mapped, "w.pth")
    assert report["new"] == [] and report["dropped"] == []
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], renamed["stage1.0.conv1.weight"])
    assert rename({"a.b": 1, "ab.c": 2}, {"a.": "x.", "ab": "y"}) == {"x.b": 1, "y.c": 2}
    with pytest.raises(WeightsError, match="not a state dict"):
        backbone_state({"epoch": 3}, "w.pth")


def test_infer_backbone_knows_nothing_of_other_layouts():
    assert infer_backbone({"encoder.weight": torch.zeros(2)}) is None
