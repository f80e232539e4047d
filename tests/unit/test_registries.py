"""Contract tests parametrised over the registries: an entry is tested by being registered.

Every logit transform in ``LOSSES``, built from its name alone (its defaults), must give
the same loss and gradients through the single-process PartialFC at r = 1 as through the
reference FullFC, pass a float64 gradient check through the head, and give the dense
update's row gradients through ``update: sampled``. Every auxiliary loss in
``AUX_LOSSES`` must build from its name and a weight, return a finite scalar and give
finite gradients to the embeddings. (Backbones: ``test_models.py`` runs every entry of
``BACKBONES``; streams: ``test_stream_protocol.py`` every entry of ``STREAMS``.)
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from dpface.heads import FullFC, PartialFC
from dpface.losses import AUX_LOSSES, LOSSES, build_aux_loss, build_loss

D, C, B = 6, 9, 8
STEP = 1_000_000  # far into every schedule (L-/A-Softmax's λ)


def case(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.randn(C, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return x, y, w


def head(cls, name: str, w: torch.Tensor, **kw):
    h = cls(D, C, build_loss({"name": name}), **kw).double()
    with torch.no_grad():
        h.weight.copy_(w)
    return h


@pytest.mark.parametrize("name", LOSSES.names())
def test_partial_fc_at_rate_one_equals_full_fc(name):
    x, y, w = case(1)
    out = {}
    for cls in (FullFC, PartialFC):
        h = head(cls, name, w)
        xr = x.clone().requires_grad_(True)
        o = h(xr, y, STEP)
        o.loss.backward()
        out[cls] = (o.loss.detach(), xr.grad, h.weight.grad)
    for a, b in zip(out[FullFC], out[PartialFC]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out[FullFC][0])


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradients_match_finite_differences_through_the_head(name):
    x, y, w = case(2)
    h = head(PartialFC, name, w)
    names = [n for n, p in h.named_parameters() if p.requires_grad]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in h.named_parameters() if p.requires_grad}

    def f(x_, *vals):
        return functional_call(h, dict(zip(names, vals)), (x_, y, STEP)).loss

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), *params.values()), fast_mode=True)


@pytest.mark.parametrize("name", LOSSES.names())
def test_sampled_update_gives_the_dense_row_gradients(name):
    x, y, w = case(3)
    dense, sampled = head(PartialFC, name, w), head(PartialFC, name, w, update="sampled")
    dense(x, y, STEP).loss.backward()
    sampled(x, y, STEP).loss.backward()
    rows = sampled.sampled_rows()
    assert rows is not None and rows.idx is None  # r = 1: every row was scored
    torch.testing.assert_close(rows.leaves["weight"].grad, dense.weight.grad, rtol=1e-10, atol=1e-12)
    assert sampled.weight.grad is None  # no dense gradient in sampled mode


class TinyNet(torch.nn.Module):
    """A stand-in network for what the trainer provides (a distillation teacher)."""

    def __init__(self, out: int):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, out)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("name", AUX_LOSSES.names())
def test_every_aux_loss_builds_from_its_name_and_gives_finite_gradients(name):
    spec = {"name": name, "weight": 0.5}
    accepted = AUX_LOSSES.parameters(name)
    # Required parameters a config must give (a teacher's path) and what the trainer provides.
    spec.update({k: "unused.pth" for k, p in accepted.items() if p.default is p.empty and k not in
                 ("num_classes", "embedding_size", "group", "teacher_module")})
    extra = {"teacher_module": TinyNet(D + 2), "teacher_embedding_size": D + 2} if "teacher_module" in accepted else {}
    module, weight = build_aux_loss(spec, num_classes=C, embedding_size=D, **extra)
    assert weight == 0.5
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, generator=g).requires_grad_(True)
    y = torch.arange(B) // 4  # a P×K batch (2 identities × 4): pairs, triplets and 2 sets of 2 exist
    kw = {"quality": torch.rand(B, generator=g)} if getattr(module, "needs_quality", False) else {}
    if getattr(module, "needs_images", False):
        kw["images"] = torch.randn(B, 3, 4, 4, generator=g)
    loss = module(x, y, 0, **kw)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
