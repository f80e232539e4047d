"""The one training step (engine/step.py) and the parallel context: gradient
accumulation against one step on the union, a head group smaller than the world
against a world of that size, and gradient compression against none."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from dpface import distributed as dist
from dpface.config import ConfigError, load_config
from dpface.engine.parallel import DDPBackbone
from dpface.engine.step import TrainStep
from dpface.heads import PartialFC
from dpface.losses import CenterLoss, build_loss
from tests.helpers import run_distributed

D, C, S = 8, 10, 8  # embedding size, classes, image side


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # no BatchNorm: accumulation is exact only without it
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 16), nn.Tanh(), nn.Linear(16, D))


def _batch(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8),
            torch.randint(0, C, (n,), generator=g))


def _parts(ctx, accumulate: int, center: bool = False, group=None):
    backbone = _backbone()
    head = PartialFC(D, C, build_loss({"name": "cosface", "s": 8.0, "m": 0.2}), group=group, kernel="reference")
    aux = [("center", CenterLoss(C, D, group=group), 0.1)] if center else []
    bp = DDPBackbone(backbone, torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9), ctx, None)
    step = TrainStep(bp, head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9), aux, ctx,
                     grad_clip=1.0, amp_dtype=None, accumulate=accumulate)
    return backbone, head, step


CPU1 = dist.ParallelContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_accumulated_micro_batches_equal_one_step_on_their_union():
    b1, b2, b3, b4 = (_batch(i, 6) for i in range(4))
    bb_a, head_a, acc = _parts(CPU1, accumulate=2)
    bb_b, head_b, one = _parts(CPU1, accumulate=1)
    for step, (x, y) in enumerate([(b1, b2), (b3, b4)]):  # two updates: momentum carries over
        ma = acc([x, y], step)
        mb = one([(torch.cat([x[0], y[0]]), torch.cat([x[1], y[1]]))], step)
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    assert ma["grad_norm"] > 1.0  # the clip (1.0) was active: it is applied once, to the sum
    for pa, pb in zip(list(bb_a.parameters()) + list(head_a.parameters()),
                      list(bb_b.parameters()) + list(head_b.parameters())):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_wrong_number_of_micro_batches_and_config_rules():
    _, _, acc = _parts(CPU1, accumulate=2)
    with pytest.raises(ValueError, match="expected 2 micro-batches"):
        acc([_batch(0, 4)], 0)
    with pytest.raises(ConfigError, match="train.accumulate.*deepspeed"):
        load_config(None, ["train.accumulate=2", "deepspeed.enabled=true"])
    with pytest.raises(ConfigError, match="train.accumulate.*head.update: dense"):
        load_config(None, ["train.accumulate=2", "head.update=sampled"])
    with pytest.raises(ConfigError, match="train.global_batch.*multiple of train.accumulate"):
        load_config(None, ["train.accumulate=3", "train.global_batch=64"])
    cfg = load_config(None, ["train.accumulate=2", "train.global_batch=64"])
    assert cfg.per_rank_batch(2) == 16
    with pytest.raises(ConfigError, match="cannot be split"):
        cfg.per_rank_batch(3)


# -- a head group smaller than the world ---------------------------------------------------
def _pair_steps(rank, world, data, subgroups):
    """Two updates of backbone + head + centre loss. With ``subgroups`` the 4-rank world is
    two independent 2-rank runs (ranks {0,1} and {2,3}), each on its own data."""
    torch.manual_seed(0)
    if subgroups:
        groups = [tdist.new_group([0, 1]), tdist.new_group([2, 3])]
        pair, group, sub_rank = rank // 2, groups[rank // 2], rank % 2
    else:
        pair, group, sub_rank = None, None, rank
    ctx = dist.ParallelContext(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"),
                               data_group=group, head_group=group)
    out = {}
    for name, batches in data.items():
        if pair is not None and name != ("a", "b")[pair]:
            continue
        backbone, head, step = _parts(ctx, accumulate=1, center=True, group=group)
        ms = [step([(x[sub_rank::2], y[sub_rank::2])], i) for i, (x, y) in enumerate(batches)]
        out[name] = {"loss": [m["loss"] for m in ms], "norm": [m["grad_norm"] for m in ms],
                     "backbone": [p.detach().clone() for p in backbone.parameters()]}
    return out


@pytest.fixture(scope="module")
def pair_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groups")
    data = {k: [_batch(10 * s + i, 8) for i in range(2)] for s, k in enumerate("ab")}
    four = run_distributed(_pair_steps, 4, tmp, data, True, timeout_s=240)
    two = run_distributed(_pair_steps, 2, tmp, data, False, timeout_s=240)
    return four, two


def test_head_group_smaller_than_the_world_equals_a_world_of_its_size(pair_results):
    """If anything that communicates (the head's gathers, the grad norm and skip decision,
    the centre loss, DDP) used the world instead of the context's groups, the two pairs'
    values would mix and differ from the 2-rank runs."""
    four, two = pair_results
    for rank in range(4):
        name = "ab"[rank // 2]
        got, want = four[rank][name], two[rank % 2][name]  # the centre loss's value is per rank
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["norm"] == pytest.approx(want["norm"], rel=1e-6)
        for p, q in zip(got["backbone"], want["backbone"]):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert four[0]["a"]["loss"] != pytest.approx(four[2]["b"]["loss"])  # the pairs did differ


# -- gradient compression --------------------------------------------------------------
def _curves(rank, world, hooks, steps):
    ctx = dist.ParallelContext(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"))
    out = {}
    for hook in hooks:
        backbone = _backbone()
        bp = DDPBackbone(backbone, torch.optim.SGD(backbone.parameters(), lr=0.2, momentum=0.9), ctx, None,
                         comm_hook=hook)
        head = PartialFC(D, C, build_loss({"name": "cosface", "s": 8.0, "m": 0.2}), kernel="reference")
        step = TrainStep(bp, head, torch.optim.SGD(head.parameters(), lr=0.2), [], ctx,
                         grad_clip=0.0, amp_dtype=None)
        x, y = _batch(99, 32)
        out[hook] = [step([(x[rank::2], y[rank::2])], i)["loss"] for i in range(steps)]
    return out


def test_bf16_and_fp16_gradient_compression_follow_the_uncompressed_curve(tmp_path):
    curves = run_distributed(_curves, 2, tmp_path, ("none", "bf16", "fp16"), 12, timeout_s=240)[0]
    assert curves["none"][-1] < 0.7 * curves["none"][0]  # it trains
    for h in ("bf16", "fp16"):
        assert curves[h] != curves["none"]  # the hook ran: rounding changed the gradients
        assert curves[h] == pytest.approx(curves["none"], rel=2e-2)
