"""Lazy AdamW on sampled rows (SampledRowAdamW) and sub-centre ArcFace in the sharded head.

References: torch.optim.AdamW (r = 1, bit for bit), a per-row AdamW written out row by row
with Python floats (r < 1), FullFC (the naive whole-matrix head) for the sub-centre max and
the sample drop on 2 real gloo ranks, and the saved shards themselves for resharding.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from dpface.heads import FullFC, PartialFC, apply_shard_state, load_resharded, save_head_shard, shard_filename
from dpface.heads.row_optim import OptimizerStateError, SampledRowAdamW, SampledRowSGD
from dpface.heads.rows import init_rows
from dpface.heads.sharding import HeadShardError, class_range, head_shard_state
from dpface.losses import build_loss
from tests.helpers import run_distributed

D, C, K = 8, 11, 3  # C uneven over 2 (6, 5) and 3 (4, 4, 3) ranks
B_LOCAL = 6
LR, WD = 0.02, 0.05
ARC = {"name": "arcface", "s": 16.0, "m": 0.3}
SPECS = {"arcface": ARC, "normface_learn_s": {"name": "normface", "s": 10.0, "learn_s": True},
         "softmax_bias": {"name": "softmax", "bias": True}}


def batch(seed, b, num_classes, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g, dtype=dtype), torch.randint(0, num_classes, (b,), generator=g)


def run_steps(head, opt, steps, seed=0, b=8, dtype=torch.float64, record=None):
    for step in steps:
        x, y = batch(seed + step, b, head.num_classes, dtype)
        head(x, y, step).loss.backward()
        if record is not None:
            s = head.sampled_rows()
            record.append((s.idx.clone(), {n: t.grad.clone() for n, t in s.leaves.items()}))
        opt.step()
        opt.zero_grad()


# -- SampledRowAdamW ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_adamw_rate_one_equals_torch_adamw_bit_for_bit(name, dtype):
    dense = PartialFC(D, 40, build_loss(SPECS[name])).to(dtype)
    lazy = PartialFC(D, 40, build_loss(SPECS[name]), update="sampled").to(dtype)
    lazy.load_state_dict(dense.state_dict())
    opt_d = torch.optim.AdamW(dense.parameters(), lr=LR, weight_decay=WD)
    opt_l = SampledRowAdamW(lazy, lr=LR, weight_decay=WD)
    for step in range(6):
        x, y = batch(step, 8, 40, dtype)
        for head, opt in ((dense, opt_d), (lazy, opt_l)):
            head(x, y, step).loss.backward()
            opt.step()
            opt.zero_grad()
        for g in (opt_d.param_groups[0], opt_l.param_groups[0]):
            g["lr"] *= 0.9  # a schedule: the per-row step size follows the group's lr
    for (n, a), (_, b) in zip(dense.named_parameters(), lazy.named_parameters()):
        assert torch.equal(a, b), n
        sd, sl = opt_d.state[a], opt_l.state[b]
        assert torch.equal(sd["exp_avg"], sl["exp_avg"]) and torch.equal(sd["exp_avg_sq"], sl["exp_avg_sq"]), n
        if n in ("weight", "bias"):
            assert sl["step"].dtype == torch.int64 and torch.all(sl["step"] == int(sd["step"])), n
        else:  # a non-row parameter keeps torch AdamW's own scalar step
            assert torch.equal(sl["step"], sd["step"]), n


def naive_lazy_adamw(w, m, v, t, idx, g, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Per-row AdamW with per-row step counts, one row at a time, Python-float scalars."""
    for j, row in enumerate(idx.tolist()):
        t[row] += 1
        w[row] *= 1 - lr * wd
        m[row] = b1 * m[row] + (1 - b1) * g[j]
        v[row] = b2 * v[row] + (1 - b2) * g[j] ** 2
        mhat = m[row] / (1 - b1 ** t[row])
        vhat = v[row] / (1 - b2 ** t[row])
        w[row] -= lr * mhat / (vhat.sqrt() + eps)


@pytest.mark.parametrize("subcenters", [1, K])
def test_adamw_sampled_rows_match_per_row_reference(subcenters):
    head = PartialFC(D, 40, build_loss(ARC), sample_rate=0.3, update="sampled", subcenters=subcenters).double()
    opt = SampledRowAdamW(head, lr=LR, weight_decay=WD)
    w = head.weight.detach().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    t = [0] * w.shape[0]
    for step in range(5):
        before = head.weight.detach().clone()
        rec = []
        run_steps(head, opt, [step], record=rec)
        idx, grads = rec[0]
        assert idx.numel() < w.shape[0]
        naive_lazy_adamw(w, m, v, t, idx, grads["weight"], LR, WD)
        other = torch.ones(w.shape[0], dtype=torch.bool)
        other[idx] = False
        assert torch.equal(head.weight.detach()[other], before[other])  # no decay, no moment step
        torch.testing.assert_close(head.weight.detach(), w, rtol=1e-12, atol=1e-14)
    st = opt.state[head.weight]
    assert st["step"].tolist() == t and len(set(t)) > 2  # rows seen different numbers of times
    torch.testing.assert_close(st["exp_avg"], m, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(st["exp_avg_sq"], v, rtol=1e-12, atol=1e-18)


def test_adamw_state_dict_round_trip_continues_identically():
    head = PartialFC(D, 40, build_loss(SPECS["normface_learn_s"]), sample_rate=0.4, update="sampled").double()
    opt = SampledRowAdamW(head, lr=LR, weight_decay=WD)
    run_steps(head, opt, range(3))
    buf = io.BytesIO()
    torch.save({"head": head.state_dict(), "opt": opt.state_dict()}, buf)
    run_steps(head, opt, range(3, 6))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    head2 = PartialFC(D, 40, build_loss(SPECS["normface_learn_s"]), sample_rate=0.4, update="sampled").double()
    opt2 = SampledRowAdamW(head2, lr=LR, weight_decay=WD)
    head2.load_state_dict(saved["head"])
    opt2.load_state_dict(saved["opt"])
    run_steps(head2, opt2, range(3, 6))
    for (n, a), (_, b) in zip(head.named_parameters(), head2.named_parameters()):
        assert torch.equal(a, b), n
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][k], opt2.state[b][k]), (n, k)


def _sgd_head_and_state(tmp_path):
    head = PartialFC(D, 40, build_loss(ARC), sample_rate=0.5, update="sampled").double()
    sgd = SampledRowSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    run_steps(head, sgd, range(2))
    return sgd.state_dict(), save_head_shard(head, sgd, tmp_path / shard_filename(0, 1))


def test_sgd_state_into_adamw_is_a_clear_error_and_changes_nothing(tmp_path):
    sgd_state, shard = _sgd_head_and_state(tmp_path)
    head = PartialFC(D, 40, build_loss(ARC), sample_rate=0.5, update="sampled").double()
    opt = SampledRowAdamW(head, lr=LR, weight_decay=WD)
    run_steps(head, opt, range(2), seed=50)
    w0, st0 = head.weight.detach().clone(), copy.deepcopy(opt.state_dict())
    with pytest.raises(OptimizerStateError, match=r"not SampledRowAdamW's: its param groups lack betas, eps.*SGD"):
        opt.load_state_dict(sgd_state)
    # Through the checkpoint path: a HeadShardError (the CLI's exit-2 bad-input error).
    with pytest.raises(HeadShardError, match="SGD state; it cannot continue under SampledRowAdamW"):
        apply_shard_state(head, opt, load_resharded([shard], 0, 40))
    assert torch.equal(head.weight, w0)
    after = opt.state_dict()
    assert after["param_groups"] == st0["param_groups"]
    for i, s in st0["state"].items():
        assert all(torch.equal(s[k], after["state"][i][k]) for k in s)
    # Groups alike but SGD's buffers in the state: named too.
    bad = copy.deepcopy(st0)
    bad["state"][0] = {"momentum_buffer": torch.zeros(40, D, dtype=torch.float64)}
    with pytest.raises(OptimizerStateError, match="head.weight holds momentum_buffer — an SGD state"):
        opt.load_state_dict(bad)
    run_steps(head, opt, [2])  # still usable


def test_dense_adamw_checkpoint_continues_under_lazy_adamw(tmp_path):
    """head.update=dense → sampled with AdamW: the scalar step becomes every row's count;
    at r = 1 the run then continues exactly as dense AdamW would. The reverse is refused."""
    dense = PartialFC(D, 40, build_loss(ARC)).double()
    opt_d = torch.optim.AdamW(dense.parameters(), lr=LR, weight_decay=WD)
    run_steps(dense, opt_d, range(3))
    shard = save_head_shard(dense, opt_d, tmp_path / "dense.pt")
    lazy = PartialFC(D, 40, build_loss(ARC), update="sampled").double()
    opt_l = SampledRowAdamW(lazy, lr=LR, weight_decay=WD)
    apply_shard_state(lazy, opt_l, load_resharded([shard], 0, 40))
    run_steps(dense, opt_d, range(3, 5))
    run_steps(lazy, opt_l, range(3, 5))
    assert torch.equal(dense.weight, lazy.weight)
    assert opt_l.state[lazy.weight]["step"].tolist() == [5] * 40
    lazy_shard = save_head_shard(lazy, opt_l, tmp_path / "lazy.pt")
    fresh = PartialFC(D, 40, build_loss(ARC)).double()
    with pytest.raises(HeadShardError, match="per-row step counts .*Resume with head.update=sampled"):
        apply_shard_state(fresh, torch.optim.AdamW(fresh.parameters(), lr=LR),
                          load_resharded([lazy_shard], 0, 40))


# -- sub-centres: construction, sampling, kernel choice --------------------------------
def test_subcenter_rows_init_sampling_and_hardness():
    full = FullFC(D, C, build_loss(ARC), seed=4, subcenters=K)
    assert full.weight.shape == (C * K, D) and torch.equal(full.weight, init_rows(0, C * K, D, 4))
    for world in (2, 3):
        parts = [PartialFC(D, C, build_loss(ARC), seed=4, subcenters=K, rank=r, world_size=world).weight
                 for r in range(world)]
        assert torch.equal(torch.cat(parts), full.weight)
    # subcenters=1 is the plain head, row for row.
    assert torch.equal(PartialFC(D, C, build_loss(ARC), seed=4).weight, init_rows(0, C, D, 4))

    head = PartialFC(D, 40, build_loss(ARC), sample_rate=0.3, update="sampled", subcenters=K).double()
    x, y = batch(3, 8, 40)
    x.requires_grad_(True)
    out = head(x, y, step=2)
    out.loss.backward()
    rows = head.sampled_rows().idx
    classes = rows[::K] // K
    assert torch.equal(rows, (classes[:, None] * K + torch.arange(K)).reshape(-1))  # whole classes
    assert set(y.tolist()) <= set(classes.tolist()) and out.num_sampled == rows.numel() == K * 12
    # The loss of the sampled classes, by FullFC restricted to them.
    ref = FullFC(D, classes.numel(), build_loss(ARC), subcenters=K).double()
    with torch.no_grad():
        ref.weight.copy_(head.weight[rows])
    xr = x.detach().clone().requires_grad_(True)
    r = ref(xr, torch.searchsorted(classes, y))
    r.loss.backward()
    torch.testing.assert_close(out.loss, r.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.row_leaves()[0].grad, ref.weight.grad, rtol=1e-10, atol=1e-12)

    # Hard negatives rank classes by their best sub-centre.
    hard = PartialFC(D, 40, build_loss(ARC), subcenters=K).double()
    unit = torch.nn.functional.normalize
    cos = unit(x.detach(), dim=1) @ unit(hard.weight.detach(), dim=1).T
    torch.testing.assert_close(hard.hardness(x.detach()), cos.amax(0).view(40, K).amax(1), rtol=1e-12, atol=1e-14)


def test_subcenter_kernel_choice_and_bad_options(recwarn):
    head = PartialFC(D, C, build_loss(ARC), subcenters=K)
    fused, why = head.kernel_choice("cpu")
    assert not fused and why.startswith("PyTorch reference (subcenters=3 (the fused op scores one row per class")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # a choice, not a missing build
    assert "drop_after=5" in PartialFC(D, C, build_loss(ARC), drop_after=5).kernel_choice("cpu")[1]
    with pytest.raises(ValueError, match="kernel='fused' cannot run subcenters=3"):
        PartialFC(D, C, build_loss(ARC), subcenters=K, kernel="fused")
    with pytest.raises(ValueError, match=r"precision='bf16' \(compiled ops only\) cannot run subcenters=3"):
        PartialFC(D, C, build_loss(ARC), subcenters=K, precision="bf16")
    with pytest.raises(ValueError, match="kernel='fused' cannot run subcenters=3"):
        FullFC(D, C, build_loss(ARC), kernel="fused", subcenters=K)
    for bad in (0, -2, 1.5, True):
        for cls in (PartialFC, FullFC):
            with pytest.raises(ValueError, match="subcenters must be an integer >= 1"):
                cls(D, C, build_loss(ARC), subcenters=bad)
    with pytest.raises(ValueError, match="drop_after must be an integer step >= 0"):
        PartialFC(D, C, build_loss(ARC), drop_after=-1)
    for bad in (0.0, 180.0, -5):
        with pytest.raises(ValueError, match=r"drop_angle must be in \(0, 180\)"):
            PartialFC(D, C, build_loss(ARC), drop_angle=bad)
    with pytest.raises(ValueError, match="subcenters=3 needs a cosine transform.*Softmax"):
        PartialFC(D, C, build_loss({"name": "softmax", "bias": True}), subcenters=K)


def test_shard_with_other_subcenters_is_refused(tmp_path):
    h3 = PartialFC(D, C, build_loss(ARC), subcenters=K)
    f = save_head_shard(h3, None, tmp_path / "k3.pt")
    with pytest.raises(HeadShardError, match="3 sub-centre.*this head 1 .*head.subcenters"):
        apply_shard_state(PartialFC(D, C, build_loss(ARC)), None, load_resharded([f], 0, C))
    st = head_shard_state(PartialFC(D, C, build_loss(ARC), subcenters=2, rank=1, world_size=2))
    torch.save(st, tmp_path / "k2.pt")
    with pytest.raises(HeadShardError, match="sub-centres per class differ"):
        load_resharded([f, tmp_path / "k2.pt"], 0, C)


# -- 2 gloo ranks: FullFC parity with sub-centres (+ drop), lazy AdamW, shards ----------
DROP_AFTER, DROP_ANGLE = 3, 60.0


def parity_case(world, seed):
    """Global batch + W [C·K, D]: half the samples close to one sub-centre of their class
    (kept), the rest random (angle to every sub-centre ~ 70-110°: dropped at 60°)."""
    g = torch.Generator().manual_seed(seed)
    b = world * B_LOCAL
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (b,), generator=g)
    x = torch.randn(b, D, generator=g, dtype=torch.float64)
    sub = torch.randint(0, K, (b,), generator=g)
    near = torch.arange(b) % 2 == 0
    x[near] = 3 * w[y[near] * K + sub[near]] + 0.5 * x[near]
    return x, y, w


def parity_heads(rank, world, step, drop):
    x, y, w = parity_case(world, seed=step)
    head = PartialFC(D, C, build_loss(ARC), subcenters=K, drop_after=DROP_AFTER if drop else 0,
                     drop_angle=DROP_ANGLE).double()
    with torch.no_grad():
        head.weight.copy_(w[head.class_start * K:head.class_end * K])
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    xl = x[sl].clone().requires_grad_(True)
    out = head(xl, y[sl], step)
    out.loss.backward()
    return {"loss": out.loss.detach(), "acc": out.accuracy, "x_grad": xl.grad, "w_grad": head.weight.grad,
            "dropped": out.dropped}


def adamw_run(rank, world, steps, rate, tmp):
    """Lazy AdamW on a sub-centre head; the global batch split over the ranks."""
    head = PartialFC(D, C, build_loss(ARC), sample_rate=rate, update="sampled", subcenters=K, seed=9).double()
    opt = SampledRowAdamW(head, lr=LR, weight_decay=WD)
    for step in range(steps):
        x, y = batch(100 + step, 2 * B_LOCAL, C)
        if world > 1:
            x, y = x[rank * B_LOCAL:(rank + 1) * B_LOCAL], y[rank * B_LOCAL:(rank + 1) * B_LOCAL]
        head(x, y, step).loss.backward()
        opt.step()
        opt.zero_grad()
    if tmp is not None:
        save_head_shard(head, opt, f"{tmp}/{shard_filename(rank, world)}")
    return head.weight.detach().clone()


def two_rank_checks(rank, world, tmp):
    out = {(step, drop): parity_heads(rank, world, step, drop)
           for step, drop in ((0, False), (DROP_AFTER, True), (DROP_AFTER - 1, True))}
    out["adamw_r1"] = adamw_run(rank, world, 3, 1.0, None)
    out["adamw_sampled"] = adamw_run(rank, world, 4, 0.5, tmp)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("subc2")
    return run_distributed(two_rank_checks, 2, tmp, str(tmp), timeout_s=120), tmp


def full_reference(step, drop):
    x, y, w = parity_case(2, seed=step)
    full = FullFC(D, C, build_loss(ARC), subcenters=K, drop_after=DROP_AFTER if drop else 0,
                  drop_angle=DROP_ANGLE).double()
    with torch.no_grad():
        full.weight.copy_(w)
    x = x.clone().requires_grad_(True)
    out = full(x, y, step)
    out.loss.backward()
    return out, x.grad, full.weight.grad


@pytest.mark.multiproc
@pytest.mark.parametrize("step,drop", [(0, False), (DROP_AFTER, True), (DROP_AFTER - 1, True)])
def test_two_ranks_subcenters_equal_full_fc(two_ranks, step, drop):
    res = [r[(step, drop)] for r in two_ranks[0]]
    ref, xg, wg = full_reference(step, drop)
    for r in res:
        torch.testing.assert_close(r["loss"], ref.loss.detach(), rtol=1e-10, atol=0)
        assert r["loss"] == res[0]["loss"]
        torch.testing.assert_close(r["acc"], ref.accuracy)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in res]) / 2, xg, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["w_grad"] for r in res]), wg, rtol=1e-9, atol=1e-12)
    if step >= DROP_AFTER and drop:
        frac = float(ref.dropped)
        assert 0.25 <= frac <= 0.75, frac  # some dropped, some kept
        assert float(res[0]["dropped"]) == pytest.approx(frac, abs=1e-12)
        dropped_rows = (xg.abs().sum(1) == 0).sum().item()
        assert dropped_rows == round(frac * len(xg))  # dropped samples: no embedding gradient
        undropped, _, _ = full_reference(step, False)
        assert abs(float(undropped.loss.detach()) - float(ref.loss.detach())) > 1e-3
    else:
        assert res[0]["dropped"] is None  # before drop_after (or without drop): the plain loss


@pytest.mark.multiproc
def test_two_ranks_lazy_adamw_equals_torch_adamw_on_full_fc(two_ranks):
    full = FullFC(D, C, build_loss(ARC), seed=9, subcenters=K).double()
    opt = torch.optim.AdamW(full.parameters(), lr=LR, weight_decay=WD)
    for step in range(3):
        x, y = batch(100 + step, 2 * B_LOCAL, C)
        full(x, y, step).loss.backward()
        opt.step()
        opt.zero_grad()
    w = torch.cat([r["adamw_r1"] for r in two_ranks[0]])
    torch.testing.assert_close(w, full.weight.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [3, 1])
def test_sampled_adamw_subcenter_shards_reshard_by_class(two_ranks, world):
    results, tmp = two_ranks
    files = sorted(tmp.glob("head-rank*-of-00002.pt"))
    saved = [torch.load(f, weights_only=True) for f in files]
    whole = {k: torch.cat([s["rows"][k] for s in saved]) for k in saved[0]["rows"]}
    assert set(whole) == {"weight", "weight.exp_avg", "weight.exp_avg_sq", "weight.step"}
    assert whole["weight.step"].shape == (C * K,) and len(set(whole["weight.step"].tolist())) > 1
    assert torch.equal(whole["weight"], torch.cat([r["adamw_sampled"] for r in results]))
    for r in range(world):
        head = PartialFC(D, C, build_loss(ARC), sample_rate=0.5, update="sampled", subcenters=K,
                         rank=r, world_size=world).double()
        opt = SampledRowAdamW(head, lr=0.5, weight_decay=0.0)
        apply_shard_state(head, opt, load_resharded(files, head.class_start, head.class_end))
        lo, hi = class_range(C, world, r)
        rows = slice(lo * K, hi * K)  # class c's sub-centres are rows c·K .. c·K + K − 1
        st = opt.state[head.weight]
        assert torch.equal(head.weight.detach(), whole["weight"][rows])
        assert torch.equal(st["exp_avg"], whole["weight.exp_avg"][rows])
        assert torch.equal(st["exp_avg_sq"], whole["weight.exp_avg_sq"][rows])
        assert torch.equal(st["step"], whole["weight.step"][rows])
        assert opt.param_groups[0]["lr"] == LR and opt.param_groups[0]["weight_decay"] == WD
        assert opt._max_step == int(whole["weight.step"][rows].max())
    if world == 1:  # the resharded state is live: training continues from it
        rec = []
        run_steps(head, opt, [4], b=2 * B_LOCAL, record=rec)
        idx = rec[0][0]
        assert torch.equal(st["step"][idx], whole["weight.step"][idx] + 1)
        assert math.isfinite(float(head.weight.detach().sum()))
