"""Margin logits against closed forms, and their gradients against finite differences."""
import math

import pytest
import torch

from dpface.losses import LOSSES, build_loss
from dpface.losses.margin import CombinedMargin
from dpface.registry import SpecError


def target_logit(loss, theta):
    """Run the transform on a single [1, 2] score row whose target is column 0."""
    cos = torch.tensor([[math.cos(theta), 0.3]], dtype=torch.float64)
    return loss(cos, torch.tensor([0]))[0]


@pytest.mark.parametrize("theta", [1e-3, 0.3, 1.2, 2.0, math.pi - 0.6, math.pi - 0.3, math.pi - 1e-4])
def test_arcface_closed_form_both_branches(theta):
    # θ = 1e-3 is as close to 0 as the clamp cos ≤ 1 − 1e-7 (θ ≥ 4.5e-4) lets a value be exact.
    s, m = 64.0, 0.5
    out = target_logit(build_loss({"name": "arcface", "s": s, "m": m}), theta)
    if theta + m <= math.pi:  # ordinary branch: cos(θ + m)
        expected = s * math.cos(theta + m)
    else:  # past π: the linear fallback cos θ − m·sin m
        expected = s * (math.cos(theta) - m * math.sin(m))
    assert out[0].item() == pytest.approx(expected, abs=1e-4)
    assert out[1].item() == pytest.approx(s * 0.3)  # non-target untouched, only scaled


@pytest.mark.parametrize("theta", [0.05, 0.9, 1.7, 2.6, 3.1])
def test_combined_margin_closed_form(theta):
    s, m1, m2, m3 = 30.0, 1.0, 0.3, 0.2
    out = target_logit(build_loss({"name": "combined", "s": s, "m1": m1, "m2": m2, "m3": m3}), theta)
    if theta + m2 <= math.pi:
        expected = s * (math.cos(theta + m2) - m3)
    else:
        expected = s * (math.cos(theta) - m2 * math.sin(m2) - m3)
    assert out[0].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("theta", [0.2, 0.7, 1.0, 1.4, 2.5])
def test_multiplicative_margin_closed_form_and_continuous(theta):
    s, m1 = 10.0, 2.0
    loss = CombinedMargin(s=s, m1=m1, m2=0.0, m3=0.0)
    star = math.pi / m1
    expected = math.cos(m1 * theta) if theta <= star else math.cos(theta) - (math.cos(star) + 1)
    assert target_logit(loss, theta)[0].item() == pytest.approx(s * expected, abs=1e-4)
    # The fallback meets the margin curve at θ*: no jump, and the curve keeps falling.
    left, right = target_logit(loss, star - 1e-6)[0].item(), target_logit(loss, star + 1e-6)[0].item()
    assert left == pytest.approx(right, abs=1e-3)
    thetas = torch.linspace(0.01, math.pi - 0.01, 200, dtype=torch.float64)
    vals = loss(torch.cos(thetas)[:, None], torch.zeros(200, dtype=torch.long))[:, 0]
    assert (vals[1:] <= vals[:-1] + 1e-9).all()


def test_cosface_normface_softmax():
    cos = torch.tensor([[0.8, 0.1, -0.2]], dtype=torch.float64)
    y = torch.tensor([0])
    assert torch.allclose(build_loss({"name": "cosface", "s": 64, "m": 0.35})(cos, y),
                          64 * torch.tensor([[0.8 - 0.35, 0.1, -0.2]], dtype=torch.float64))
    assert torch.allclose(build_loss({"name": "normface", "s": 16})(cos, y), 16 * cos)
    assert torch.equal(build_loss({"name": "softmax"})(cos, y), cos)


def test_easy_margin_only_where_cos_positive():
    loss = build_loss({"name": "arcface", "s": 1.0, "m": 0.5, "easy_margin": True})
    assert target_logit(loss, 2.0)[0].item() == pytest.approx(math.cos(2.0))  # cos < 0: unchanged
    assert target_logit(loss, 0.5)[0].item() == pytest.approx(math.cos(1.0))


def test_absent_target_rows_untouched():
    """A −1 target (true class on another rank) leaves the row as plain scaled cosines."""
    loss = build_loss({"name": "arcface", "s": 2.0, "m": 0.5})
    cos = torch.tensor([[0.5, 0.2], [0.4, 0.9]], dtype=torch.float64)
    out = loss(cos, torch.tensor([-1, 1]))
    assert torch.equal(out[0], 2 * cos[0])
    assert out[1, 1].item() == pytest.approx(2 * math.cos(math.acos(0.9) + 0.5))


@pytest.mark.parametrize("spec", [
    {"name": "arcface", "s": 8.0, "m": 0.5},
    {"name": "cosface", "s": 8.0, "m": 0.35},
    {"name": "combined", "s": 8.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
    {"name": "combined", "s": 8.0, "m1": 2.0, "m2": 0.1, "m3": 0.1},
    {"name": "softmax"},
])
def test_gradient_matches_finite_differences(spec):
    """Cross-entropy over the transformed logits, float64: autograd vs central differences.
    Angles are spread over (0, π) so both ArcFace branches are exercised."""
    torch.manual_seed(0)
    loss = build_loss(spec)
    thetas = torch.tensor([0.1, 0.8, 1.6, 2.4, 2.95], dtype=torch.float64)
    cos = torch.cos(thetas)[:, None] * torch.ones(5, 4, dtype=torch.float64)
    cos = cos + 0.05 * torch.randn(5, 4, dtype=torch.float64)
    cos[:, 0] = torch.cos(thetas)
    y = torch.zeros(5, dtype=torch.long)
    cos.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: torch.nn.functional.cross_entropy(loss(c, y), y),
                                    (cos,), eps=1e-6, atol=1e-6)


def test_no_nan_at_the_clamp_bounds():
    loss = build_loss({"name": "arcface", "s": 64, "m": 0.5})
    cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    out = torch.nn.functional.cross_entropy(loss(cos, torch.tensor([0, 0])), torch.tensor([0, 0]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(cos.grad).all()


def test_half_precision_scores_give_fp32_logits():
    loss = build_loss({"name": "arcface", "s": 64, "m": 0.5})
    out = loss(torch.tensor([[0.5, 0.1]], dtype=torch.bfloat16), torch.tensor([0]))
    assert out.dtype == torch.float32


def test_registry_errors_name_the_problem():
    with pytest.raises(SpecError, match="did you mean 'arcface'"):
        build_loss({"name": "arcfce"})
    with pytest.raises(SpecError, match="no parameter 'margin'.*valid: easy_margin, m, s"):
        build_loss({"name": "arcface", "margin": 0.5})
    assert {"softmax", "normface", "cosface", "arcface", "combined"} <= set(LOSSES.names())
    with pytest.raises(ValueError, match="m2 must be in"):
        CombinedMargin(m2=4.0)
