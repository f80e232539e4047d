"""ViT backbones (parameter arithmetic, the 9-pixel patch grid, the block against a naive
formula, token masking, ONNX export) and activation checkpointing of backbone blocks (same
loss, gradients and BatchNorm running statistics as without; where it applies; bad values).

Models are toy-sized (few channels, 16-36 px inputs); full-size ViTs are only built on the
meta device.
"""
import math

import pytest
import torch

from dpface.models import build_backbone
from dpface.models.vit import SIZES, Block
from dpface.registry import SpecError

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def images(b, s, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- ViT --------------------------------------------------------------------------------
def vit_param_count(dim, depth, e, patch=9, size=112, mlp_ratio=4.0, masks=True):
    n = (size // patch) ** 2                    # tokens: ⌊S/p⌋² (the remainder is dropped)
    h = int(dim * mlp_ratio)
    embed = 3 * patch * patch * dim + dim + n * dim  # patch conv (with bias), position embedding
    block = (2 * dim                            # LN
             + 3 * dim * dim                    # qkv, no bias
             + dim * dim + dim                  # output projection
             + 2 * dim                          # LN
             + dim * h + h + h * dim + dim)     # MLP
    head = n * dim * dim + 2 * dim + dim * e + 2 * e  # Linear(N·dim→dim), BN, Linear(dim→e), BN
    return embed + depth * block + 2 * dim + head + (dim if masks else 0)  # final LN, mask token


@pytest.mark.parametrize("name", sorted(SIZES))
def test_parameter_counts_match_the_arithmetic(name):
    dim, depth, _ = SIZES[name]
    with torch.device("meta"):
        model = build_backbone({"name": name}, embedding_size=512)
        assert model.num_tokens == 144  # 112 = 12·9 + 4: a 12x12 grid
        assert n_params(model) == vit_param_count(dim, depth, 512)
        # Options change the architecture as derived.
        other = build_backbone({"name": name, "patch_size": 8, "input_size": 64, "mlp_ratio": 2.0,
                                "mask_ratio": 0.0}, embedding_size=128)
        assert n_params(other) == vit_param_count(dim, depth, 128, patch=8, size=64, mlp_ratio=2.0, masks=False)
    if name == "vit_s":  # by hand: 37.81M in the blocks, 37.75M in the 73728→512 projection
        assert abs(n_params(model) - 76.02e6) < 0.01e6


def test_patch_grid_drops_the_last_rows_and_columns():
    torch.manual_seed(0)
    model = build_backbone({"name": "vit_tiny_cpu", "depth": 1}, embedding_size=16).eval()
    assert model.grid == (112 - 9) // 9 + 1 == 12  # the conv's output side, no padding
    x = images(2, 112)
    with torch.no_grad():
        ref = model(x)
        y = x.clone()
        y[:, :, 108:, :] = 5.0  # rows 108-111 and columns 108-111: outside every patch
        y[:, :, :, 108:] = -5.0
        assert torch.equal(model(y), ref)
        y[:, :, 107, 0] += 1.0  # the last row the grid covers
        assert not torch.allclose(model(y), ref)


def test_block_matches_the_naive_formula():
    torch.manual_seed(0)
    dim, heads, n = 12, 3, 5
    block = Block(dim, heads, hidden=20, drop_path=0.0)
    for p in block.parameters():  # LN and biases away from 1/0 so every term counts
        p.data.normal_(0, 0.3)
    x = torch.randn(2, n, dim)

    def ln(t, m):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias

    a = block.attn
    q, k, v = (ln(x, block.norm1) @ a.qkv.weight.T).split(dim, dim=-1)
    d = dim // heads
    out = torch.empty(2, n, dim)
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        w = torch.exp(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d))
        out[..., s] = (w / w.sum(-1, keepdim=True)) @ v[..., s]
    y = x + out @ a.proj.weight.T + a.proj.bias
    fc1, fc2 = block.mlp[0], block.mlp[2]
    ref = y + torch.clamp(ln(y, block.norm2) @ fc1.weight.T + fc1.bias, 0, 6) @ fc2.weight.T + fc2.bias
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_training_masks_tokens_with_the_mask_token():
    torch.manual_seed(0)
    model = build_backbone({"name": "vit_tiny_cpu", "input_size": 36}, embedding_size=16)
    seen = {}
    model.feature[0].register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    n, keep = 16, int(16 * 0.9)  # 4x4 grid; the recipes' rounding keeps 14
    x = images(4, 36)
    model.train()(x)
    tokens = seen["x"].view(4, n, -1)
    is_mask = (tokens == model.mask_token.view(1, 1, -1)).all(-1)
    assert is_mask.sum(1).tolist() == [n - keep] * 4
    assert not torch.equal(is_mask[0], is_mask[1]) or not torch.equal(is_mask[1], is_mask[2])  # per sample
    with torch.no_grad():
        model.eval()(x)
    assert not (seen["x"].view(4, n, -1) == model.mask_token.view(1, 1, -1)).all(-1).any()


def test_every_vit_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_backbone({"name": "vit_tiny_cpu", "input_size": 27}, embedding_size=8).train()
    out = model(images(4, 27))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec, match", [
    ({"dim": 30, "num_heads": 4}, "divisible by num_heads"),
    ({"input_size": 8}, "at least patch_size"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"drop_path": -0.1}, "drop_path"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
    ({"depth": 0}, "depth"),
])
def test_bad_vit_options(spec, match):
    with pytest.raises(ValueError, match=match):
        build_backbone({"name": "vit_tiny_cpu", **spec}, embedding_size=8)


def test_vit_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from dpface.eval import export_onnx as xo

    torch.manual_seed(0)
    model = build_backbone({"name": "vit_tiny_cpu", "depth": 1}, embedding_size=16)
    with torch.no_grad():  # running statistics away from their initial 0/1
        model.train()(images(8, 112, seed=3))
    model.eval()
    out = tmp_path / "vit.onnx"
    xo.export(model, out, image_size=112)
    checks = xo.verify(out, model, {"3 random": images(3, 112), "1 random": images(1, 112, seed=1)})
    assert all(c["max_abs_diff_raw"] < 1e-4 * max(1.0, c["max_abs_raw"]) for c in checks.values())


# -- activation checkpointing -----------------------------------------------------------
SPECS = {
    "iresnet_tiny": ({"name": "iresnet_tiny", "base_width": 8, "input_size": 16}, 16),
    # drop path and token masking on (the defaults): the recomputation must replay their RNG.
    "vit_tiny_cpu": ({"name": "vit_tiny_cpu", "dim": 32, "input_size": 36}, 36),
    "mobilefacenet": ({"name": "mobilefacenet", "width": 0.25, "input_size": 16}, 16),
}


def blocks_of(model):
    if hasattr(model, "layer1"):
        return [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    return list(model.blocks)


def step(model, x, proj):
    """One training forward + backward; returns (loss, grads, buffers, block forward calls)."""
    calls = [0] * len(blocks_of(model))
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(blocks_of(model))]
    model.train().zero_grad()
    torch.manual_seed(1)  # drop path / masking draws
    loss = (model(x) * proj).sum()
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return loss.detach(), grads, {k: b.clone() for k, b in model.named_buffers()}, calls


@pytest.mark.parametrize("mode", ["blocks", "every_n"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_checkpointing_gives_the_same_loss_gradients_and_running_stats(name, mode):
    spec, side = SPECS[name]
    torch.manual_seed(0)
    ref = build_backbone(spec, embedding_size=8)
    ck = build_backbone({**spec, "checkpoint": mode, "checkpoint_every": 2}, embedding_size=8)
    ck.load_state_dict(ref.state_dict())
    x = images(4, side)
    proj = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    loss0, grads0, bufs0, calls0 = step(ref, x, proj)
    loss1, grads1, bufs1, calls1 = step(ck, x, proj)
    # Checkpointed blocks ran twice (forward, then recomputation in backward), the others once.
    every = 1 if mode == "blocks" else 2
    assert calls0 == [1] * len(calls0)
    assert calls1 == [2 if i % every == 0 else 1 for i in range(len(calls1))]
    torch.testing.assert_close(loss1, loss0)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], msg=k)
    # BN buffers updated once per step, as without checkpointing (a second update in the
    # recomputation would give running_mean 0.19·μ instead of 0.1·μ, and a count of 2).
    assert any("num_batches_tracked" in k for k in bufs1)
    for k in bufs0:
        torch.testing.assert_close(bufs1[k], bufs0[k], msg=k, rtol=1e-6, atol=1e-7)
    # And the next step (after an SGD update) agrees too.
    for m in (ref, ck):
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.05 * p.grad
    loss0, grads0, bufs0, _ = step(ref, x, proj)
    loss1, grads1, bufs1, _ = step(ck, x, proj)
    torch.testing.assert_close(loss1, loss0)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], msg=k)
    for k in bufs0:
        torch.testing.assert_close(bufs1[k], bufs0[k], msg=k, rtol=1e-6, atol=1e-7)


def test_checkpointing_only_in_training_with_grad(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    spec, side = SPECS["iresnet_tiny"]
    model = build_backbone({**spec, "checkpoint": "every_n", "checkpoint_every": 3}, embedding_size=8)
    x = images(4, side)
    model.train()(x).sum().backward()
    assert calls == [False, False]  # blocks 0 and 3 of 4, non-reentrant
    calls.clear()
    with torch.no_grad():
        model(x)
    model.eval()(x)
    assert calls == []


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("opts, match", [
    ({"checkpoint": "block"}, "checkpoint must be one of none, blocks, every_n, got 'block'"),
    ({"checkpoint": True}, "checkpoint must be one of"),
    ({"checkpoint": "every_n", "checkpoint_every": 0}, "checkpoint_every must be an int >= 1"),
    ({"checkpoint": "every_n", "checkpoint_every": 1.5}, "checkpoint_every must be an int >= 1"),
])
def test_bad_checkpoint_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        build_backbone({**SPECS[name][0], **opts}, embedding_size=8)


def test_misspelt_checkpoint_option_suggests_the_name():
    with pytest.raises(SpecError, match="did you mean 'checkpoint_every'"):
        build_backbone({"name": "vit_s", "checkpoint_evry": 2}, embedding_size=8)


def test_eval_output_is_unchanged_by_the_mode():
    # The mode is a training-memory setting: the weights (state_dict keys) and the eval output
    # are those of the plain model, so checkpoints load either way.
    spec, side = SPECS["vit_tiny_cpu"]
    torch.manual_seed(0)
    ref = build_backbone(spec, embedding_size=8).eval()
    ck = build_backbone({**spec, "checkpoint": "blocks"}, embedding_size=8).eval()
    ck.load_state_dict(ref.state_dict())
    x = images(2, side)
    with torch.no_grad():
        assert torch.equal(ck(x), ref(x))
