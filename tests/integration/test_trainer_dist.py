"""The trainer on real gloo ranks: agreed skip decisions, and 2 ranks learning like 1."""
import json

import pytest
import torch

from dpface.engine.trainer import Trainer
from tests.helpers import load_tiny, run_distributed

pytestmark = pytest.mark.multiproc


def cfg_for(out, name, *extra):
    """The tiny run (tests/conftest.py), width 16 and ArcFace; each test sets the batch."""
    return load_tiny(out, name, "model={name: iresnet_tiny, base_width: 16}",
                     "head.loss={name: arcface, s: 16.0, m: 0.3}", "train.log_every=1", *extra,
                     drop=("data.batch_size",))


def _skip_on_one_rank(rank, world, out):
    t = Trainer(cfg_for(out, "skip", "data.batch_size=8", "train.steps=2"))
    if rank == 1:  # only this rank's head shard overflows
        t.head.weight.register_hook(lambda g: g * float("nan"))
    before = ([p.detach().clone() for p in t.backbone.parameters()], t.head.weight.detach().clone())
    images, labels = next(iter(t.stream))
    m = t.train_step((images, labels))
    unchanged = all(torch.equal(a, b) for a, b in zip(before[0], t.backbone.parameters()))
    return {"skipped": m["skipped"], "backbone_unchanged": unchanged,
            "head_unchanged": torch.equal(before[1], t.head.weight.detach())}


def test_a_skip_on_one_rank_is_a_skip_on_every_rank(tmp_path):
    results = run_distributed(_skip_on_one_rank, 2, tmp_path, str(tmp_path), timeout_s=120)
    for r in results:  # rank 0's gradients were finite, yet it skipped too: shards stay in step
        assert r == {"skipped": 1, "backbone_unchanged": True, "head_unchanged": True}


def _train(rank, world, out, name, batch, steps):
    # The end-to-end setting of tests/integration/test_trainer.py, split over `world` ranks.
    t = Trainer(cfg_for(out, name, f"data.batch_size={batch}", f"train.steps={steps}",
                        "head.embedding_size=64", "head.loss={name: arcface, s: 32.0, m: 0.3}",
                        "data.synthetic={num_identities: 40, max_images: 20, min_images: 8, exponent: 0.5}",
                        "train.warmup_steps=5", "train.log_every=20", "eval.num_pairs=200",
                        "eval.folds=10", "eval.num_identities=40"))
    final = t.fit()
    return final.get("synthetic/acc")


@pytest.mark.slow
def test_two_ranks_reach_the_one_rank_accuracy(tmp_path):
    """Same global batch (2 × 16 vs 1 × 32), same steps: the 2-rank run learns as well."""
    steps = 60
    one = _train(0, 1, str(tmp_path), "one", 32, steps)
    two = run_distributed(_train, 2, tmp_path, str(tmp_path), "two", 16, steps, timeout_s=600)[0]
    untrained = json.loads((tmp_path / "one" / "final_metrics.json").read_text())["untrained/synthetic/acc"]
    assert one > untrained + 0.1  # the 1-rank run learned something to match
    assert two >= one - 0.05, (one, two)


def _resume_on_two_ranks(rank, world, out):
    t = Trainer(cfg_for(out, "regrow", "data.batch_size=8", "train.steps=6"), resume="auto")
    state = {"step": t.state.step, "rows": (t.head.class_start, t.head.class_end),
             "weight": t.head.weight.detach().clone(),
             "momentum": t.head_opt.state[t.head.weight]["momentum_buffer"].clone(),
             "backbone": {k: v.clone() for k, v in t.backbone.state_dict().items()},
             "data": t.stream.state_dict()}
    t.fit()
    state["final_step"] = t.state.step
    return state


def test_resume_at_another_world_size(tmp_path):
    """Saved by 1 rank (global batch 16), resumed by 2 ranks (2 × 8): each rank loads its
    own rows of the head and their momentum, the backbone, and the global data position."""
    one = Trainer(cfg_for(str(tmp_path), "regrow", "data.batch_size=16", "train.steps=6"))
    one.fit(until=3)
    weight = one.head.weight.detach()
    momentum = one.head_opt.state[one.head.weight]["momentum_buffer"]
    ranks = run_distributed(_resume_on_two_ranks, 2, tmp_path, str(tmp_path), timeout_s=300)
    assert [r["rows"] for r in ranks] == [(0, 6), (6, 12)]
    for r in ranks:
        lo, hi = r["rows"]
        assert r["step"] == 3 and r["final_step"] == 6
        assert torch.equal(r["weight"], weight[lo:hi]) and torch.equal(r["momentum"], momentum[lo:hi])
        for k, v in one.backbone.state_dict().items():
            assert torch.equal(r["backbone"][k], v), k
        assert r["data"] == {"batches": 3, "global_batch": 16}
