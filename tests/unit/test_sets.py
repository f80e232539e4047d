"""Set-to-set recognition: poolings, the quality-aware backbone, the set loss, the template
protocol, and the Range-loss paper's backbone. Tiny models and images throughout."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpface.data.synthetic.templates import make_templates
from dpface.eval.sets import (
    evaluate_pooled,
    evaluate_set_poolings,
    mean_pool,
    norm_pool,
    pool,
    quality_pool,
    set_weights,
    spearman,
)
from dpface.losses import AUX_LOSSES
from dpface.losses.set_loss import SetToSetLoss
from dpface.models import BACKBONES, build_backbone
from dpface.models.quality import QualityAware
from dpface.registry import SpecError

D = 8
BASE = {"name": "iresnet_tiny", "base_width": 4, "input_size": 16}
QAN = {"name": "qan", "hidden": 8, "base": BASE}
RANGE = {"name": "rangenet", "base_width": 4, "layers": [1, 1, 0, 1, 1], "input_size": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


def close(got, want, tol=1e-6):
    # numpy's check: torch.testing's first call costs seconds of imports
    np.testing.assert_allclose(torch.as_tensor(got).detach().double().numpy(),
                               torch.as_tensor(want).detach().double().numpy(), rtol=tol, atol=tol)


def images(b, s=16, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------ poolings


def naive_pool(x, w):
    """Σ w_i x̂_i / Σ w_i, normalised, in float64 numpy."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    p = (w[:, None] * xh).sum(0) / w.sum()
    return p / np.linalg.norm(p)


def test_duplicates_of_one_image_pool_to_its_embedding():
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(0)) * 3
    dup = x.repeat(5, 1)
    want = F.normalize(x, dim=1)[0]
    q = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.1
    for got in (mean_pool(dup), norm_pool(dup), quality_pool(dup, q), pool(dup, "qan", quality=q)):
        close(got, want)


def test_poolings_match_hand_computation_per_set():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, D, generator=g) * torch.rand(9, 1, generator=g) * 5
    index = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1])
    q = torch.rand(9, generator=g) + 0.05
    got = {"mean": mean_pool(x, index), "norm": norm_pool(x, index), "qan": quality_pool(x, q, index)}
    for s in range(3):
        m = (index == s).numpy()
        xs = x.numpy()[m]
        np.testing.assert_allclose(got["mean"][s], naive_pool(xs, np.ones(m.sum())), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["norm"][s], naive_pool(xs, np.linalg.norm(xs, axis=1)),
                                   rtol=1e-5, atol=1e-6)
        # norm weighting = the normalised sum of the raw embeddings (OE-CNN: x = ‖x‖·x̂)
        raw = xs.sum(0)
        np.testing.assert_allclose(got["norm"][s], raw / np.linalg.norm(raw), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["qan"][s], naive_pool(xs, q.numpy()[m]), rtol=1e-5, atol=1e-6)
    # numpy in, numpy out
    assert isinstance(norm_pool(x.numpy(), index.numpy()), np.ndarray)


def test_set_weights_positive_and_normalised_within_each_set():
    q = torch.tensor([0.5, 2.0, 1e-3, 3.0, 1.0])
    index = torch.tensor([0, 0, 1, 1, 1])
    w = set_weights(q, index)
    assert (w > 0).all()
    np.testing.assert_allclose(w.numpy(), [0.2, 0.8, 1e-3 / 4.001, 3 / 4.001, 1 / 4.001], rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: mean_pool(torch.zeros(0, D)), "empty set"),
    (lambda: mean_pool(torch.randn(4, D), torch.tensor([0, 0, 2, 2])), r"set\(s\) \[1\] are empty"),
    (lambda: mean_pool(torch.randn(4, D), torch.tensor([0, 1])), r"one set id per embedding"),
    (lambda: mean_pool(torch.randn(4)), r"\[N, D\]"),
    (lambda: quality_pool(torch.randn(4, D), torch.ones(3)), r"shape \(4,\)"),
    (lambda: quality_pool(torch.randn(4, D), torch.tensor([1.0, 0.0, 1.0, 1.0])), "finite and > 0"),
    (lambda: quality_pool(torch.randn(4, D), torch.tensor([1.0, -2.0, 1.0, 1.0])), "finite and > 0"),
    (lambda: quality_pool(torch.randn(4, D), torch.tensor([1.0, math.nan, 1.0, 1.0])), "finite and > 0"),
    (lambda: norm_pool(torch.zeros(3, D)), "zero total weight"),
    (lambda: pool(torch.randn(3, D), "qan"), "needs quality"),
    (lambda: pool(torch.randn(3, D), "max"), "unknown pooling"),
])
def test_bad_pooling_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------ qan backbone


def test_qan_forward_is_the_base_backbone_embedding():
    torch.manual_seed(0)
    base = build_backbone(BASE, embedding_size=D)
    model = build_backbone(QAN, embedding_size=D)
    model.base.load_state_dict(base.state_dict())
    x = images(4)
    for train in (True, False):
        model.base.load_state_dict(base.state_dict())  # train-mode calls moved the BN statistics
        base.train(train)
        model.train(train)
        with torch.no_grad():
            ref = base(x)
            got = model(x)
            emb, q = model(x, with_quality=True)
        assert torch.equal(got, ref) and torch.equal(emb, ref)
        assert q.shape == (4,)
    assert isinstance(model, QualityAware) and model.input_size == 16
    assert BACKBONES.input_size(QAN) == 16 and BACKBONES.input_size({"name": "iresnet18"}) == 112


def test_quality_scores_positive_even_when_saturated():
    torch.manual_seed(0)
    for act in ("sigmoid", "softplus"):
        model = build_backbone({**QAN, "activation": act}, embedding_size=D).eval()
        model.quality[-1].bias.data.fill_(-1e4)  # would underflow to exactly 0 without the floor
        with torch.no_grad():
            _, q = model(images(3), with_quality=True)
        assert (q > 0).all() and torch.isfinite(q).all()


def split_batch(p=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)]
    return labels


def test_set_loss_gradients_reach_every_quality_parameter():
    torch.manual_seed(0)
    model = build_backbone(QAN, embedding_size=D).train()
    # random final layer: at its zero init every score is equal and only the bias learns
    torch.nn.init.normal_(model.quality[-1].weight)
    loss_fn = AUX_LOSSES.build({"name": "qan_set", "set_size": 2}, num_classes=4, embedding_size=D)
    assert loss_fn.needs_quality is True
    labels = torch.arange(4).repeat_interleave(4)
    emb, q = model(images(16), with_quality=True)
    loss_fn(emb, labels, 0, q).backward()
    for name, p in model.quality.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["softmax", "triplet"])
def test_set_loss_gradcheck_wrt_quality_and_embeddings(kind):
    g = torch.Generator().manual_seed(3)
    labels = split_batch(3, 4)
    emb = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    q = (torch.rand(12, generator=g, dtype=torch.float64) + 0.2).requires_grad_()
    loss_fn = SetToSetLoss(3, 3, set_size=2, kind=kind, scale=4.0, margin=0.2)
    # central finite differences of the real path (it keeps float64); by hand, as
    # torch.autograd.gradcheck's first call costs seconds of imports
    loss_fn(emb, labels, 0, q).backward()
    for t in (q, emb):
        flat, grad = t.detach().view(-1), t.grad.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + 1e-6
            up = loss_fn(emb.detach(), labels, 0, q.detach()).item()
            flat[i] = old - 1e-6
            down = loss_fn(emb.detach(), labels, 0, q.detach()).item()
            flat[i] = old
            assert grad[i].item() == pytest.approx((up - down) / 2e-6, abs=1e-6), (t.shape, i)
    assert q.grad.abs().sum() > 0


def naive_loss(se, slab, kind, s, m, lib=None):
    """Loops over anchors; ``se`` pooled set embeddings, ``slab`` their labels."""
    total, n = 0.0, 0
    S = len(slab)
    for a in range(S):
        pos = [b for b in range(S) if b != a and slab[b] == slab[a]]
        neg = [b for b in range(S) if slab[b] != slab[a]]
        if not pos:
            continue
        cos = [(se[a] * se[b]).sum() for b in range(S)]
        if kind == "softmax":
            num = sum(torch.exp(s * (cos[b] - m)) for b in pos)
            den = num + sum(torch.exp(s * cos[b]) for b in neg)
            total = total - torch.log(num / den)
        else:
            hp = min(cos[b] for b in pos)
            hn = max(cos[b] for b in neg) if neg else hp - m
            total = total + torch.clamp(m + hn - hp, min=0)
        n += 1
    return total / n


@pytest.mark.parametrize("kind", ["softmax", "triplet"])
def test_set_loss_matches_naive_recomputation(kind):
    g = torch.Generator().manual_seed(4)
    # 3 identities × 5 images (2 sets of 2, one image left over) + one identity with 3 images
    # (one set: a negative only, never an anchor)
    labels = torch.cat([split_batch(3, 5), torch.full((3,), 7)])
    emb = torch.randn(18, D, generator=g)
    q = torch.rand(18, generator=g) + 0.1
    loss_fn = SetToSetLoss(8, D, set_size=2, kind=kind, scale=8.0, margin=0.15)
    got = loss_fn(emb, labels, 0, q)
    # naive sets: each label's rows in batch order, consecutive pairs
    sets, slab = [], []
    for lab in sorted(set(labels.tolist())):
        rows = [i for i in range(18) if labels[i] == lab]
        for k in range(len(rows) // 2):
            sets.append(rows[2 * k:2 * k + 2])
            slab.append(lab)
    assert len(sets) == 7
    se = []
    for rows in sets:
        x = F.normalize(emb[rows], dim=1)
        w = q[rows] / q[rows].sum()
        se.append(F.normalize((w[:, None] * x).sum(0), dim=0))
    ref = naive_loss(se, slab, kind, 8.0, 0.15)
    close(got, ref, 1e-5)


def test_set_loss_bad_input():
    loss_fn = SetToSetLoss(4, D, set_size=2)
    emb = torch.randn(6, D)
    with pytest.raises(ValueError, match="needs the backbone's quality"):
        loss_fn(emb, torch.arange(6), 0)
    with pytest.raises(ValueError, match="no identity in the batch has 2 sets"):
        loss_fn(emb, torch.tensor([0, 0, 1, 1, 2, 2]), 0, torch.ones(6))
    with pytest.raises(ValueError, match="finite and > 0"):
        loss_fn(emb, torch.zeros(6, dtype=torch.long), 0, -torch.ones(6))
    with pytest.raises(ValueError, match="set_size"):
        SetToSetLoss(4, D, set_size=0)


def test_nested_spec_errors_name_the_base():
    with pytest.raises(SpecError, match="qan' -> base: unknown backbone 'iresnet5'"):
        build_backbone({"name": "qan", "base": {"name": "iresnet5"}}, embedding_size=D)
    with pytest.raises(SpecError, match="base.*'base_widht'"):
        BACKBONES.check("qan", {"base": {"name": "iresnet18", "base_widht": 8}}, provided=("embedding_size",))
    with pytest.raises(SpecError, match="base.*embedding_size"):
        BACKBONES.check("qan", {"base": {"name": "iresnet18", "embedding_size": 8}},
                        provided=("embedding_size",))
    with pytest.raises(SpecError, match="plain backbone"):
        BACKBONES.check("qan", {"base": QAN}, provided=("embedding_size",))
    with pytest.raises(SpecError, match="needs parameter.*base"):
        BACKBONES.check("qan", {}, provided=("embedding_size",))


def test_config_validation_reaches_the_nested_base():
    from dpface.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="base: unknown backbone 'iresnet5'"):
        load_config(None, ["model={name: qan, base: {name: iresnet5}}"])


# ------------------------------------------------------------------------------ rangenet


def test_rangenet_shapes_eval_batch_independence_and_every_gradient():
    torch.manual_seed(0)
    model = build_backbone(RANGE, embedding_size=D)
    x = images(4, 32)
    out = model.train()(x)
    assert out.shape == (4, D) and out.dtype == torch.float32 and torch.isfinite(out).all()
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * proj).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        close(model(x[:1])[0], model(x)[0], 1e-4)
    with pytest.raises(ValueError, match=r"expected images \[B,3,32,32\]"):
        model(images(2, 16))
    with pytest.raises(ValueError, match="layers must be 5"):
        build_backbone({**RANGE, "layers": [1, 1, 1, 1]}, embedding_size=D)


def test_rangenet_embedding_concatenates_the_last_two_stages():
    torch.manual_seed(0)
    model = build_backbone(RANGE, embedding_size=D).eval()
    seen = {}
    model.stage4.register_forward_hook(lambda m, i, o: seen.__setitem__("c4", o))
    model.stage5.register_forward_hook(lambda m, i, o: seen.__setitem__("c5", o))
    x = images(3, 32)
    with torch.no_grad():
        out = model(x)
        c4 = F.max_pool2d(seen["c4"], 2, 2)  # stage 4 after its 2x2 pool: the 2x2 grid at 32 px
        c5 = seen["c5"]
        assert c4.shape == (3, 32, 2, 2) and c5.shape == (3, 64, 2, 2)  # widths 4·(8, 16)
        flat = torch.cat([c4, c5], 1).flatten(1)
        assert model.fc.in_features == flat.shape[1] == (32 + 64) * 4
        bn = model.features
        ref = F.batch_norm(flat @ model.fc.weight.T, bn.running_mean, bn.running_var, bn.weight,
                           bn.bias, training=False, eps=bn.eps)
        close(out, ref, 1e-5)
        # both parts reach the embedding: the FC columns of each are used
        w4, w5 = model.fc.weight[:, :32 * 4], model.fc.weight[:, 32 * 4:]
        assert (c4.flatten(1) @ w4.T).abs().sum() > 0 and (c5.flatten(1) @ w5.T).abs().sum() > 0
    # a qan wrapper works on it too (generic feature_map / embed split)
    q = build_backbone({"name": "qan", "hidden": 4, "base": RANGE}, embedding_size=D).eval()
    with torch.no_grad():
        e, s = q(x, with_quality=True)
    assert e.shape == (3, D) and s.shape == (3,)


def test_rangenet_default_is_32_to_512_at_112():
    params = BACKBONES.parameters("rangenet")
    assert params["base_width"].default == 32 and params["input_size"].default == 112
    m = build_backbone({"name": "rangenet", "base_width": 2}, embedding_size=D)  # default depth, 112 px
    assert m.widths == [2 * 2**i for i in range(5)] and m.input_size == 112  # 32 … 512 at 32
    assert m.fc.in_features == (16 + 32) * 7 * 7
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    pools = [p for p in m.modules() if isinstance(p, torch.nn.MaxPool2d)]
    assert convs and all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert len(pools) == 1 and pools[0].kernel_size == 2 and pools[0].stride == 2  # applied 4 times


# ------------------------------------------------------------------------------ protocol


def brute_tar(scores, same, far):
    """Smallest threshold t (over all scores and −inf) accepting at most floor(FAR·N_neg)
    impostors with score > t; TAR = share of genuine scores > t."""
    neg, pos = scores[~same], scores[same]
    k = math.floor(far * neg.size + 1e-9)
    ok = [t for t in list(scores) + [-np.inf] if (neg > t).sum() <= k]
    t = min(ok)
    return float((pos > t).mean())


def test_template_protocol_matches_brute_force():
    torch.manual_seed(0)
    ts = make_templates(4, identity_offset=50, templates_per_identity=3, min_images=1, max_images=3,
                        poor_fraction=0.5, seed=1, image_size=16)
    assert ts.num_templates == 12 and len(ts.pairs) == 66 and ts.issame.sum() == 12
    assert ts.degradation[np.r_[0, np.flatnonzero(np.diff(ts.template)) + 1]].max() < 0.3  # first good
    model = build_backbone(QAN, embedding_size=D)
    torch.nn.init.normal_(model.quality[-1].weight)  # distinct scores: qan ≠ mean
    fars = (0.1, 0.5)
    got = evaluate_set_poolings(model, ts, fars=fars)
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(ts.images).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
        emb, q = model(x, with_quality=True)
    emb, q = emb.double().numpy(), q.double().numpy()
    for how, w in (("mean", np.ones(len(ts))), ("norm", np.linalg.norm(emb, axis=1)), ("qan", q)):
        feats = np.stack([naive_pool(emb[ts.template == t], w[ts.template == t])
                          for t in range(ts.num_templates)])
        scores = np.array([feats[a] @ feats[b] for a, b in ts.pairs])
        for far in fars:
            assert got[how]["tar_at_far"][far] == pytest.approx(brute_tar(scores, ts.issame, far), abs=1e-9)
        gal = np.flatnonzero(ts.gallery)
        hits = [ts.template_identity[gal[np.argmax([feats[p] @ feats[g] for g in gal])]] == ts.template_identity[p]
                for p in np.flatnonzero(~ts.gallery)]
        assert got[how]["rank1"] == pytest.approx(np.mean(hits))
    # Spearman = Pearson of the ranks (no ties here: continuous values)
    ru, rq = np.argsort(np.argsort(ts.degradation)), np.argsort(np.argsort(q))
    assert got["quality"]["spearman_vs_degradation"] == pytest.approx(np.corrcoef(ru, rq)[0, 1], abs=1e-6)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # tied ranks averaged
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="template features for 12 templates"):
        evaluate_pooled(torch.randn(5, D), ts)
