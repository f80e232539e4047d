"""Embedding losses (range, center, triplet, contrastive): hand-computed values, edge
cases, the centre update rule, semi-hard mining, gradients by finite differences."""
import itertools
import math

import pytest
import torch

from dpface.config import ConfigError, load_config
from dpface.losses import build_aux_loss
from dpface.losses.triplet import mine_semihard

C, D = 10, 2


def aux(name, **params):
    return build_aux_loss({"name": name, "weight": 1.0, **params}, C, D)[0]


# -- range loss -----------------------------------------------------------------------
def range_batch():
    # Identity 0: a 3-4-5 triangle; identity 1: two points 1 apart; identity 2: alone.
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0],
                      [10.0, 0.0], [11.0, 0.0],
                      [0.0, 10.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    return x, y


def test_range_loss_hand_computed():
    x, y = range_batch()
    loss = aux("range", k=2, margin=200.0, alpha=0.5, beta=2.0)
    intra, inter = loss.terms(x, y)
    # k = 2 largest of {3, 4, 5}: harmonic mean 2/(1/5 + 1/4); identity 1: its one pair.
    assert intra.item() == pytest.approx(2 / (1 / 5 + 1 / 4) + 1.0)
    centres = {0: (1.0, 4 / 3), 1: (10.5, 0.0), 2: (0.0, 10.0)}
    d_min = min((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
                for a, b in itertools.combinations(centres.values(), 2))
    assert inter.item() == pytest.approx(200.0 - d_min)
    assert loss(x, y).item() == pytest.approx(0.5 * intra.item() + 2.0 * inter.item())
    # Margin below the closest centres: the inter term is inactive.
    assert aux("range", margin=1.0).terms(x, y)[1].item() == 0.0


def test_range_loss_edge_cases():
    x, y = range_batch()
    # k larger than an identity's pair count: all its pairs (3 for identity 0).
    intra, _ = aux("range", k=10).terms(x, y)
    assert intra.item() == pytest.approx(3 / (1 / 3 + 1 / 4 + 1 / 5) + 1.0)
    # One identity with one sample: nothing at all (no pair, no second centre).
    intra, inter = aux("range").terms(x[:1], y[:1])
    assert intra.item() == 0.0 and inter.item() == 0.0
    # A batch of one identity: intra only; the inter term needs two identities.
    intra, inter = aux("range", margin=1e6).terms(x[:3], y[:3])
    assert intra.item() == pytest.approx(2 / (1 / 5 + 1 / 4)) and inter.item() == 0.0
    # Only singletons: no intra term, inter still defined.
    intra, inter = aux("range", margin=1e6).terms(x[[0, 3, 5]], y[[0, 3, 5]])
    assert intra.item() == 0.0 and inter.item() == pytest.approx(1e6 - 100.0)
    # Duplicate samples (distance 0) stay finite, gradients too.
    xd = torch.tensor([[1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    val = aux("range", margin=0.0)(xd, torch.tensor([3, 3]))
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(xd.grad).all()
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        aux("range", k=0)


def test_range_loss_normalized_and_gradcheck():
    x, y = range_batch()
    loss = aux("range", normalize=True, margin=3.0)
    xn = torch.nn.functional.normalize(x, dim=1)
    torch.testing.assert_close(loss(x, y), aux("range", margin=3.0)(xn, y))
    g = torch.Generator().manual_seed(0)
    xr = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    yr = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    loss = build_aux_loss({"name": "range", "weight": 1, "k": 2, "margin": 50.0}, 4, 3)[0]
    assert torch.autograd.gradcheck(lambda t: loss(t, yr), (xr,))


# -- center loss ------------------------------------------------------------------------
def test_center_loss_value_and_update_rule():
    loss = aux("center", alpha=0.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        loss.centers.copy_(torch.randn(C, D, generator=g))
    c0 = loss.centers.clone()
    x = torch.randn(6, D, generator=g, requires_grad=True)
    y = torch.tensor([2, 2, 5, 2, 7, 5])
    val = loss(x, y)
    expected = sum(0.5 * float(((x[i].detach() - c0[y[i]]) ** 2).sum()) for i in range(6)) / 6
    assert val.item() == pytest.approx(expected, rel=1e-6)
    val.backward()
    torch.testing.assert_close(x.grad, (x.detach() - c0[y]) / 6)  # centres: no gradient
    # Published rule, written out per class: Δc_j = Σ_{y_i=j}(c_j − x_i)/(1 + n_j).
    ref = c0.clone()
    for j in range(C):
        members = [i for i in range(6) if y[i] == j]
        delta = sum((c0[j] - x[i].detach() for i in members), torch.zeros(D)) / (1 + len(members))
        ref[j] = c0[j] - 0.5 * delta
    torch.testing.assert_close(loss.centers, ref)
    assert torch.equal(loss.centers[[0, 1, 3]], c0[[0, 1, 3]])  # absent classes unchanged
    loss.eval()  # no update outside training
    before = loss.centers.clone()
    loss(x, y)
    assert torch.equal(loss.centers, before)


def test_center_loss_state_and_errors():
    loss = aux("center")
    assert set(loss.state_dict()) == {"centers", "shard_range"}
    other = build_aux_loss({"name": "center", "weight": 1}, C + 1, D)[0]
    with pytest.raises(ValueError, match=r"centres of classes \[0, 10\) of 10; this rank owns "
                                         r"\[0, 11\) of 11"):
        other.load_state_dict(loss.state_dict())
    with pytest.raises(ValueError, match="alpha"):
        aux("center", alpha=0.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        loss(torch.zeros(2, D), torch.tensor([0, 10]))


# -- triplet --------------------------------------------------------------------------
def naive_semihard(x, y, margin):
    d = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(len(y))] for i in range(len(y))]
    out = []
    for a, p in itertools.permutations(range(len(y)), 2):
        if y[a] != y[p]:
            continue
        cands = [(d[a][n], n) for n in range(len(y))
                 if y[n] != y[a] and d[a][p] < d[a][n] < d[a][p] + margin]
        if cands:
            out.append((a, p, min(cands)[1], d[a][p] - min(cands)[0] + margin))
    return out


def test_triplet_semihard_selection_on_constructed_batch():
    # Unit vectors at angles (degrees); d = 2 − 2·cos Δ.
    ang = torch.tensor([0.0, 20.0, 26.0, 40.0, 90.0, 180.0])
    x = torch.stack([torch.cos(torch.deg2rad(ang)), torch.sin(torch.deg2rad(ang))], 1).double()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    margin = 0.2
    a, p, n = mine_semihard(torch.cdist(x, x) ** 2, y, margin)
    got = sorted(zip(a.tolist(), p.tolist(), n.tolist()))
    # Anchor 0, positive 1 (d = 0.1206): semi-hard window (0.1206, 0.3206) holds sample 2
    # (26°, d = 0.2024); sample 3 (40°, d = 0.4679) is outside, so 2 is picked.
    assert (0, 1, 2) in got
    ref = naive_semihard(x, y.tolist(), margin)
    assert got == sorted((a_, p_, n_) for a_, p_, n_, _ in ref)
    loss = aux("triplet", margin=margin)
    expected = sum(v for *_, v in ref) / len(ref)
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_triplet_random_batch_matches_brute_force_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=g)
    xn = torch.nn.functional.normalize(x, dim=1)
    ref = naive_semihard(xn, y.tolist(), 0.5)
    assert ref, "the case must select some triplets"
    loss = build_aux_loss({"name": "triplet", "weight": 1, "margin": 0.5}, 4, 4)[0]
    assert loss(x, y).item() == pytest.approx(sum(v for *_, v in ref) / len(ref), rel=1e-9)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x.clone().requires_grad_(True),))
    # No anchor–positive pair (all labels distinct): zero.
    assert loss(x[:4], torch.arange(4)).item() == 0.0


# -- contrastive ------------------------------------------------------------------------
def test_contrastive_hand_computed_and_gradcheck():
    x = torch.tensor([[0.0, 0.0], [0.6, 0.8], [3.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 1, 2])
    loss = aux("contrastive", margin=2.0)
    # Pairs: (0,1) same, d = 1 → ½; (0,2) diff, d = 3 ≥ m → 0; (1,2) diff, d = sqrt(5.76+.64).
    d12 = math.sqrt(2.4 ** 2 + 0.8 ** 2)
    expected = (0.5 * 1.0 + 0.0 + 0.5 * max(0.0, 2.0 - d12) ** 2) / 3
    assert loss(x, y).item() == pytest.approx(expected)
    near = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    assert loss(near, torch.tensor([0, 1])).item() == pytest.approx(0.5 * 1.5 ** 2)
    assert loss(x[:1], y[:1]).item() == 0.0
    g = torch.Generator().manual_seed(4)
    xr = torch.randn(7, 2, generator=g, dtype=torch.float64, requires_grad=True)
    yr = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    assert torch.autograd.gradcheck(lambda t: loss(t, yr), (xr,))
    normed = aux("contrastive", margin=1.0, normalize=True)
    torch.testing.assert_close(normed(x[1:], y[1:]),
                               aux("contrastive", margin=1.0)(
                                   torch.nn.functional.normalize(x[1:], dim=1), y[1:]))


# -- config ----------------------------------------------------------------------------
def test_aux_losses_from_config():
    cfg = load_config(None, ["aux_losses=[{name: range, weight: 0.1, k: 3}, "
                             "{name: center, weight: 0.003, alpha: 0.5}, "
                             "{name: triplet, weight: 1, margin: 0.3}, "
                             "{name: contrastive, weight: 0.5, normalize: true}]"])
    built = [build_aux_loss(s, 100, 16) for s in cfg.aux_losses]
    assert [type(m).__name__ for m, _ in built] == ["RangeLoss", "CenterLoss", "TripletLoss",
                                                    "ContrastiveLoss"]
    assert built[0][0].k == 3 and built[1][1] == 0.003
    with pytest.raises(ConfigError, match=r"auxiliary loss 'range' has no parameter 'kk'.*"
                                          r"valid: alpha, beta, k, kernel, margin, normalize"):
        load_config(None, ["aux_losses=[{name: range, weight: 0.1, kk: 3}]"])
    with pytest.raises(ConfigError, match=r"unknown auxiliary loss 'centre'.*valid: center, "
                                          r"contrastive, distill, qan_set, range, triplet"):
        load_config(None, ["aux_losses=[{name: centre, weight: 0.1}]"])
