"""The distillation loss (losses/distill.py) against hand computations of each kind, with a
teacher that never changes and a projection only where the dimensions differ."""
from __future__ import annotations

import math

import pytest
import torch

from dpface.losses import build_aux_loss
from dpface.losses.distill import DistillLoss

B, DS = 5, 4


class Teacher(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = torch.nn.Linear(12, dim)
        self.bn = torch.nn.BatchNorm1d(dim)  # eval mode: its running statistics must not move

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


def case(dt: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = Teacher(dt)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        teacher.bn.running_mean.normal_(generator=g)
    return teacher, torch.randn(B, DS, generator=g, dtype=torch.float64), torch.randn(B, 3, 2, 2, generator=g)


def t_emb(teacher, images):
    with torch.no_grad():
        return teacher.eval()(images).double()


def test_cosine_by_hand():
    teacher, s, img = case(DS)
    loss = DistillLoss(10, DS, "t.pth", "cosine", teacher_module=teacher, teacher_embedding_size=DS)
    assert loss.proj is None
    t = t_emb(teacher, img)
    want = sum(1 - float(s[i] @ t[i]) / (s[i].norm().item() * t[i].norm().item()) for i in range(B)) / B
    assert loss(s, torch.zeros(B), 0, images=img).item() == pytest.approx(want, rel=1e-6)


def test_l2_by_hand_through_the_projection():
    teacher, s, img = case(6)
    loss = DistillLoss(10, DS, "t.pth", "l2", teacher_module=teacher, teacher_embedding_size=6).double()
    assert loss.proj is not None and tuple(loss.proj.weight.shape) == (6, DS)
    t, w = t_emb(teacher, img), loss.proj.weight.detach()
    want = sum(sum((float(w[d] @ s[i]) - float(t[i, d])) ** 2 for d in range(6)) for i in range(B)) / (B * 6)
    assert loss(s, torch.zeros(B), 0, images=img).item() == pytest.approx(want, rel=1e-6)


def test_relation_by_hand_any_dimensions():
    teacher, s, img = case(9)
    loss = DistillLoss(10, DS, "t.pth", "relation", teacher_module=teacher, teacher_embedding_size=9)
    assert loss.proj is None  # similarity matrices need no projection
    t = t_emb(teacher, img)

    def cos(a, b):
        return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))

    terms = [(cos(s[i], s[j]) - cos(t[i], t[j])) ** 2 for i in range(B) for j in range(B) if i != j]
    assert loss(s, torch.zeros(B), 0, images=img).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "l2", "relation"])
def test_the_teacher_never_changes_and_gets_no_gradient(kind):
    teacher, s, img = case(6)
    teacher.train()  # even handed over in train mode: it runs in eval mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = DistillLoss(10, DS, "t.pth", kind, teacher_module=teacher, teacher_embedding_size=6).double()
    s = s.requires_grad_(True)
    opt = torch.optim.SGD([s, *loss.parameters()], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        loss(s, torch.zeros(B), 0, images=img).backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters()) and s.grad is not None
    assert "teacher" not in "".join(loss.state_dict())  # neither trained nor checkpointed


def test_a_config_spec_builds_with_the_provided_teacher():
    teacher, s, img = case(DS)
    module, w = build_aux_loss({"name": "distill", "weight": 2.0, "teacher": "t.pth", "kind": "relation"},
                               10, DS, teacher_module=teacher, teacher_embedding_size=DS)
    assert w == 2.0 and module.kind == "relation" and module.teacher is teacher
    with pytest.raises(ValueError, match="kind must be one of cosine, l2, relation"):
        DistillLoss(10, DS, "t.pth", "kl", teacher_module=teacher)


def test_projection_always_starts_as_the_identity_and_learns():
    teacher, s, img = case(DS)
    plain = DistillLoss(10, DS, "t.pth", "l2", teacher_module=teacher, teacher_embedding_size=DS).double()
    proj = DistillLoss(10, DS, "t.pth", "l2", projection="always", teacher_module=teacher,
                       teacher_embedding_size=DS).double()
    assert plain.proj is None and torch.equal(proj.proj.weight, torch.eye(DS, dtype=torch.float64))
    a, b = plain(s, torch.zeros(B), 0, images=img), proj(s, torch.zeros(B), 0, images=img)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)  # the same loss at the start
    b.backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0
