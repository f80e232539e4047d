"""Logit-transform losses (NormFace learned s, L-/A-Softmax, AdaCos, Knot-Magnify,
SV/MV-Softmax): values against hand computations, gradients against finite
differences, and the nested-spec registry."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dpface.config import ConfigError, load_config
from dpface.heads import FullFC, PartialFC
from dpface.losses import LOSSES, build_loss
from dpface.losses.adacos import fixed_scale
from dpface.losses.km import critical_point
from dpface.losses.large_margin import chebyshev, psi
from dpface.losses.margin import HeadContext
from dpface.registry import SpecError

D, C, B = 5, 7, 6


def case(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.randn(C, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return x, y, w


# -- L-Softmax / A-Softmax ---------------------------------------------------------
def psi_reference(theta: float, m: int) -> float:
    k = min(int(theta * m / math.pi), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_matches_definition_continuous_and_monotone(m):
    thetas = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    vals = psi(torch.cos(thetas), m)
    ref = torch.tensor([psi_reference(t, m) for t in thetas.tolist()], dtype=torch.float64)
    torch.testing.assert_close(vals, ref, atol=1e-9, rtol=0)
    assert vals[0].item() == pytest.approx(1.0) and vals[-1].item() == pytest.approx(1 - 2 * m)
    assert (vals[1:] < vals[:-1]).all(), "ψ must decrease strictly over [0, π]"
    for k in range(1, m):  # no jump at the piece boundaries kπ/m
        t = k * math.pi / m
        lo, hi = psi(torch.tensor([math.cos(t - 1e-7), math.cos(t + 1e-7)], dtype=torch.float64), m)
        assert abs(lo.item() - hi.item()) < 1e-5


def test_chebyshev_is_multiple_angle_cosine():
    theta = torch.linspace(0, math.pi, 50, dtype=torch.float64)
    for m in range(0, 6):
        torch.testing.assert_close(chebyshev(torch.cos(theta), m), torch.cos(m * theta))


def test_lambda_schedule():
    sf = build_loss({"name": "sphereface"})  # published: 1000, 0.12, power 1, min 5
    assert sf.lam(0) == 1000.0
    assert sf.lam(10) == pytest.approx(1000 / 2.2)
    assert sf.lam(10**6) == 5.0
    sf2 = build_loss({"name": "sphereface", "lambda_base": 100, "gamma": 0.5, "power": 2,
                      "lambda_min": 0})
    assert sf2.lam(4) == pytest.approx(100 / 9)


def test_sphereface_and_lsoftmax_hand_computed():
    theta, xn, wn, m, step = 1.0, 2.0, 3.0, 4, 7
    spec = {"m": m, "lambda_base": 10.0, "gamma": 0.5, "power": 1.0, "lambda_min": 0.0}
    lam = 10.0 / (1 + 0.5 * step)
    ann = (lam * math.cos(theta) + psi_reference(theta, m)) / (1 + lam)
    ctx = HeadContext(step=step, x_norm=torch.tensor([xn], dtype=torch.float64),
                      w_norm=torch.tensor([wn, 1.5], dtype=torch.float64))
    cos = torch.tensor([[math.cos(theta), 0.25]], dtype=torch.float64)
    out = build_loss({"name": "sphereface", **spec})(cos, torch.tensor([0]), ctx)
    torch.testing.assert_close(out, torch.tensor([[xn * ann, xn * 0.25]], dtype=torch.float64))
    raw = cos * torch.tensor([[xn * wn, xn * 1.5]], dtype=torch.float64)  # W_j·x
    out = build_loss({"name": "lsoftmax", **spec})(raw, torch.tensor([0]), ctx)
    torch.testing.assert_close(out, torch.tensor([[xn * wn * ann, raw[0, 1].item()]],
                                                 dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the embedding/row norms"):
        build_loss({"name": "lsoftmax"})(raw, torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        build_loss({"name": "sphereface", "m": 2.5})


def test_sphereface_head_uses_unit_rows_and_raw_norm():
    """Inside FullFC: logits ‖x‖·cos θ_j whatever ‖W_j‖ (A-Softmax's ‖W‖ = 1)."""
    x, y, w = case(1)
    head = FullFC(D, C, build_loss({"name": "sphereface", "lambda_min": 0.0})).double()
    with torch.no_grad():
        head.weight.copy_(w)
    step = 10**7
    out = head(x, y, step)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    lam = 1000 / (1 + 0.12 * step)
    logits = cos.clone()
    for i in range(B):
        t = math.acos(cos[i, y[i]].item())
        logits[i, y[i]] = (lam * math.cos(t) + psi_reference(t, 4)) / (1 + lam)
    ref = F.cross_entropy(logits * x.norm(dim=1, keepdim=True), y)
    torch.testing.assert_close(out.loss, ref)


# -- NormFace with a learned scale --------------------------------------------------
def test_normface_learned_scale_value_and_gradient():
    t = build_loss({"name": "normface", "s": 16.0, "learn_s": True}).double()
    cos = torch.tensor([[0.8, 0.1, -0.2], [0.3, 0.6, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    torch.testing.assert_close(t(cos, y), 16 * cos)
    loss = F.cross_entropy(t(cos, y), y)
    loss.backward()
    # d/ds CE(s·cos) = mean_i Σ_j (p_ij − onehot_ij)·cos_ij
    p = torch.softmax(16 * cos, 1)
    expected = ((p - F.one_hot(y, 3)) * cos).sum(1).mean()
    torch.testing.assert_close(t.s.grad, expected)
    assert [n for n, _ in t.named_parameters()] == ["s"]
    assert list(build_loss({"name": "normface", "s": 16.0}).parameters()) == []


# -- AdaCos ----------------------------------------------------------------------
def test_adacos_fixed_scale():
    for c in (3, 10, 1000, 10**6):
        head = FullFC(4, c, build_loss({"name": "adacos"})) if c <= 1000 else None
        t = head.transform if head else build_loss({"name": "adacos"})
        if head is None:
            t.bind_head(c)
        assert float(t.s) == pytest.approx(math.sqrt(2) * math.log(c - 1), rel=1e-6)
    assert fixed_scale(1001) == pytest.approx(math.sqrt(2) * math.log(1000))
    with pytest.raises(ValueError, match="at least 3 classes"):
        build_loss({"name": "adacos"}).bind_head(2)
    with pytest.raises(RuntimeError, match="needs the number of classes"):
        build_loss({"name": "adacos"})(torch.zeros(1, 3), torch.tensor([0]))
    assert not build_loss({"name": "adacos"}).s.requires_grad


def test_adacos_dynamic_scale_on_constructed_batch():
    """Three samples, four classes; B_avg and the median angle worked out by hand."""
    t = build_loss({"name": "adacos", "dynamic": True})
    t.bind_head(4)
    s0 = math.sqrt(2) * math.log(3)
    cos = torch.tensor([[0.9, 0.1, -0.2, 0.3],
                        [0.0, 0.5, 0.2, -0.1],
                        [0.4, 0.3, 0.95, 0.2]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    out = t(cos, y)
    negs = [[0.1, -0.2, 0.3], [0.0, 0.2, -0.1], [0.4, 0.3, 0.2]]
    b_avg = sum(math.exp(s0 * c) for row in negs for c in row) / 3
    theta_med = sorted([math.acos(0.9), math.acos(0.5), math.acos(0.95)])[1]  # acos(0.9)
    s1 = math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))
    assert float(t.s) == pytest.approx(s1, rel=1e-6)  # s is stored in fp32
    torch.testing.assert_close(out, s1 * cos)  # the new scale is used at once
    # A wide median angle: cos(min(π/4, θ_med)) caps at cos(π/4).
    t2 = build_loss({"name": "adacos", "dynamic": True})
    t2.bind_head(4)
    wide = torch.tensor([[-0.5, 0.1, 0.2, 0.3]], dtype=torch.float64)
    t2(wide, torch.tensor([0]))
    b = sum(math.exp(s0 * c) for c in (0.1, 0.2, 0.3))
    assert float(t2.s) == pytest.approx(math.log(b) / math.cos(math.pi / 4), rel=1e-6)
    t2.eval()  # no update outside training
    before = float(t2.s)
    t2(wide, torch.tensor([0]))
    assert float(t2.s) == before


# -- Knot-Magnify ------------------------------------------------------------------
def test_km_value_hand_computed():
    gamma = 2.0
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 1.2]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    head = FullFC(3, 3, build_loss({"name": "km", "gamma": gamma})).double()
    # Softmax base: logits = x·Wᵀ; W = I makes the logits the embeddings themselves.
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    out = head(logits, y)
    p = [math.exp(2.0) / sum(map(math.exp, (2.0, 0.5, -1.0))),
         math.exp(1.2) / sum(map(math.exp, (0.1, 0.3, 1.2)))]
    expected = sum(-(gamma * pi + 1) ** -2 * math.log(pi) for pi in p) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def _integral(f, n=200001, upper=60.0):
    """∫₀¹ f(p) dp with p = e^(−u) (removes ln p's singularity at 0), trapezoid rule."""
    u = torch.linspace(0, upper, n, dtype=torch.float64)
    return torch.trapezoid(f(torch.exp(-u)) * torch.exp(-u), u).item()


@pytest.mark.parametrize("gamma,table", [(0.1, 0.244), (1, 0.202), (2, 0.175), (4, 0.145),
                                         (6, 0.126), (8, 0.114)])
def test_km_critical_points_reproduce_table(gamma, table):
    km = build_loss({"name": "km", "gamma": gamma})

    def l_km(p):
        return -km.loss_weight(p) * torch.log(p)

    def l_soft(p):
        return -torch.log(p)

    i_km, i_soft = _integral(l_km), _integral(l_soft)
    assert i_km == pytest.approx(math.log1p(gamma) / gamma, rel=1e-6)

    def diff(p):
        p = torch.tensor([p], dtype=torch.float64)
        return (l_km(p) / i_km - l_soft(p) / i_soft).item()

    lo, hi = 1e-3, 0.99
    assert diff(lo) > 0 > diff(hi)  # KM above softmax for hard samples, below for easy
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if diff(mid) > 0 else (lo, mid)
    assert lo == pytest.approx(critical_point(gamma), abs=1e-6)
    # The table's three decimals round the closed form up (0.2431 → 0.244, 0.1441 → 0.145).
    assert abs(lo - table) < 1e-3


def test_km_gradient_detached_vs_differentiable():
    """PartialFC's closed-form gradient factor against plain autograd through w(p)·nll."""
    x, y, w = case(2)
    for detach in (False, True):
        spec = {"name": "km", "gamma": 3.0, "detach_weight": detach,
                "base": {"name": "cosface", "s": 8.0, "m": 0.2}}
        xs = x.clone().requires_grad_(True)
        logits = 8.0 * (F.normalize(xs, dim=1) @ F.normalize(w, dim=1).T)
        logits = logits - 8.0 * 0.2 * F.one_hot(y, C)
        nll = F.cross_entropy(logits, y, reduction="none")
        p = torch.exp(-nll)
        wgt = (3.0 * (p.detach() if detach else p) + 1) ** -2
        (wgt * nll).mean().backward()
        pfc = PartialFC(D, C, build_loss(spec)).double()
        with torch.no_grad():
            pfc.weight.copy_(w)
        xp = x.clone().requires_grad_(True)
        pfc(xp, y, 0).loss.backward()
        torch.testing.assert_close(xp.grad, xs.grad)
    assert not build_loss({"name": "km"}).detach_weight  # documented default


# -- SV / MV-Softmax ----------------------------------------------------------------
def test_mv_softmax_hand_computed():
    s, m, t = 10.0, 0.5, 1.2
    mv = build_loss({"name": "mv_softmax", "t": t, "base": {"name": "arcface", "s": s, "m": m}})
    theta = 1.0
    cos = torch.tensor([[math.cos(theta), 0.9, 0.3, math.cos(theta + m) - 1e-3]],
                       dtype=torch.float64)
    out = mv(cos, torch.tensor([0]))
    thr = math.cos(theta + m)  # 0.0707: 0.9 and 0.3 are mis-classified vectors
    expected = [s * thr, s * (t * 0.9 + t - 1), s * (t * 0.3 + t - 1), s * cos[0, 3].item()]
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64))
    sv = build_loss({"name": "sv_softmax", "t": t})  # NormFace base: threshold cos θ_y itself
    out = sv(torch.tensor([[0.5, 0.6, 0.4]], dtype=torch.float64), torch.tensor([0]))
    torch.testing.assert_close(out, 64 * torch.tensor([[0.5, t * 0.6 + t - 1, 0.4]],
                                                      dtype=torch.float64))
    with pytest.raises(ValueError, match="cosine base"):
        build_loss({"name": "mv_softmax", "base": {"name": "softmax"}})
    with pytest.raises(ValueError, match="t must be"):
        build_loss({"name": "mv_softmax", "t": 0.5})


# -- gradients against finite differences, through both heads ----------------------
GRAD_SPECS = {
    "normface_learned": {"name": "normface", "s": 4.0, "learn_s": True},
    "lsoftmax": {"name": "lsoftmax", "m": 3, "lambda_min": 0.5},
    "sphereface": {"name": "sphereface", "m": 4, "lambda_min": 0.5},
    "adacos": {"name": "adacos"},
    "km": {"name": "km", "gamma": 2.0, "base": {"name": "arcface", "s": 4.0, "m": 0.3}},
    "mv": {"name": "mv_softmax", "t": 1.3, "base": {"name": "cosface", "s": 4.0, "m": 0.2}},
    "km_mv": {"name": "km", "gamma": 1.0,
              "base": {"name": "mv_softmax", "base": {"name": "arcface", "s": 4.0, "m": 0.3}}},
}


@pytest.mark.parametrize("name", list(GRAD_SPECS))
@pytest.mark.parametrize("head_cls", [FullFC, PartialFC], ids=["full", "partial"])
def test_gradcheck_through_head(name, head_cls):
    x, y, w = case(3)
    head = head_cls(D, C, build_loss(GRAD_SPECS[name])).double()
    params = {"weight": w.clone().requires_grad_(True)}
    if name == "normface_learned":
        params["transform.s"] = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)

    def f(x_, *vals):
        return functional_call(head, dict(zip(params, vals)), (x_, y, 10_000)).loss

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), *params.values()),
                                    fast_mode=True)


def test_km_detached_gradient_is_that_of_fixed_weights():
    """detach_weight: the gradient of Σ w(p₀)·nll with the weights frozen at this point
    (central finite differences of a plain-torch loss), not of the KM loss."""
    x, y, w = case(5)
    gamma, s = 2.0, 4.0

    def nll_of(x_):
        return F.cross_entropy(s * F.normalize(x_, dim=1) @ F.normalize(w, dim=1).T, y,
                               reduction="none")

    w0 = (gamma * torch.exp(-nll_of(x)) + 1) ** -2
    fd = torch.zeros_like(x)
    for idx in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[idx] = 1e-6
        e = e.view_as(x)
        fd.view(-1)[idx] = ((w0 * nll_of(x + e)).mean() - (w0 * nll_of(x - e)).mean()) / 2e-6
    for head_cls in (FullFC, PartialFC):
        head = head_cls(D, C, build_loss({"name": "km", "gamma": gamma, "detach_weight": True,
                                          "base": {"name": "normface", "s": s}})).double()
        with torch.no_grad():
            head.weight.copy_(w)
        xs = x.clone().requires_grad_(True)
        head(xs, y, 0).loss.backward()
        torch.testing.assert_close(xs.grad, fd, atol=1e-7, rtol=1e-6)


def test_adacos_dynamic_gradcheck_in_eval_mode():
    """The scale moves every training forward; frozen (eval) it is a constant factor."""
    x, y, w = case(4)
    head = FullFC(D, C, build_loss({"name": "adacos", "dynamic": True})).double()
    head(x, y)  # one update
    head.eval()
    wp = w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x_, w_: functional_call(head, {"weight": w_}, (x_, y)).loss,
        (x.clone().requires_grad_(True), wp), fast_mode=True)


# -- registry: nested specs ---------------------------------------------------------
def test_nested_spec_errors_list_valid_names():
    with pytest.raises(SpecError, match=r"loss 'km' -> base: unknown loss 'arcfce' "
                                        r"\(did you mean 'arcface'\?\); valid: .*sphereface"):
        build_loss({"name": "km", "base": {"name": "arcfce"}})
    with pytest.raises(SpecError, match=r"mv_softmax' -> base: loss 'arcface' has no parameter "
                                        r"'mm'.*valid: easy_margin, m, s"):
        LOSSES.check("mv_softmax", {"base": {"name": "arcface", "mm": 0.5}})
    with pytest.raises(SpecError, match=r"km' -> base: loss 'mv_softmax' -> base: unknown"):
        build_loss({"name": "km", "base": {"name": "mv_softmax", "base": {"name": "nope"}}})
    with pytest.raises(SpecError, match="'base' must be a loss spec with a 'name'"):
        build_loss({"name": "km", "base": "arcface"})
    built = build_loss({"name": "km", "base": {"name": "mv_softmax", "t": 1.1}})
    assert built.base.t == 1.1 and built.base.base.m2 == 0.5


def test_config_checks_nested_head_loss():
    with pytest.raises(ConfigError, match=r"head.loss'.*km' -> base: loss 'cosface' has no "
                                          r"parameter 'margin'"):
        load_config(None, ["head.loss={name: km, gamma: 1, base: {name: cosface, margin: 0.3}}"])
    cfg = load_config(None, ["head.loss={name: km, base: {name: cosface, m: 0.3}}"])
    assert cfg.head.loss["base"] == {"name": "cosface", "m": 0.3}


def test_transform_state_travels_in_the_head_shard():
    """AdaCos's dynamic s and a learned NormFace s are replicated head parameters: the
    shard checkpoint carries them, so a resumed run continues with the same scale."""
    from dpface.heads import apply_shard_state, head_shard_state

    x, y, w = case(6, dtype=torch.float32)
    for spec in ({"name": "adacos", "dynamic": True},
                 {"name": "normface", "s": 5.0, "learn_s": True}):
        head = PartialFC(D, C, build_loss(spec))
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        head(x, y, 0).loss.backward()
        opt.step()
        s_trained = float(head.transform.s.detach())
        assert s_trained != pytest.approx(float(PartialFC(D, C, build_loss(spec)).transform.s.detach()))
        state = head_shard_state(head, opt)
        fresh = PartialFC(D, C, build_loss(spec))
        apply_shard_state(fresh, None, state)
        assert float(fresh.transform.s.detach()) == s_trained


def test_adacos_dynamic_with_sampled_classes_scales_the_negative_sum():
    """At rate < 1 the sum over the scored negatives is scaled by (C − 1)/(K − 1)."""
    g = torch.Generator().manual_seed(8)
    n_cls, rate = 40, 0.25
    x, w = torch.randn(B, D, generator=g), torch.randn(n_cls, D, generator=g)
    y = torch.randint(0, n_cls, (B,), generator=g)
    head = PartialFC(D, n_cls, build_loss({"name": "adacos", "dynamic": True}), sample_rate=rate)
    with torch.no_grad():
        head.weight.copy_(w)
    s0 = float(head.transform.s)
    idx = head.sample(y, 5)
    head(x, y, 5)
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).double()
    k = idx.numel()
    neg = sum(math.exp(s0 * cos[i, j]) for i in range(B) for j in idx.tolist() if j != y[i])
    b_avg = neg * (n_cls - 1) / (k - 1) / B
    theta_med = torch.acos(cos[torch.arange(B), y]).median().item()
    expected = math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))
    assert k < n_cls and float(head.transform.s) == pytest.approx(expected, rel=1e-5)
