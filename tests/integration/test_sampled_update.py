"""PartialFC(update="sampled") + SampledRowSGD: lazy row updates (original Partial FC).

Checks: one step equals dense SGD math applied by hand to the sampled rows only; at
r = 1 it equals dense SGD exactly; 2 gloo ranks match one process; the Trainer resumes
it exactly and trains with it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpface.heads import PartialFC
from dpface.heads.row_optim import SampledRowAdamW, SampledRowSGD, make_head_optimizer
from dpface.losses import build_loss
from tests.helpers import run_distributed


def _trainer_helpers():
    """Imported on use, not at module level: the spawned ranks of the gloo test import
    this module, and pulling the Trainer stack into them made a rank abort at exit
    ("terminate called without an active exception") now and then."""
    from dpface.engine.trainer import Trainer
    from tests.helpers import losses, tiny_cfg
    return Trainer, losses, tiny_cfg

D, C = 8, 40
LR, MU, WD = 0.1, 0.9, 5e-4
SPECS = {
    "arcface": {"name": "arcface", "s": 16, "m": 0.3},
    "softmax_bias": {"name": "softmax", "bias": True},
    "normface_learn_s": {"name": "normface", "s": 10.0, "learn_s": True},  # a non-row param
}


def batch(seed: int, b: int = 8, num_classes: int = C, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, D, generator=g, dtype=dtype),
            torch.randint(0, num_classes, (b,), generator=g))


def heads(spec, rate, dtype=torch.float64):
    dense = PartialFC(D, C, build_loss(spec), sample_rate=rate).to(dtype)
    lazy = PartialFC(D, C, build_loss(spec), sample_rate=rate, update="sampled").to(dtype)
    lazy.load_state_dict(dense.state_dict())
    if lazy.bias is not None:  # non-zero bias rows, so decay of bias shows
        with torch.no_grad():
            lazy.bias.normal_()
            dense.bias.copy_(lazy.bias)
    return dense, lazy


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_step_equals_sgd_on_the_sampled_rows_only(name):
    dense, lazy = heads(SPECS[name], rate=0.3)
    opt = SampledRowSGD(lazy, lr=LR, momentum=MU, weight_decay=WD)
    # A non-zero momentum history on every row: unsampled rows must keep it untouched.
    g = torch.Generator().manual_seed(5)
    rows = {n: p for n, p in lazy.named_parameters() if n in ("weight", "bias")}
    buf0 = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in rows.items()}
    for n, p in rows.items():
        opt.state[p]["momentum_buffer"] = buf0[n].clone()
    before = {n: p.detach().clone() for n, p in lazy.named_parameters()}

    x, y = batch(1)
    ref = dense(x, y, step=3)
    ref.loss.backward()  # dense gradient: zero on unsampled rows
    out = lazy(x, y, step=3)
    out.loss.backward()
    assert torch.allclose(out.loss, ref.loss, rtol=1e-12, atol=0)
    idx = lazy.sampled_rows().idx
    assert idx is not None and idx.numel() == out.num_sampled < C
    assert lazy.weight.grad is None  # no dense [C_local, D] gradient was made
    assert lazy.row_leaves()[0].shape == (idx.numel(), D)
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert lazy.sampled_rows() is None

    other = torch.ones(C, dtype=torch.bool)
    other[idx] = False
    for n, p in rows.items():
        gd = getattr(dense, n).grad
        assert torch.count_nonzero(gd[other]) == 0
        w0, b0 = before[n], buf0[n]
        d = gd[idx] + WD * w0[idx]
        buf = b0.clone()
        buf[idx] = MU * b0[idx] + d
        w = w0.clone()
        w[idx] = w0[idx] - LR * buf[idx]
        assert torch.allclose(p.detach(), w, rtol=1e-12, atol=1e-15), n
        assert torch.equal(p.detach()[other], w0[other]), n  # bit-identical, no decay
        assert torch.allclose(opt.state[p]["momentum_buffer"], buf, rtol=1e-12, atol=1e-15), n
        assert torch.equal(opt.state[p]["momentum_buffer"][other], b0[other]), n
    if name == "normface_learn_s":  # the replicated scale takes a plain dense SGD step
        s0, gs = before["transform.s"], dense.transform.s.grad
        assert torch.allclose(lazy.transform.s.detach(), s0 - LR * (gs + WD * s0))


@pytest.mark.parametrize("wd", [0.0, WD])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_rate_one_equals_dense_sgd_exactly(name, wd):
    dense, lazy = heads(SPECS[name], rate=1.0, dtype=torch.float32)
    opt_d = torch.optim.SGD(dense.parameters(), lr=LR, momentum=MU, weight_decay=wd)
    opt_l = SampledRowSGD(lazy, lr=LR, momentum=MU, weight_decay=wd)
    for step in range(4):
        x, y = batch(10 + step, dtype=torch.float32)
        for head, opt in ((dense, opt_d), (lazy, opt_l)):
            head(x, y, step).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (n, a), (_, b) in zip(dense.named_parameters(), lazy.named_parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(opt_d.state[a]["momentum_buffer"], opt_l.state[b]["momentum_buffer"]), n


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="update must be one of"):
        PartialFC(D, C, build_loss(SPECS["arcface"]), update="lazy")
    dense = PartialFC(D, C, build_loss(SPECS["arcface"]))
    with pytest.raises(ValueError, match="update='sampled'"):
        SampledRowSGD(dense, lr=0.1)
    lazy = PartialFC(D, C, build_loss(SPECS["arcface"]), update="sampled")
    opt = make_head_optimizer(lazy, "adamw", 0.1, 0.9, 0.05)  # lazy AdamW (test_subcenter_adamw.py)
    assert isinstance(opt, SampledRowAdamW) and opt.param_groups[0]["weight_decay"] == 0.05
    assert isinstance(make_head_optimizer(lazy, "sgd", 0.1, 0.9, 0.0), SampledRowSGD)
    with pytest.raises(ValueError, match="sgd or adamw, got 'lamb'"):
        make_head_optimizer(lazy, "lamb", 0.1, 0.9, 0.0)


# -- 2 gloo ranks vs one process, r = 1 ------------------------------------------
C_DIST, B_LOCAL, STEPS = 11, 4, 3


def lazy_run(rank: int, world: int) -> dict:
    head = PartialFC(D, C_DIST, build_loss(SPECS["arcface"]), update="sampled").double()
    opt = SampledRowSGD(head, lr=LR, momentum=MU, weight_decay=WD)
    losses_ = []
    for step in range(STEPS):
        x, y = batch(20 + step, b=B_LOCAL * 2, num_classes=C_DIST)  # the 2-rank global batch
        if world > 1:
            x, y = x[rank * B_LOCAL:(rank + 1) * B_LOCAL], y[rank * B_LOCAL:(rank + 1) * B_LOCAL]
        out = head(x, y, step)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses_.append(out.loss.item())
    return {"losses": losses_, "weight": head.weight.detach().clone()}


def run_2_ranks(fn, tmp_path, *args, timeout_s=60.0):
    return run_distributed(fn, 2, tmp_path, *args, timeout_s=timeout_s)


def test_two_ranks_match_one_process(tmp_path):
    single = lazy_run(0, 1)
    ranks = run_2_ranks(lazy_run, tmp_path)
    for r in ranks:
        assert r["losses"] == pytest.approx(single["losses"], rel=1e-10)
    w = torch.cat([r["weight"] for r in ranks])
    assert torch.allclose(w, single["weight"], rtol=1e-10, atol=1e-12)


# -- through the Trainer -------------------------------------------------------
SAMPLED = ["head.update=sampled", "head.sample_rate=0.5", "train.weight_decay=0.0005"]


def test_trainer_resume_with_sampled_update(tmp_path):
    Trainer, losses, tiny_cfg = _trainer_helpers()
    full = Trainer(tiny_cfg(tmp_path, "full", *SAMPLED))
    assert isinstance(full.head_opt, SampledRowSGD)
    full.fit()
    first = Trainer(tiny_cfg(tmp_path, "split", *SAMPLED))
    first.fit(until=3)
    second = Trainer(tiny_cfg(tmp_path, "split", *SAMPLED), resume="auto")
    assert second.state.step == 3
    buf = second.head_opt.state[second.head.weight]["momentum_buffer"]
    assert buf.shape == second.head.weight.shape and buf.abs().sum() > 0  # restored
    second.fit()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert torch.allclose(full.head.weight, second.head.weight, atol=1e-6)
    assert torch.allclose(full.head_opt.state[full.head.weight]["momentum_buffer"],
                          second.head_opt.state[second.head.weight]["momentum_buffer"], atol=1e-6)


def test_trainer_trains_with_sampled_update(tmp_path):
    Trainer, _, tiny_cfg = _trainer_helpers()
    t = Trainer(tiny_cfg(tmp_path, "train", *SAMPLED, "train.steps=12", "train.lr=0.1",
                         "eval.num_pairs=20"))
    w0 = t.head.weight.detach().clone()
    t.fit()
    rows = [json.loads(l)
            for l in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["skipped"] == 0 for r in train)
    assert all(r["grad_norm"] == r["grad_norm"] and r["grad_norm"] > 0 for r in train)
    ls = [r["loss"] for r in train]
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3, ls
    assert not torch.equal(t.head.weight, w0)


def test_trainer_builds_lazy_adamw_with_sampled_update(tmp_path):
    Trainer, _, tiny_cfg = _trainer_helpers()
    t = Trainer(tiny_cfg(tmp_path, "adam", "head.update=sampled", "train.optimizer=adamw"))
    assert isinstance(t.head_opt, SampledRowAdamW)


def _trainer_losses(rank, world, out, name, *extra):
    Trainer, losses, tiny_cfg = _trainer_helpers()
    Trainer(tiny_cfg(out, name, "data.batch_size=8", "train.steps=4", *extra)).fit()
    rows = [json.loads(l) for l in (Path(out) / name / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"], r["skipped"]) for r in rows if r["kind"] == "train"]


def test_two_rank_trainer_sampled_equals_dense_at_rate_one(tmp_path):
    """Through the Trainer on 2 gloo ranks (finite check, global grad norm and clipping
    over the sampled leaves): at r = 1 the two modes give the same losses and norms."""
    dense = run_2_ranks(_trainer_losses, tmp_path, str(tmp_path), "dense", "head.update=dense",
                        timeout_s=180)[0]
    lazy = run_2_ranks(_trainer_losses, tmp_path, str(tmp_path), "lazy", "head.update=sampled",
                       timeout_s=180)[0]
    assert len(dense) == 4 and all(skipped == 0 for *_, skipped in dense)
    for (l1, n1, _), (l2, n2, _) in zip(dense, lazy):
        assert l2 == pytest.approx(l1, rel=1e-6) and n2 == pytest.approx(n1, rel=1e-6)


def test_trainer_skips_non_finite_sampled_rows(tmp_path):
    """A non-finite row gradient (only on the sampled leaf) is caught: the step is skipped,
    nothing moves, and the step's leaves are dropped."""
    Trainer, _, tiny_cfg = _trainer_helpers()
    t = Trainer(tiny_cfg(tmp_path, "nan", *SAMPLED))
    with torch.no_grad():
        t.head.weight[0].fill_(float("nan"))  # row 0 only: a NaN logit for every sample
    w0 = t.head.weight.detach().clone()
    b0 = [p.detach().clone() for p in t.backbone.parameters()]
    images, labels = next(iter(t.stream))
    m = t.train_step((images, labels))
    assert m["skipped"] == 1
    assert torch.equal(t.head.weight.isnan(), w0.isnan())
    assert torch.equal(t.head.weight.nan_to_num(), w0.nan_to_num())
    assert all(torch.equal(a, b) for a, b in zip(b0, t.backbone.parameters()))
    assert t.head.sampled_rows() is None and not t.head_opt.state
