"""AdaFace, MagFace, CurricularFace and ElasticFace against their papers' formulas, written here in float64
(not the modules' code): the loss and its gradients through every path of both heads (reference,
fused op, chunked op), the curriculum t over two steps, the per-sample elastic margins, and
out-of-range parameters refused at load."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpface import ops
from dpface.config import ConfigError, load_config
from dpface.heads import FullFC, PartialFC
from dpface.losses import build_loss
from dpface.seeding import Stream, rng

D, C, B = 6, 9, 8


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    return x, y, w


# Every path a head can take: the reference (autograd over [B, C] logits), the fused op and
# the chunked one (compiled kernels, per-sample margins), for both heads.
HEADS = {
    "FullFC": lambda t: FullFC(D, C, t),
    "FullFC-fused": lambda t: FullFC(D, C, t, kernel="fused"),
    "PartialFC-reference": lambda t: PartialFC(D, C, t, kernel="reference"),
    "PartialFC-fused": lambda t: PartialFC(D, C, t, kernel="fused"),
    "PartialFC-chunked": lambda t: PartialFC(D, C, t, kernel="chunked"),
}
needs_ext = pytest.mark.skipif(not ops.available("cpu"), reason="dpface._kernels not built")
PATHS = [pytest.param(k, marks=needs_ext) if k.endswith(("fused", "chunked")) else k for k in HEADS]


def head_loss(cls, spec, x, w, y, steps):
    h = HEADS[cls](build_loss(spec)).double()
    with torch.no_grad():
        h.weight.copy_(w)
    out = []
    for step in steps:
        xr = x.clone().requires_grad_(True)
        loss = h(xr, y, step).loss
        loss.backward()
        out.append((loss.detach(), xr.grad))
    return h, out


def cos_of(x, w):
    return F.normalize(x, dim=1) @ F.normalize(w, dim=1).T


def arc(c, m):
    """The paper's T(cos θ) = cos(θ + m), θ + m < π in these cases (asserted)."""
    theta = torch.acos(c)
    assert bool((theta + m < math.pi).all())
    return torch.cos(theta + m)


@pytest.mark.parametrize("cls", PATHS)
def test_curricularface_is_its_formula_over_two_steps(cls):
    s, m, alpha = 16.0, 0.5, 0.3
    x, y, w = case(1)
    h, got = head_loss(cls, {"name": "curricularface", "s": s, "m": m, "alpha": alpha}, x, w, y, [0, 1])
    t = 0.0
    for loss, grad in got:
        xr = x.clone().requires_grad_(True)
        c = cos_of(xr, w)
        r = float(c.detach()[torch.arange(B), y].mean())
        t = alpha * r + (1 - alpha) * t  # the curriculum, updated before the step's logits
        T = arc(c[torch.arange(B), y], m)
        hard = c.detach() > T.detach()[:, None]
        logits = torch.where(hard, c * (t + c), c)
        logits = logits.index_put((torch.arange(B), y), T) * s
        ref = F.cross_entropy(logits, y)
        ref.backward()
        assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-10)
        torch.testing.assert_close(grad, xr.grad, rtol=1e-9, atol=1e-12)
    assert float(h.transform.t) == pytest.approx(t, rel=1e-12)
    assert hard.any() and not hard.all()  # both kinds of negatives occurred


def test_curricularface_moves_t_once_per_step():
    x, y, w = case(2)
    h, _ = head_loss("FullFC", {"name": "curricularface", "alpha": 0.5}, x, w, y, [3, 3, 3])
    r = float(cos_of(x, w)[torch.arange(B), y].mean())
    assert float(h.transform.t) == pytest.approx(0.5 * r, rel=1e-12)  # three forwards, one step


@pytest.mark.parametrize("cls", PATHS)
def test_adaface_is_its_formula_over_two_steps(cls):
    s, m, h, alpha = 16.0, 0.4, 0.333, 0.5
    x, y, w = case(4)
    x = x * torch.linspace(0.5, 8.0, B, dtype=torch.float64)[:, None]  # norms from low to high quality
    head, got = head_loss(cls, {"name": "adaface", "s": s, "m": m, "h": h, "alpha": alpha}, x, w, y, [0, 1])
    mu, sd = 20.0, 100.0
    zs = []
    for loss, grad in got:
        xr = x.clone().requires_grad_(True)
        norm = x.norm(dim=1)  # detached: the statistics and ẑ carry no gradient
        mu = alpha * float(norm.mean()) + (1 - alpha) * mu
        sd = alpha * float(norm.std()) + (1 - alpha) * sd
        z = (h * (norm - mu) / (sd + 1e-3)).clamp(-1, 1)
        zs.append(z)
        c = cos_of(xr, w)
        theta = torch.acos(c[torch.arange(B), y])
        target = torch.cos((theta - m * z).clamp(1e-7, math.pi - 1e-7)) - (m * z + m)
        ref = F.cross_entropy(s * c.index_put((torch.arange(B), y), target), y)
        ref.backward()
        assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-10)
        torch.testing.assert_close(grad, xr.grad, rtol=1e-9, atol=1e-12)
    assert float(head.transform.mean) == pytest.approx(mu, rel=1e-12)
    assert float(head.transform.std) == pytest.approx(sd, rel=1e-12)
    assert float(zs[1].min()) < 0 < float(zs[1].max())  # both kinds of margin occurred


@pytest.mark.parametrize("cls", PATHS)
def test_magface_is_its_formula_with_the_regulariser(cls):
    s, l_a, u_a, l_m, u_m, lam = 16.0, 2.0, 9.0, 0.3, 0.7, 3.0
    x, y, w = case(5)
    x = x * torch.linspace(0.3, 6.0, B, dtype=torch.float64)[:, None]  # magnitudes below, within, above
    _, [(loss, grad)] = head_loss(cls, {"name": "magface", "s": s, "l_a": l_a, "u_a": u_a, "l_m": l_m,
                                        "u_m": u_m, "lambda_g": lam}, x, w, y, [0])
    xr = x.clone().requires_grad_(True)
    a = xr.norm(dim=1).clamp(l_a, u_a)  # the gradient flows through the magnitude
    assert bool((a == l_a).any()) and bool((a == u_a).any()) and bool(((a > l_a) & (a < u_a)).any())
    m = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)
    c = cos_of(xr, w)
    target = arc(c[torch.arange(B), y], m)
    ce = F.cross_entropy(s * c.index_put((torch.arange(B), y), target), y)
    ref = ce + lam * (1 / a + a / u_a ** 2).mean()
    ref.backward()
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(grad, xr.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", PATHS)
@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elasticface_draws_each_samples_margin_from_its_stream(kind, cls):
    s, m, sigma, seed, step = 16.0, 0.4, 0.1, 5, 7
    x, y, w = case(3)
    _, [(loss, grad)] = head_loss(cls, {"name": "elasticface", "s": s, "m": m, "sigma": sigma,
                                               "kind": kind, "seed": seed}, x, w, y, [step])
    margins = torch.from_numpy(rng(seed, Stream.ELASTIC_MARGIN, step).normal(m, sigma, B))
    assert margins.std() > 0.03  # really per sample
    xr = x.clone().requires_grad_(True)
    c = cos_of(xr, w)
    ct = c[torch.arange(B), y]
    target = arc(ct, margins) if kind == "arc" else ct - margins
    ref = F.cross_entropy(s * c.index_put((torch.arange(B), y), target), y)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(grad, xr.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spec, key", [
    ("{name: elasticface, sigma: -0.1}", "sigma must be >= 0"),
    ("{name: elasticface, m: -0.2}", "m must be >= 0"),
    ("{name: curricularface, alpha: 0}", r"alpha must be in \(0, 1\]"),
    ("{name: curricularface, m: 4}", r"m must be in \[0, pi\)"),
    ("{name: adaface, m: -0.1}", r"m must be in \[0, pi/2\)"),
    ("{name: adaface, h: 0}", "h must be > 0"),
    ("{name: magface, l_a: 110, u_a: 10}", "the norm bounds must satisfy 0 < l_a < u_a"),
    ("{name: magface, l_m: 0.9, u_m: 0.5}", "the margins must satisfy 0 <= l_m <= u_m < pi"),
])
def test_out_of_range_parameters_are_config_errors(spec, key):
    with pytest.raises(ConfigError, match=rf"head.loss.*{key}"):
        load_config(None, [f"head.loss={spec}"])


@needs_ext
@pytest.mark.parametrize("update", ["dense", "sampled"])
@pytest.mark.parametrize("name", ["adaface", "magface", "curricularface", "elasticface"])
def test_fused_equals_reference_at_a_sample_rate(name, update):
    """PartialFC at sample rate 0.5 (the same rows either way: sampling does not depend on the
    kernel): the fused and chunked heads' loss, embedding gradient, row gradients and the
    transform's state equal the reference head's in float64, over two steps."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * torch.linspace(0.5, 8, B, dtype=torch.float64)[:, None]
    y = torch.randint(0, 40, (B,), generator=g)
    results = {}
    for kernel in ("reference", "fused", "chunked"):
        head = PartialFC(D, 40, build_loss({"name": name, "s": 16}), sample_rate=0.5, kernel=kernel,
                         update=update).double()
        steps = []
        for step in (0, 1):
            xr = x.clone().requires_grad_(True)
            out = head(xr, y, step)
            out.loss.backward()
            rows = head.sampled_rows()
            wg = rows.leaves["weight"].grad if update == "sampled" else head.weight.grad
            steps.append((out.loss.detach(), xr.grad, wg.clone(), out.num_sampled))
            head.clear_sampled()
            head.weight.grad = None
        results[kernel] = (steps, {k: v.clone() for k, v in head.transform.state_dict().items()})
    ref_steps, ref_state = results["reference"]
    for kernel in ("fused", "chunked"):
        steps, state = results[kernel]
        for (l, gx, gw, n), (rl, rgx, rgw, rn) in zip(steps, ref_steps):
            assert n == rn < 40
            torch.testing.assert_close(l, rl, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(gw, rgw, rtol=1e-9, atol=1e-12)
        for k, v in state.items():
            torch.testing.assert_close(v, ref_state[k], rtol=1e-12, atol=0)
