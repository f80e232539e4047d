"""The logit transforms beyond the classic margins inside the 2-rank model-parallel head at
rate 1.0 against the single-process FullFC; hard-negative sampling; the sharded center loss against
its single-process self. One gloo world is spawned for the module."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpface.heads import FullFC, PartialFC, class_range
from dpface.heads.sharding import sample_count
from dpface.losses import build_aux_loss, build_loss
from tests.helpers import run_distributed

D, B_LOCAL, WORLD = 8, 4, 2
C_EQ = 11  # uneven shards (6, 5)
STEP = 1_000_000  # far into the λ schedule: ψ is active for L-/A-Softmax
SPECS = {
    "normface_learned": {"name": "normface", "s": 8.0, "learn_s": True},
    "lsoftmax": {"name": "lsoftmax", "m": 3, "lambda_min": 0.0},
    "sphereface": {"name": "sphereface", "m": 4, "lambda_min": 0.0},
    "adacos": {"name": "adacos"},
    "adacos_dynamic": {"name": "adacos", "dynamic": True},
    "km": {"name": "km", "gamma": 2.0},
    "km_arcface": {"name": "km", "gamma": 4.0, "base": {"name": "arcface", "s": 16, "m": 0.5}},
    "km_detached": {"name": "km", "gamma": 1.0, "detach_weight": True,
                    "base": {"name": "cosface", "s": 16, "m": 0.35}},
    "mv_softmax": {"name": "mv_softmax", "t": 1.2, "base": {"name": "arcface", "s": 16, "m": 0.5}},
    "sv_softmax": {"name": "sv_softmax", "t": 1.5},
    "curricularface": {"name": "curricularface", "s": 16, "m": 0.5, "alpha": 0.3},
    "adaface": {"name": "adaface", "s": 16, "m": 0.4, "alpha": 0.5},
    "magface": {"name": "magface", "s": 16, "l_a": 1.0, "u_a": 8.0, "lambda_g": 2.0},
    "elasticface_arc": {"name": "elasticface", "s": 16, "m": 0.4, "sigma": 0.1},
    "elasticface_cos": {"name": "elasticface", "s": 16, "m": 0.35, "sigma": 0.1, "kind": "cos"},
}
# The adaptive margins run in the fused op (per-sample margins) where it is built: each also
# on the reference path, both against the single-process reference.
CASES = [*SPECS, *(f"{n}/reference" for n in ("curricularface", "adaface", "magface", "elasticface_arc",
                                              "elasticface_cos"))]
C_HARD, RATE = 40, 0.3


def spec_of(case: str) -> tuple[dict, str]:
    name, _, kernel = case.partition("/")
    return SPECS[name], kernel or "auto"


def tol(ref):
    return {"rtol": 1e-5, "atol": 1e-5 * max(1.0, float(ref.detach().abs().max()))}


def make_case(num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    b = WORLD * B_LOCAL
    w = torch.randn(num_classes, D, generator=g)
    y = torch.randint(0, num_classes, (b,), generator=g)
    x = 2.0 * torch.randn(b, D, generator=g)
    x[0] = 3 * w[y[0]] + 0.4 * x[0]  # an easy sample (p near 1 for KM)
    return x, y, w


def run_rank(head, x, y, rank, step):
    xl = x[rank * B_LOCAL:(rank + 1) * B_LOCAL].clone().requires_grad_(True)
    out = head(xl, y[rank * B_LOCAL:(rank + 1) * B_LOCAL], step)
    out.loss.backward()
    extra = {n: (p.detach().clone(), None if p.grad is None else p.grad.clone())
             for n, p in head.transform.named_parameters()}
    return {"loss": out.loss.detach(), "x_grad": xl.grad, "n": out.num_sampled, "w_grad": head.weight.grad,
            "range": (head.class_start, head.class_end), "extra": extra}


def checks(rank: int, world: int) -> dict:
    out = {"eq": {}}
    for case in CASES:
        spec, kernel = spec_of(case)
        x, y, w = make_case(C_EQ, seed=list(SPECS).index(case.partition("/")[0]))
        head = PartialFC(D, C_EQ, build_loss(spec), kernel=kernel)
        with torch.no_grad():
            head.weight.copy_(w[head.class_start:head.class_end])
        out["eq"][case] = run_rank(head, x, y, rank, STEP)
    # Hard negatives at rate 0.3.
    x, y, w = make_case(C_HARD, seed=100)
    head = PartialFC(D, C_HARD, build_loss({"name": "arcface", "s": 16, "m": 0.5}),
                     sample_rate=RATE, negatives="hard")
    with torch.no_grad():
        head.weight.copy_(w[head.class_start:head.class_end])
    res = run_rank(head, x, y, rank, 3)
    res["idx"] = head.sample(y, 3, x)
    out["hard"] = res
    # Sharded center loss: two steps on the same batch.
    x, y, _ = make_case(C_EQ, seed=200)
    center, _ = build_aux_loss({"name": "center", "weight": 0.1, "alpha": 0.5}, C_EQ, D)
    steps = []
    for step in range(2):
        xl = x[rank * B_LOCAL:(rank + 1) * B_LOCAL].clone().requires_grad_(True)
        loss = center(xl, y[rank * B_LOCAL:(rank + 1) * B_LOCAL], step)
        loss.backward()
        steps.append({"loss": loss.detach(), "x_grad": xl.grad,
                      "centers": center.centers.clone()})
    out["center"] = {"steps": steps, "range": (center.class_start, center.class_end)}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(checks, WORLD, tmp_path_factory.mktemp("losses"))


@pytest.mark.multiproc
@pytest.mark.parametrize("case", CASES)
def test_r1_equals_full_fc(results, case):
    name = case.partition("/")[0]
    x, y, w = make_case(C_EQ, seed=list(SPECS).index(name))
    full = FullFC(D, C_EQ, build_loss(SPECS[name]))
    with torch.no_grad():
        full.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    ref = full(xr, y, STEP)
    ref.loss.backward()
    ranks = [r["eq"][case] for r in results]
    for r in ranks:
        torch.testing.assert_close(r["loss"], ref.loss.detach(), **tol(ref.loss))
    assert ranks[0]["loss"] == ranks[1]["loss"], "the loss must be identical on every rank"
    xg = torch.cat([r["x_grad"] for r in ranks]) / WORLD  # DDP convention
    torch.testing.assert_close(xg, xr.grad, **tol(xr.grad))
    wg = torch.cat([r["w_grad"] for r in ranks])
    torch.testing.assert_close(wg, full.weight.grad, **tol(full.weight.grad))
    for pname, p in full.transform.named_parameters():
        for r in ranks:  # replicated: same value (and grad) on every rank as in FullFC
            value, grad = r["extra"][pname]
            torch.testing.assert_close(value, p.detach(), rtol=1e-5, atol=1e-6)
            if p.grad is None:
                assert grad is None
            else:
                torch.testing.assert_close(grad, p.grad, **tol(p.grad))
    if name == "adacos_dynamic":  # the scale moved, and by the same amount everywhere
        assert float(full.transform.s) != pytest.approx(math.sqrt(2) * math.log(C_EQ - 1))
    if name == "curricularface":  # t moved from 0 by the global batch, the same on every rank
        assert float(full.transform.t) != 0
    if name == "normface_learned":
        assert full.transform.s.grad is not None and float(full.transform.s.grad) != 0


@pytest.mark.multiproc
def test_hard_negatives_keep_the_dominant_rows(results):
    x, y, w = make_case(C_HARD, seed=100)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T  # [B, C]
    union = []
    for r in results:
        lo, hi = r["hard"]["range"]
        idx = r["hard"]["idx"]
        pos = sorted(set((y[(y >= lo) & (y < hi)] - lo).tolist()))
        n = sample_count(hi - lo, RATE, len(pos))
        # Naive: rank the non-positive rows by their best cosine over the batch.
        best = {j: max(cos[:, lo + j].tolist()) for j in range(hi - lo) if j not in pos}
        negs = sorted(best, key=best.get, reverse=True)[:n - len(pos)]
        assert idx.tolist() == sorted(pos + negs)
        assert r["hard"]["n"] == n
        union.append(idx + lo)
    union = torch.cat(union)
    full = FullFC(D, union.numel(), build_loss({"name": "arcface", "s": 16, "m": 0.5}))
    with torch.no_grad():
        full.weight.copy_(w[union])
    xr = x.clone().requires_grad_(True)
    ref = full(xr, torch.searchsorted(union, y))
    ref.loss.backward()
    for r in results:
        torch.testing.assert_close(r["hard"]["loss"], ref.loss.detach(), **tol(ref.loss))
    xg = torch.cat([r["hard"]["x_grad"] for r in results]) / WORLD
    torch.testing.assert_close(xg, xr.grad, **tol(xr.grad))


def test_hard_negatives_world1_and_errors():
    x, y, w = make_case(C_HARD, seed=7)
    head = PartialFC(D, C_HARD, build_loss({"name": "softmax", "bias": True}), sample_rate=0.25,
                     negatives="hard")
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(torch.linspace(-1, 1, C_HARD))
    idx = head.sample(y, 0, x)
    logits = x @ w.T + torch.linspace(-1, 1, C_HARD)  # unnormalised: rank by raw logit
    pos = sorted(set(y.tolist()))
    best = logits.max(0).values
    best[pos] = float("inf")
    n = sample_count(C_HARD, 0.25, len(pos))
    assert idx.tolist() == sorted(best.topk(n).indices.tolist())
    assert head(x, y, 0).num_sampled == n
    with pytest.raises(ValueError, match="negatives must be one of uniform, hard"):
        PartialFC(D, C_HARD, build_loss({"name": "softmax"}), negatives="dominant")
    with pytest.raises(ValueError, match="need the global batch's embeddings"):
        head.sample(y, 0)


@pytest.mark.multiproc
def test_sharded_center_loss_equals_single_process(results):
    x, y, _ = make_case(C_EQ, seed=200)
    ref, _ = build_aux_loss({"name": "center", "weight": 0.1, "alpha": 0.5}, C_EQ, D)
    for step in range(2):
        xr = x.clone().requires_grad_(True)
        loss = ref(xr, y, step)
        loss.backward()
        ranks = [r["center"]["steps"][step] for r in results]
        # Local means over equal halves average to the global mean; DDP averages grads.
        torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss.detach())
        torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]) / WORLD, xr.grad)
        torch.testing.assert_close(torch.cat([r["centers"] for r in ranks]), ref.centers)
    assert [r["center"]["range"] for r in results] == [class_range(C_EQ, WORLD, k)
                                                       for k in range(WORLD)]
    assert ref.centers.abs().sum() > 0
