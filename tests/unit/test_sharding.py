"""Class split, and head checkpoints saved at one world size and loaded at another.

Ranks are simulated in one process: heads built with rank/world_size overrides hold
exactly the rows a real rank would.
"""
from __future__ import annotations

import pytest
import torch

from dpface.heads import (
    PartialFC,
    apply_shard_state,
    class_range,
    load_resharded,
    merge_shards,
    save_head_shard,
    shard_filename,
    sharding,
)
from dpface.losses import build_loss

C, D = 11, 6


def test_class_range_uneven_and_contiguous():
    assert [class_range(11, 3, r) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]
    assert [class_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert class_range(5, 1, 0) == (0, 5)
    for c in (7, 64, 1000):
        for w in (1, 2, 5, 7):
            ranges = [class_range(c, w, r) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == c
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_class_range_errors():
    with pytest.raises(ValueError, match="world size 5 exceeds the number of classes 4"):
        class_range(4, 5, 0)
    with pytest.raises(ValueError, match=r"rank 3 is outside \[0, 3\)"):
        class_range(10, 3, 3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        class_range(0, 1, 0)


def build(world, rank, opt, bias=False):
    spec = {"name": "softmax", "bias": True} if bias else {"name": "arcface"}
    head = PartialFC(D, C, build_loss(spec), rank=rank, world_size=world)
    if opt == "sgd":
        o = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        o = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=0.05)
    return head, o


def full_grads(step: int, bias: bool):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(C, D, generator=g), torch.randn(C, generator=g) if bias else None


def train(heads, steps):
    """Optimizer steps with the same global gradients applied shard by shard."""
    for step in steps:
        gw, gb = full_grads(step, heads[0][0].bias is not None)
        for head, opt in heads:
            head.weight.grad = gw[head.class_start:head.class_end].clone()
            if head.bias is not None:
                head.bias.grad = gb[head.class_start:head.class_end].clone()
            opt.step()


def gather(heads) -> dict:
    """Whole-matrix view of the simulated ranks: params and per-param optimizer state."""
    out = {"weight": torch.cat([h.weight.detach() for h, _ in heads])}
    if heads[0][0].bias is not None:
        out["bias"] = torch.cat([h.bias.detach() for h, _ in heads])
    for name in list(out):
        states = [o.state[getattr(h, name)] for h, o in heads]
        for k, v in states[0].items():
            if v.dim() > 0:
                out[f"{name}.{k}"] = torch.cat([s[k] for s in states])
            else:
                assert all(torch.equal(s[k], v) for s in states)
                out[f"{name}.{k}"] = v
    return out


def save(heads, directory):
    world = len(heads)
    return [save_head_shard(h, o, directory / shard_filename(r, world))
            for r, (h, o) in enumerate(heads)]


def restore(world, files, opt, bias):
    heads = []
    for r in range(world):
        head, o = build(world, r, opt, bias)
        apply_shard_state(head, o, load_resharded(files, head.class_start, head.class_end))
        heads.append((head, o))
    return heads


@pytest.mark.parametrize("opt,bias", [("sgd", True), ("adamw", False)])
def test_reshard_round_trip_is_exact(tmp_path, opt, bias):
    old = [build(4, r, opt, bias) for r in range(4)]
    train(old, range(3))
    files = save(old, tmp_path)
    want = gather(old)
    expected = {"sgd": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq", "step"}}[opt]
    assert {k.split(".", 1)[1] for k in want if "." in k} == expected
    for world in (2, 3):
        new = restore(world, files, opt, bias)
        got = gather(new)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert new[0][1].param_groups[0]["lr"] == old[0][1].param_groups[0]["lr"]
        # The restored state is live: one more step keeps both runs identical.
        train(new, [3])
        ref = restore(4, files, opt, bias)
        train(ref, [3])
        after, ref_after = gather(new), gather(ref)
        for k in ref_after:
            assert torch.equal(after[k], ref_after[k]), k


def test_merge_shards(tmp_path):
    old = [build(4, r, "adamw") for r in range(4)]
    train(old, range(2))
    files = save(old, tmp_path)
    merged = merge_shards(files, tmp_path / "export" / "head.pt")
    st = torch.load(merged, weights_only=True)
    assert (st["class_start"], st["class_end"], st["num_classes"]) == (0, C, C)
    assert torch.equal(st["rows"]["weight"], torch.cat([h.weight.detach() for h, _ in old]))
    # A merged file is a one-shard checkpoint.
    part = load_resharded([merged], 3, 8)
    assert torch.equal(part["rows"]["weight.exp_avg"], gather(old)["weight.exp_avg"][3:8])


def test_load_errors_name_the_file(tmp_path):
    old = [build(4, r, "sgd") for r in range(4)]
    train(old, range(1))
    files = save(old, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_resharded(files[:3] + [tmp_path / "nope.pt"], 0, 5)
    with pytest.raises(ValueError, match=r"classes \[3, 6\) are in no shard .*rank00002"):
        load_resharded([files[0]] + files[2:], 0, 5)
    with pytest.raises(ValueError, match=r"classes \[9, 11\) are in no shard .*after .*rank00002"):
        load_resharded(files[:3], 0, 5)
    other = [build(2, r, "sgd") for r in range(2)]
    train(other, range(1))
    files2 = save(other, tmp_path / "w2")
    with pytest.raises(ValueError, match="shards overlap"):
        load_resharded(files + files2[:1], 0, 5)
    big = PartialFC(D, C + 1, build_loss({"name": "arcface"}), rank=0, world_size=1)
    save_head_shard(big, None, tmp_path / "big.pt")
    with pytest.raises(ValueError,
                       match=r"num_classes mismatch: .*rank00000.* has 11, .*big.pt has 12"):
        load_resharded(files + [tmp_path / "big.pt"], 0, 5)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read head shard file .*junk.pt"):
        load_resharded([tmp_path / "junk.pt"], 0, 5)
    with pytest.raises(ValueError, match=r"requested classes \[5, 12\)"):
        load_resharded(files, 5, 12)
    head, o = build(2, 0, "sgd")
    with pytest.raises(ValueError, match=r"shard state is for classes \[0, 3\)"):
        apply_shard_state(head, o, load_resharded(files, 0, 3))
    head, o = build(2, 0, "sgd", bias=True)
    with pytest.raises(ValueError,
                       match=r"rows for \['weight'\], the head has \['bias', 'weight'\]"):
        apply_shard_state(head, o, load_resharded(files, 0, 6))


def test_optimizer_must_hold_only_head_params():
    head, _ = build(1, 0, "sgd")
    other = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(list(head.parameters()) + list(other.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="only the head's parameters"):
        sharding.head_shard_state(head, opt)


def test_atomic_save_keeps_old_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "shard.pt"
    sharding.atomic_save({"v": 1}, path)

    def boom(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(sharding.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        sharding.atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["shard.pt"]  # no temp file left


@pytest.mark.parametrize("spec, state", [
    ({"name": "curricularface"}, {"t": 0.37}),
    ({"name": "adaface"}, {"mean": 23.5, "std": 4.25}),
    ({"name": "adacos", "dynamic": True}, {"s": 11.5}),
])
def test_a_transforms_batch_statistics_survive_a_reshard(tmp_path, spec, state):
    """The EMAs of the adaptive margins are replicated parameters of the transform: saved
    with every shard, restored at any world size."""
    old = []
    for r in range(4):
        head = PartialFC(D, C, build_loss(spec), rank=r, world_size=4)
        with torch.no_grad():
            for k, v in state.items():
                getattr(head.transform, k).fill_(v)
        old.append((head, torch.optim.SGD(head.parameters(), lr=0.1)))
    files = save(old, tmp_path)
    for world in (1, 3):
        for r in range(world):
            head = PartialFC(D, C, build_loss(spec), rank=r, world_size=world)
            apply_shard_state(head, torch.optim.SGD(head.parameters(), lr=0.1),
                              load_resharded(files, head.class_start, head.class_end))
            assert {k: float(getattr(head.transform, k)) for k in state} == state
