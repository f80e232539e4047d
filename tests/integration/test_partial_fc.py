"""PartialFC against the single-process FullFC, on 1, 2 and 3 real gloo ranks.

Each multi-rank world is spawned once (module fixture) and runs every check there;
the tests below compare what the ranks returned with references computed here.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as tdist

from dpface.distributed.collectives import all_gather, all_gather_with_grad, all_reduce_max, all_reduce_sum
from dpface.heads import FullFC, PartialFC, class_range
from dpface.heads.sharding import sample_count
from dpface.losses import build_loss
from tests.helpers import run_distributed

D = 8
B_LOCAL = 4
C_EQ = 11  # uneven over 2 (6, 5) and 3 (4, 4, 3) ranks
TRANSFORMS = {
    "softmax": {"name": "softmax"},
    "softmax_bias": {"name": "softmax", "bias": True},
    "cosface": {"name": "cosface", "s": 64, "m": 0.35},
    "arcface": {"name": "arcface", "s": 64, "m": 0.5},
    "combined": {"name": "combined", "s": 32, "m1": 1.0, "m2": 0.3, "m3": 0.2},
}
C_SAMPLE, RATE, STEP = 40, 0.3, 7


def tol(ref: torch.Tensor) -> dict:
    """1e-5 relative, with the absolute floor scaled to the tensor's magnitude."""
    return {"rtol": 1e-5, "atol": 1e-5 * max(1.0, float(ref.detach().abs().max()))}


def make_case(world: int, num_classes: int, seed: int):
    """Global batch, class matrix and bias for one case (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    b = world * B_LOCAL
    w = torch.randn(num_classes, D, generator=g)
    bias = torch.randn(num_classes, generator=g)
    y = torch.randint(0, num_classes, (b,), generator=g)
    x = torch.randn(b, D, generator=g)
    # A small target angle (cos ≈ 0.99; at cos → 1 the margin's sqrt(1 − cos²) makes the
    # gradient amplify 1-ulp differences of the cosine by ~1e3, in any implementation).
    x[0] = 3 * w[y[0]] + 0.4 * x[0]
    x[1] = -w[y[1]]  # θ ≈ π: ArcFace's fallback branch
    return x, y, w, bias


def load_rows(head, w, bias):
    with torch.no_grad():
        head.weight.copy_(w[head.class_start:head.class_end])
        if head.bias is not None:
            head.bias.copy_(bias[head.class_start:head.class_end])


def run_head(head, x, y, rank, step=0):
    xl = x[rank * B_LOCAL:(rank + 1) * B_LOCAL].clone().requires_grad_(True)
    yl = y[rank * B_LOCAL:(rank + 1) * B_LOCAL]
    out = head(xl, yl, step)
    out.loss.backward()
    return {"loss": out.loss.detach(), "acc": out.accuracy, "n": out.num_sampled,
            "x_grad": xl.grad, "w_grad": head.weight.grad,
            "b_grad": None if head.bias is None else head.bias.grad,
            "range": (head.class_start, head.class_end)}


def equivalence(rank: int, world: int) -> dict:
    out = {}
    for i, (name, spec) in enumerate(TRANSFORMS.items()):
        x, y, w, bias = make_case(world, C_EQ, seed=i)
        head = PartialFC(D, C_EQ, build_loss(spec))
        load_rows(head, w, bias)
        out[name] = run_head(head, x, y, rank)
    return out


def reference(world: int, name: str, seed: int):
    """FullFC on the same global batch."""
    x, y, w, bias = make_case(world, C_EQ, seed)
    full = FullFC(D, C_EQ, build_loss(TRANSFORMS[name]))
    load_rows_full(full, w, bias)
    x = x.clone().requires_grad_(True)
    out = full(x, y)
    out.loss.backward()
    return out, x.grad, full


def load_rows_full(full, w, bias):
    with torch.no_grad():
        full.weight.copy_(w)
        if full.bias is not None:
            full.bias.copy_(bias)


def check_equivalence(results: list[dict], world: int):
    for i, name in enumerate(TRANSFORMS):
        ref, ref_xg, full = reference(world, name, seed=i)
        ranks = [r[name] for r in results]
        for r in ranks:
            torch.testing.assert_close(r["loss"], ref.loss.detach(), **tol(ref.loss))
            assert r["loss"] == ranks[0]["loss"], "the loss must be identical on every rank"
            torch.testing.assert_close(r["acc"], ref.accuracy)
        # DDP convention: the embedding gradient comes back multiplied by the world size.
        xg = torch.cat([r["x_grad"] for r in ranks]) / world
        torch.testing.assert_close(xg, ref_xg, **tol(ref_xg), msg=f"{name}: embedding grad")
        assert [r["range"] for r in ranks] == [class_range(C_EQ, world, k) for k in range(world)]
        wg = torch.cat([r["w_grad"] for r in ranks])
        torch.testing.assert_close(wg, full.weight.grad, **tol(full.weight.grad), msg=name)
        if full.bias is not None:
            bg = torch.cat([r["b_grad"] for r in ranks])
            torch.testing.assert_close(bg, full.bias.grad, **tol(full.bias.grad))


# -- sampling ------------------------------------------------------------------
def sampling(rank: int, world: int) -> dict:
    x, y, w, bias = make_case(world, C_SAMPLE, seed=0)
    # Many positives on rank 0's shard (more than ceil(r·C_local)), few elsewhere.
    lo, hi = class_range(C_SAMPLE, world, 0)
    many = min(2 * B_LOCAL, y.numel())
    y[:many] = torch.arange(lo, lo + many) % hi
    head = PartialFC(D, C_SAMPLE, build_loss(TRANSFORMS["arcface"]), sample_rate=RATE, seed=3)
    load_rows(head, w, bias)
    res = run_head(head, x, y, rank, step=STEP)
    twin = PartialFC(D, C_SAMPLE, build_loss(TRANSFORMS["arcface"]), sample_rate=RATE, seed=3)
    res["idx"] = head.sample(y, STEP)
    res["idx_again"] = twin.sample(y, STEP)
    res["idx_next"] = head.sample(y, STEP + 1)
    res["labels"] = y
    return res


def check_sampling(results: list[dict], world: int):
    y = results[0]["labels"]
    union = []
    drew_negatives = False
    for r in results:
        lo, hi = r["range"]
        idx = r["idx"]
        pos = torch.unique(y[(y >= lo) & (y < hi)]) - lo
        assert set(pos.tolist()) <= set(idx.tolist()), "positives must always be kept"
        assert r["n"] == idx.numel() == max(pos.numel(), math.ceil(RATE * (hi - lo)))
        assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
        assert torch.equal(idx, r["idx_again"]), "same (seed, step, rank) → same sample"
        if idx.numel() > pos.numel():  # negatives were drawn
            assert not torch.equal(idx, r["idx_next"]), "another step → another sample"
            drew_negatives = True
        union.append(idx + lo)
        # Rows not scored this step get an exactly zero gradient.
        unsampled = torch.ones(hi - lo, dtype=torch.bool)
        unsampled[idx] = False
        assert torch.all(r["w_grad"][unsampled] == 0)
    assert drew_negatives
    if len(results) > 1:  # rank 0 had more positives than its quota: all kept
        assert results[0]["n"] > math.ceil(RATE * (results[0]["range"][1] - results[0]["range"][0]))
    union = torch.cat(union)
    ref, ref_xg, full = _restricted_reference(world, union, y)
    for r in results:
        torch.testing.assert_close(r["loss"], ref.loss.detach(), **tol(ref.loss))
    xg = torch.cat([r["x_grad"] for r in results]) / world
    torch.testing.assert_close(xg, ref_xg, **tol(ref_xg))
    wg = torch.cat([r["w_grad"][r["idx"]] for r in results])
    torch.testing.assert_close(wg, full.weight.grad, **tol(full.weight.grad))


def _restricted_reference(world, union, y):
    """FullFC over only the classes some rank scored (sorted global ids)."""
    x, _, w, bias = make_case(world, C_SAMPLE, seed=0)
    full = FullFC(D, union.numel(), build_loss(TRANSFORMS["arcface"]))
    load_rows_full(full, w[union], bias[union])
    x = x.clone().requires_grad_(True)
    out = full(x, torch.searchsorted(union, y))
    out.loss.backward()
    return out, x.grad, full


# -- gradient convention -------------------------------------------------------
D_IN = 5


def backbone_case(world: int):
    g = torch.Generator().manual_seed(11)
    imgs = torch.randn(world * B_LOCAL, D_IN, generator=g)
    y = torch.randint(0, C_EQ, (world * B_LOCAL,), generator=g)
    lin = torch.nn.Linear(D_IN, D)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D, D_IN, generator=g))
        lin.bias.copy_(torch.randn(D, generator=g))
    return imgs, y, lin


def ddp_convention(rank: int, world: int) -> dict:
    """A linear backbone + head; backbone grads averaged over ranks as DDP does."""
    imgs, y, lin = backbone_case(world)
    head = PartialFC(D, C_EQ, build_loss(TRANSFORMS["cosface"]))
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    head(lin(imgs[sl]), y[sl], 0).loss.backward()
    grads = []
    for p in lin.parameters():
        g = p.grad.clone()
        tdist.all_reduce(g)
        grads.append(g / world)
    return grads


def check_ddp_convention(results, world):
    imgs, y, lin = backbone_case(world)
    FullFC(D, C_EQ, build_loss(TRANSFORMS["cosface"]))(lin(imgs), y).loss.backward()
    for r in results:
        for got, p in zip(r, lin.parameters()):
            torch.testing.assert_close(got, p.grad, **tol(p.grad))


# -- collectives and bad input -------------------------------------------------
def catch(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 — the test compares type and message
        return f"{type(e).__name__}: {e}"
    return "no error"


def bad_inputs(rank: int, world: int) -> dict:
    x, y, w, bias = make_case(world, C_EQ, seed=0)
    head = PartialFC(D, C_EQ, build_loss(TRANSFORMS["arcface"]))
    xl, yl = x[:B_LOCAL], y[:B_LOCAL].clone()
    out = {}
    bad = yl.clone()
    if rank == world - 1:
        bad[2] = C_EQ
    out["range"] = catch(lambda: head(xl, bad, 0))
    bad = yl.clone()
    if rank == 0:
        bad[1] = -3
    out["negative"] = catch(lambda: head(xl, bad, 0))
    out["float"] = catch(lambda: head(xl, yl.float() if rank == 0 else yl, 0))
    n = B_LOCAL - 1 if rank == 1 else B_LOCAL
    out["batch"] = catch(lambda: head(xl[:n], yl[:n], 0))
    out["gather"] = catch(lambda: all_gather_with_grad(xl[:n]))
    # The group is still in step after all the errors above:
    out["after"] = float(head(xl, yl, 0).loss)
    out["max"] = all_reduce_max(torch.tensor([float(rank), -float(rank)]))
    out["sum"] = all_reduce_sum(torch.tensor([1.0, float(rank)]))
    out["gathered"] = all_gather(torch.tensor([rank, rank]))
    return out


def check_bad_inputs(results, world):
    for r in results:
        assert r["range"] == (f"ValueError: label {C_EQ} at position 2 of rank {world - 1}'s "
                              f"batch is outside [0, {C_EQ})")
        assert r["negative"].startswith("ValueError: label -3 at position 1 of rank 0's")
        assert r["float"].startswith("TypeError: labels on rank 0 must be an integer tensor")
        assert r["batch"].startswith("ValueError: PartialFC needs the same batch size")
        assert "rank 0: 4, rank 1: 3" in r["batch"]
        assert r["gather"].startswith("ValueError: all-gather of embeddings needs the same shape")
        assert "rank 0: [4, 8], rank 1: [3, 8]" in r["gather"]
        assert math.isfinite(r["after"])
        assert r["max"].tolist() == [world - 1.0, 0.0]
        assert r["sum"].tolist() == [float(world), float(sum(range(world)))]
        assert r["gathered"].tolist() == [k for k in range(world) for _ in range(2)]


def all_checks(rank: int, world: int) -> dict:
    return {"eq": equivalence(rank, world), "sampling": sampling(rank, world),
            "ddp": ddp_convention(rank, world), "bad": bad_inputs(rank, world)}


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request, tmp_path_factory):
    world = request.param
    return world, run_distributed(all_checks, world, tmp_path_factory.mktemp(f"w{world}"))


@pytest.mark.multiproc
def test_r1_equals_full_fc(world_results):
    world, res = world_results
    check_equivalence([r["eq"] for r in res], world)


@pytest.mark.multiproc
def test_sampling(world_results):
    world, res = world_results
    check_sampling([r["sampling"] for r in res], world)


@pytest.mark.multiproc
def test_gather_grad_scaling_matches_single_process_ddp(world_results):
    world, res = world_results
    check_ddp_convention([r["ddp"] for r in res], world)


@pytest.mark.multiproc
def test_bad_input_raises_on_every_rank(world_results):
    world, res = world_results
    check_bad_inputs([r["bad"] for r in res], world)


# -- world size 1 (no process group): the same code -----------------------------
def test_world1_equals_full_fc():
    check_equivalence([equivalence(0, 1)], 1)


def test_world1_sampling():
    check_sampling([sampling(0, 1)], 1)


def test_world1_ddp_convention_is_identity():
    check_ddp_convention([_no_allreduce_ddp()], 1)


def _no_allreduce_ddp():
    imgs, y, lin = backbone_case(1)
    PartialFC(D, C_EQ, build_loss(TRANSFORMS["cosface"]))(lin(imgs), y, 0).loss.backward()
    return [p.grad for p in lin.parameters()]


def test_world1_bad_inputs():
    x, y, _, _ = make_case(1, C_EQ, 0)
    head = PartialFC(D, C_EQ, build_loss(TRANSFORMS["arcface"]))
    bad = y.clone()
    bad[3] = 99
    with pytest.raises(ValueError, match=r"label 99 at position 3 of rank 0's batch is outside"):
        head(x, bad, 0)
    with pytest.raises(TypeError, match="integer tensor"):
        head(x, y.float(), 0)
    with pytest.raises(ValueError, match=r"embeddings on rank 0 must be \[batch, 8\]"):
        head(x[:, :5], y, 0)
    with pytest.raises(ValueError, match="one label per embedding"):
        head(x, y[:-1], 0)
    with pytest.raises(ValueError, match="rank 0 passed an empty batch"):
        head(x[:0], y[:0], 0)


def test_constructor_errors():
    arc = build_loss(TRANSFORMS["arcface"])
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sample_rate must be in"):
            PartialFC(D, C_EQ, arc, sample_rate=bad)
    with pytest.raises(ValueError, match="world size 4 exceeds the number of classes 3"):
        PartialFC(D, 3, arc, rank=0, world_size=4)
    head = PartialFC(D, C_EQ, arc, rank=1, world_size=2)
    with pytest.raises(RuntimeError, match="built as rank 1 of 2"):
        head(torch.randn(2, D), torch.tensor([0, 1]), 0)


def test_init_is_independent_of_sharding():
    arc = build_loss(TRANSFORMS["arcface"])
    full = FullFC(D, 9000, arc, seed=5).weight
    assert abs(float(full.detach().std()) - 0.01) < 1e-3
    for world in (1, 3, 4):
        parts = [PartialFC(D, 9000, arc, seed=5, rank=r, world_size=world).weight
                 for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(FullFC(D, 9000, arc, seed=6).weight, full)


def test_logits_stay_fp32_under_autocast():
    x, y, w, bias = make_case(1, C_EQ, 0)
    x16 = x.bfloat16()
    head = PartialFC(D, C_EQ, build_loss(TRANSFORMS["arcface"]))
    load_rows(head, w, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x16, y, 0)
    ref = head(x16.float(), y, 0)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)


def test_sample_count_rounding():
    assert sample_count(10, 0.3) == 3  # 0.3·10 = 3.0000000000000004 in floating point
    assert sample_count(10, 0.1) == 1
    assert sample_count(10, 0.25) == 3
    assert sample_count(10, 0.1, num_positive=7) == 7
    assert sample_count(10, 0.5, num_positive=12) == 10


def test_cosine_scores_gradcheck():
    from dpface.heads.dist_ce import CosineScores
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(5, 7, generator=g, dtype=torch.float64))
    w = torch.randn(9, 7, generator=g, dtype=torch.float64)
    x.requires_grad_(True), w.requires_grad_(True)
    assert torch.autograd.gradcheck(CosineScores.apply, (x, w))
    torch.testing.assert_close(CosineScores.apply(x, w),
                               x @ torch.nn.functional.normalize(w, dim=1).T)
