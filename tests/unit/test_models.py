"""Backbones: shapes, gradients, parameter arithmetic, registry errors, determinism.

Models run at small widths and 16-32 px inputs so the whole file stays fast on CPU;
full-size models are only built on the meta device (no memory, no compute).
"""
import pytest
import torch
import torch.nn.functional as F

from dpface.models import BACKBONES, build_backbone, convert_insightface_state_dict
from dpface.models.iresnet import DEPTHS
from dpface.models.mobilefacenet import BOTTLENECKS
from dpface.models.vit import SIZES as VIT_SIZES
from dpface.registry import SpecError

D = 16

# Real depths at toy widths and resolution: every preset keeps its own structure.
SMALL = {
    **{name: {"name": name, "base_width": 8, "input_size": 16} for name in DEPTHS},
    "iresnet_tiny": {"name": "iresnet_tiny", "base_width": 8, "input_size": 32},
    "mobilefacenet": {"name": "mobilefacenet", "width": 0.25, "input_size": 32},
    "mbf": {"name": "mbf", "scale": 1, "blocks": [2, 1, 1, 1], "input_size": 32},
    "rangenet": {"name": "rangenet", "base_width": 4, "layers": [1, 1, 0, 1, 1], "input_size": 32},
    "qan": {"name": "qan", "hidden": 8, "base": {"name": "iresnet_tiny", "base_width": 8, "input_size": 32}},
    # ViTs at their real depths, dim 16, a 2x2 grid of 9-pixel patches (tests/unit/test_vit_checkpointing.py).
    **{name: {"name": name, "dim": 16, "num_heads": 2, "input_size": 18} for name in VIT_SIZES},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def images(spec, b, seed=0):
    s = BACKBONES.input_size(spec)  # a wrapper's (qan) is its base's
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_every_registered_backbone_is_covered():
    assert sorted(SMALL) == BACKBONES.names()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_shape_train_and_eval(name):
    torch.manual_seed(0)
    spec = SMALL[name]
    model = build_backbone(spec, embedding_size=D)
    with torch.no_grad():
        out = model.train()(images(spec, 2))
    assert out.shape == (2, D) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        one = model(images(spec, 1))
        two = model(images(spec, 2))
    assert one.shape == (1, D) and two.shape == (2, D)
    # Eval mode uses running statistics: a sample's features don't depend on its batch.
    torch.testing.assert_close(one[0], two[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("spec", [
    {"name": "iresnet_tiny", "base_width": 8, "input_size": 32},
    {"name": "iresnet18", "base_width": 8, "input_size": 32},
    {"name": "mobilefacenet", "width": 0.25, "input_size": 32},
], ids=lambda s: s["name"])
def test_every_parameter_gets_a_gradient(spec):
    torch.manual_seed(0)
    model = build_backbone(spec, embedding_size=D).train()
    out = model(images(spec, 4))
    # A fixed random projection, not sum(out²): after the final BN the sum of squares
    # is ≈ B·D whatever the input, so its gradient upstream would be ~0. B=4 for the
    # same reason (BN over 2 samples maps any pair to ±1).
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * proj).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def iresnet_param_count(layers, b, d, input_size):
    """Count from the architecture: convs have no bias; BN has 2 per channel, PReLU 1."""
    n = 27 * b + 2 * b + b  # stem conv3x3(3→b), BN, PReLU
    cin = b
    for i, blocks in enumerate(layers):
        c = b * 2**i
        for j in range(blocks):
            ci = cin if j == 0 else c
            n += 2 * ci + 9 * ci * c + 2 * c + c + 9 * c * c + 2 * c  # BN conv BN PReLU conv BN
            if j == 0:
                n += ci * c + 2 * c  # 1x1 downsample + BN
        cin = c
    s = input_size // 16
    return n + 2 * cin + cin * s * s * d + 2 * d  # BN2d, FC (no bias), BN1d


def mobilefacenet_param_count(d, input_size=112):
    n = 27 * 64 + 3 * 64 + 9 * 64 + 3 * 64  # conv3x3 s2 + dw3x3, each with BN + PReLU
    cin = 64
    for t, c, reps, _ in BOTTLENECKS:
        for _ in range(reps):
            h = cin * t
            n += cin * h + 3 * h + 9 * h + 3 * h + h * c + 2 * c  # expand, dw, project
            cin = c
    s = input_size // 16
    return n + cin * 512 + 3 * 512 + s * s * 512 + 2 * 512 + 512 * d + 2 * d


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_full_size_parameter_counts(name):
    with torch.device("meta"):
        model = build_backbone({"name": name}, embedding_size=512)
    assert n_params(model) == iresnet_param_count(DEPTHS[name], 64, 512, 112)
    if name == "iresnet50":
        # The published figure (insightface r50: 43.6M; we drop the FC bias, 512 params).
        assert abs(n_params(model) - 43.6e6) < 0.05e6
    if name == "iresnet100":
        assert abs(n_params(model) - 65.2e6) < 0.05e6


def test_options_change_the_architecture_as_derived():
    with torch.device("meta"):
        m = build_backbone({"name": "iresnet18", "base_width": 16, "layers": [1, 2, 1, 1],
                            "input_size": 64}, embedding_size=128)
    assert n_params(m) == iresnet_param_count([1, 2, 1, 1], 16, 128, 64)


def test_mobilefacenet_parameter_count():
    with torch.device("meta"):
        model = build_backbone({"name": "mobilefacenet"}, embedding_size=128)
    assert n_params(model) == mobilefacenet_param_count(128)
    assert n_params(model) < 1.05e6  # the paper: 0.99M at D=128


def test_unknown_name_suggests_closest():
    with pytest.raises(SpecError, match="did you mean 'iresnet50'"):
        build_backbone({"name": "iresnet5"}, embedding_size=D)


def test_unknown_option_lists_valid_options():
    with pytest.raises(SpecError) as err:
        build_backbone({"name": "iresnet18", "base_widht": 16}, embedding_size=D)
    msg = str(err.value)
    assert "did you mean 'base_width'" in msg
    for option in ("base_width", "dropout", "layers", "input_size"):
        assert option in msg
    with pytest.raises(SpecError, match="width"):
        build_backbone({"name": "mobilefacenet", "base_width": 16}, embedding_size=D)
    # The trainer supplies the embedding size; a config must not.
    with pytest.raises(SpecError, match="embedding_size"):
        build_backbone({"name": "iresnet18", "embedding_size": 8}, embedding_size=D)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_input_size_not_divisible_by_16(name):
    with pytest.raises(ValueError, match="divisible by 16"):
        build_backbone({"name": name, "input_size": 100}, embedding_size=D)


@pytest.mark.parametrize("layers", [[2, 2, 2], [1, 1, 1, 1, 1], [1, 0, 1, 1], "2222"])
def test_bad_layers(layers):
    with pytest.raises(ValueError, match="layers must be 4 block counts|layers must be a list"):
        build_backbone({"name": "iresnet18", "layers": layers}, embedding_size=D)


@pytest.mark.parametrize("spec, match", [
    ({"name": "iresnet18", "base_width": 0}, "base_width"),
    ({"name": "iresnet18", "dropout": 1.0}, "dropout"),
    ({"name": "mobilefacenet", "width": -1.0}, "width"),
])
def test_bad_option_values(spec, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(spec, embedding_size=D)
    with pytest.raises(ValueError, match="embedding_size"):
        build_backbone({"name": "iresnet18"}, embedding_size=0)


def test_wrong_image_size_is_a_clear_error():
    model = build_backbone(SMALL["iresnet_tiny"], embedding_size=D)
    with pytest.raises(ValueError, match=r"expected images \[B,3,32,32\]"):
        model(torch.zeros(2, 3, 48, 48))


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet"])
def test_same_seed_same_weights(name):
    def weights(seed):
        torch.manual_seed(seed)
        return build_backbone(SMALL[name], embedding_size=D).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    spec = {**SMALL["iresnet_tiny"], "dropout": 0.5}
    model = build_backbone(spec, embedding_size=D).eval()
    x = images(spec, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_output_is_float32_under_autocast():
    spec = SMALL["iresnet_tiny"]
    model = build_backbone(spec, embedding_size=D).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(spec, 2))
    assert out.dtype == torch.float32


def test_channels_last_matches():
    # The fast CPU layout (see benchmarks): same numbers, NHWC weights.
    torch.manual_seed(0)
    spec = SMALL["iresnet_tiny"]
    model = build_backbone(spec, embedding_size=D).eval()
    x = images(spec, 2)
    with torch.no_grad():
        ref = model(x)
        got = model.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_convert_insightface_state_dict_folds_fc_bias():
    torch.manual_seed(0)
    spec = SMALL["iresnet_tiny"]
    model = build_backbone(spec, embedding_size=D).eval()
    feats = model.features
    feats.running_mean.normal_()
    feats.running_var.uniform_(0.5, 2.0)
    feats.weight.data.normal_()
    feats.bias.data.normal_()

    # An insightface-style checkpoint: same weights plus an FC bias and its own
    # running mean (which, trained with that bias, is shifted by it).
    bias = torch.randn(D)
    theirs = {k: v.clone() for k, v in model.state_dict().items()}
    theirs["fc.bias"] = bias
    theirs["features.running_mean"] = theirs["features.running_mean"] + 0.3

    x = images(spec, 3)
    flat = {}

    def keep_fc_input(module, inp, out):  # returns None: a hook's return replaces the output
        flat["x"] = inp[0]

    model.fc.register_forward_hook(keep_fc_input)
    converted = build_backbone(spec, embedding_size=D).eval()
    converted.load_state_dict(convert_insightface_state_dict(theirs))
    with torch.no_grad():
        got = converted(x)
        model(x)  # fills the hook: the FC input
        ref = F.batch_norm(model.fc(flat["x"]) + bias, theirs["features.running_mean"],
                           theirs["features.running_var"], feats.weight, feats.bias,
                           training=False, eps=feats.eps)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
