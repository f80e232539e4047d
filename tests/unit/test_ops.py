"""The compiled ops (dpface._kernels) against their PyTorch references (dpface.ops.reference):
values and gradients in float64 and float32, every margin the fused op expresses, sampled
and full shards, off-shard and repeated targets, tiles that do not divide B or K, the logits
budget; opcheck, torch.compile, and the argument checks."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dpface import ops
from dpface.ops import FusedMargin, margin_softmax
from dpface.ops.margin_softmax import rows_sink
from dpface.ops.reference import margin_softmax_reference, range_loss_terms_reference

needs_ext = pytest.mark.skipif(not ops.available("cpu"), reason="dpface._kernels not built")

MARGINS = {
    "softmax": FusedMargin(s=1.0, normalize=False),
    "normface": FusedMargin(s=30.0),
    "cosface": FusedMargin(s=64.0, m3=0.35),
    "arcface": FusedMargin(s=64.0, m2=0.5),
    "arcface_easy": FusedMargin(s=64.0, m2=0.5, easy_margin=True),
    "combined": FusedMargin(s=32.0, m1=1.0, m2=0.3, m3=0.2),
    "combined_m1": FusedMargin(s=16.0, m1=2.0, m2=0.1, m3=0.1),
}


def test_extension_is_built():
    """CI installs with a compiler: the fused path must exist there, not silently fall back."""
    if os.environ.get("DPFACE_ALLOW_NO_KERNELS") == "1":
        pytest.skip("DPFACE_ALLOW_NO_KERNELS=1")
    assert ops.available("cpu"), ops.report()
    assert "CPU" in ops.report()


@pytest.mark.parametrize("cmd", [["-m", "dpface.ops"], ["-m", "dpface.cli", "kernels"]])
def test_kernels_report_from_a_fresh_interpreter(cmd):
    """`dpface kernels` and `python -m dpface.ops` import nothing before asking: the report
    must load the extension itself (it once said "missing: libc10.so" while training used it)."""
    if os.environ.get("DPFACE_ALLOW_NO_KERNELS") == "1":
        pytest.skip("DPFACE_ALLOW_NO_KERNELS=1")
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("dpface kernels: CPU built (") and "ATen: " in line, line
    assert "CUDA not built: " in line or "CUDA built for " in line, line


def make_case(b, d, c, k, dtype, seed, bias=False, near=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    idx = None if k is None else torch.randperm(c, generator=g)[:k].sort().values
    kk = c if k is None else k
    target = torch.randint(-1, kk, (b,), generator=g)
    target[1] = target[0] = max(0, int(target[0]))  # repeated label
    target[2] = -1  # class on another shard
    x = torch.randn(b, d, generator=g, dtype=dtype)
    rows = w if idx is None else w[idx]
    if near:
        # θ near π (cos ≈ −0.99, inside the clamp): ArcFace's fallback branch
        x[3] = -F.normalize(rows[target[3].clamp(min=0)], dim=0) + 0.1 * F.normalize(x[3], dim=0)
        x[4] = 3 * rows[target[4].clamp(min=0)] + 0.5 * x[4]  # small angle
    x = F.normalize(x, dim=1)
    bvec = torch.randn(c, generator=g, dtype=dtype) if bias else None
    return x, w, idx, target, bvec


def run(fn, x, w, idx, target, bias, m: FusedMargin, keep, bf16=False, impl="fused"):
    """Outputs and the gradients of x, w (bias, per-sample margins where given) of an
    arbitrary weighting of both differentiable outputs."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    bias = None if bias is None else bias.clone().requires_grad_(True)
    margin = None if m.margin is None else m.margin.detach().clone().requires_grad_(True)
    m = replace(m, margin=margin)
    if fn is None:
        out = margin_softmax(x, w, idx, target, m, bias=bias, keep_cols=keep, bf16=bf16, impl=impl)
    else:
        out = fn(x, w, idx, target, bias, None, None, *m.args(), bf16, keep)
    b = x.shape[0]
    cw = torch.linspace(0.2, 1.0, b, dtype=out.lse.dtype)
    loss = (out.lse * cw).sum() - (out.target_logit * cw.flip(0)).sum()
    wrt = [x, w] + [t for t in (bias, margin) if t is not None]
    return out, torch.autograd.grad(loss, wrt)


def assert_match(a, b, rtol, atol):
    (oa, ga), (ob, gb) = a, b
    for name in ("lse", "target_logit", "target_score", "max_score", "inv_norm", "saved"):
        torch.testing.assert_close(getattr(oa, name), getattr(ob, name), rtol=rtol, atol=atol,
                                   msg=name)
    for i, (u, v) in enumerate(zip(ga, gb)):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=f"grad {i}")


@needs_ext
@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("sampled", [False, True])
def test_fused_matches_reference_float64(name, sampled):
    m = MARGINS[name]
    # B = 600: tiles of 436 columns, so K = 1000 (or 700 sampled) spans a partial tile;
    # the budget (500 columns) ends inside the second tile.
    x, w, idx, t, bias = make_case(600, 12, 1000, 700 if sampled else None, torch.float64,
                                   seed=len(name), bias=not m.normalize)
    for keep in (0, 500, 10**6):
        ref = run(margin_softmax_reference, x, w, idx, t, bias, m, keep)
        got = run(None, x, w, idx, t, bias, m, keep)
        assert_match(got, ref, rtol=1e-10, atol=1e-10)


@needs_ext
@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("name", ["softmax", "arcface", "combined_m1"])
def test_fused_matches_reference_float32(name, impl):
    m = MARGINS[name]
    x, w, idx, t, bias = make_case(37, 16, 300, 130, torch.float32, seed=3, bias=not m.normalize)
    ref = run(margin_softmax_reference, x, w, idx, t, bias, m, 50)
    got = run(None, x, w, idx, t, bias, m, 50, impl=impl)
    assert_match(got, ref, rtol=1e-4, atol=1e-4)


def per_sample(name: str, b: int, dtype, seed: int = 0) -> FusedMargin:
    """Per-sample margins as the adaptive losses hand them to the op (AdaFace's clipped angle
    and negative m2, MagFace's and ElasticFace's per-sample margins, CurricularFace's hard
    negatives, per-sample scales), with arbitrary values in their ranges."""
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=g, dtype=dtype)

    one, zero = torch.ones(b, dtype=dtype), torch.zeros(b, dtype=dtype)
    if name == "adaface":
        z = u(-1, 1)
        return FusedMargin(s=64.0, angle_clip=True, margin=torch.stack([one, -0.4 * z, 0.4 * z + 0.4], 1))
    if name == "magface":
        return FusedMargin(s=64.0, margin=torch.stack([one, u(0.45, 0.8), zero], 1))
    if name == "elastic_arc":
        return FusedMargin(s=64.0, margin=torch.stack([one, 0.5 + 0.05 * torch.randn(b, generator=g, dtype=dtype),
                                                       zero], 1))
    if name == "elastic_cos":
        return FusedMargin(s=64.0, margin=torch.stack([one, zero, 0.35 + 0.05 * torch.randn(b, generator=g,
                                                                                             dtype=dtype)], 1))
    if name == "curricular":
        return FusedMargin(s=64.0, m2=0.5, hard_threshold=u(-0.3, 0.6), t=0.3)
    if name == "scaled_combined":
        return FusedMargin(s=1.0, scale=u(8, 64), margin=torch.stack([u(1, 2), u(0, 0.4), u(0, 0.3)], 1))
    if name == "scaled_curricular_clip":
        return FusedMargin(s=1.0, angle_clip=True, scale=u(16, 64), margin=torch.stack([one, u(-0.4, 0.4), zero], 1),
                           hard_threshold=u(-0.2, 0.5), t=0.7)
    raise KeyError(name)


PER_SAMPLE = ["adaface", "magface", "elastic_arc", "elastic_cos", "curricular", "scaled_combined",
              "scaled_curricular_clip"]


@needs_ext
@pytest.mark.parametrize("name", PER_SAMPLE)
@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("sampled", [False, True])
def test_per_sample_margins_match_reference_float64(name, impl, sampled):
    """The adaptive margins' form of the op (per-sample scale and margins, the clipped angle,
    CurricularFace's hard negatives): values and gradients (x, rows, the margins) equal the
    autograd reference to 1e-10, logits kept for none, part or all of the columns."""
    x, w, idx, t, _ = make_case(600 if impl == "fused" else 50, 12, 1000 if impl == "fused" else 300,
                                (700 if impl == "fused" else 200) if sampled else None, torch.float64, seed=11)
    m = per_sample(name, x.shape[0], torch.float64)
    for keep in (0, 100, 10**6):
        ref = run(margin_softmax_reference, x, w, idx, t, None, m, keep)
        got = run(None, x, w, idx, t, None, m, keep, impl=impl)
        assert_match(got, ref, rtol=1e-10, atol=1e-10)


@needs_ext
@pytest.mark.parametrize("name", PER_SAMPLE)
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_per_sample_margins_float32(name, impl):
    x, w, idx, t, _ = make_case(37, 16, 300, 130, torch.float32, seed=3)
    m = per_sample(name, 37, torch.float32)
    ref = run(margin_softmax_reference, x, w, idx, t, None, m, 50)
    got = run(None, x, w, idx, t, None, m, 50, impl=impl)
    assert_match(got, ref, rtol=1e-4, atol=2e-4)


@needs_ext
@pytest.mark.parametrize("name", ["arcface", "cosface", "combined_m1"])
def test_constant_per_sample_margins_equal_the_scalar_op(name):
    """A per-sample margin that is the same for every row is the scalar margin: the two
    paths through the op agree (and with them the reference's two forms of psi)."""
    m = MARGINS[name]
    x, w, idx, t, _ = make_case(80, 12, 400, 300, torch.float64, seed=5)
    rows = torch.tensor([[m.m1, m.m2, m.m3]], dtype=torch.float64).expand(80, 3).contiguous()
    m_rows = replace(m, s=1.0, m1=1.0, m2=0.0, m3=0.0, scale=torch.full((80,), m.s, dtype=torch.float64),
                     margin=rows)
    for fn in (None, margin_softmax_reference):
        a = run(fn, x, w, idx, t, None, m, 40)
        b = run(fn, x, w, idx, t, None, m_rows, 40)
        assert_match((a[0], a[1][:2]), (b[0], b[1][:2]), rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("name", ["adaface", "magface", "scaled_combined", "scaled_curricular_clip"])
def test_per_sample_margin_gradient_by_finite_differences(name):
    """The margins' gradient (computed outside the kernels from the forward's target logits)
    against finite differences of the op itself."""
    x, w, _, t, _ = make_case(12, 6, 9, None, torch.float64, seed=2)
    m = per_sample(name, 12, torch.float64)
    # m1 = 1 exactly is where the fallback past θ* changes form (ArcFace's cos θ − m2·sin m2
    # for m1 = 1, the shifted cosine above): no derivative in m1 there, so m1 stays fixed.
    free = slice(0, 3) if name == "scaled_combined" else slice(1, 3)

    def f(part):
        margin = torch.cat([m.margin[:, :free.start], part], 1)
        out = margin_softmax(x, w, None, t, replace(m, margin=margin))
        return (out.lse * torch.linspace(0.2, 1, 12, dtype=torch.float64)).sum() - out.target_logit.sum()

    assert torch.autograd.gradcheck(f, (m.margin[:, free].clone().requires_grad_(True),), eps=1e-7, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("case, message", [
    ("margin_shape", "argument 'sample_margin' must be [6, 3]"),
    ("scale_dtype", "argument 'sample_scale' must be a contiguous Float tensor"),
    ("hard_shape", "argument 'hard_threshold' must be [6]"),
    ("raw", "and no per-sample parameters"),
])
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_bad_per_sample_input_names_the_argument(case, message, impl):
    x, w, idx, t, _ = make_case(6, 8, 50, 30, torch.float32, seed=7)
    m = per_sample("scaled_combined", 6, torch.float32)
    if case == "margin_shape":
        m = replace(m, margin=m.margin[:, :2].contiguous())
    elif case == "scale_dtype":
        m = replace(m, scale=m.scale.double())
    elif case == "hard_shape":
        m = replace(m, hard_threshold=torch.zeros(5))
    else:
        m = replace(m, s=1.0, scale=None, margin=None, normalize=False, hard_threshold=torch.zeros(6))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        margin_softmax(x, w, idx, t, m, impl=impl)


def test_a_per_sample_scale_with_gradient_is_refused():
    x, w, idx, t, _ = make_case(6, 8, 50, 30, torch.float32, seed=7)
    m = per_sample("scaled_combined", 6, torch.float32)
    with pytest.raises(ValueError, match="per-sample scale takes no gradient"):
        margin_softmax(x, w, idx, t, replace(m, scale=m.scale.requires_grad_(True)))


@needs_ext
@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("sampled", [False, True])
def test_chunked_matches_reference_float64(name, sampled):
    """head.kernel=chunked: library GEMMs per chunk of 64 columns (several chunks, a
    partial last one, kept logits ending inside a chunk), the epilogues as torch ops."""
    from dpface.ops.chunked import chunked_margin_softmax

    m = MARGINS[name]
    x, w, idx, t, bias = make_case(50, 12, 300, 200 if sampled else None, torch.float64, seed=len(name),
                                   bias=not m.normalize)
    for keep in (0, 100, 10**6):
        ref = run(margin_softmax_reference, x, w, idx, t, bias, m, keep)

        def chunked(*a):
            return chunked_margin_softmax(*a, width=64)

        assert_match(run(chunked, x, w, idx, t, bias, m, keep), ref, rtol=1e-10, atol=1e-10)
        assert_match(run(None, x, w, idx, t, bias, m, keep, impl="chunked"), ref, rtol=1e-10, atol=1e-10)


@needs_ext
@pytest.mark.parametrize("name", ["softmax", "arcface", "combined_m1"])
def test_chunked_bf16_equals_the_reference_on_rounded_operands(name):
    """bf16 operands: forward equals the reference on the same rounded operands; backward
    also rounds the gradient tile for its GEMMs: within 1 % of each gradient's scale."""
    m = MARGINS[name]
    x, w, idx, t, bias = make_case(37, 16, 300, 130, torch.float32, seed=3, bias=not m.normalize)
    ref = run(margin_softmax_reference, x, w, idx, t, bias, m, 50, bf16=True)
    got = run(None, x, w, idx, t, bias, m, 50, bf16=True, impl="chunked")
    for k in ("lse", "target_logit", "target_score", "max_score", "inv_norm", "saved"):
        torch.testing.assert_close(getattr(got[0], k), getattr(ref[0], k), rtol=1e-4, atol=1e-4)
    for u, v in zip(got[1], ref[1]):
        assert (u - v).abs().max() <= 0.01 * v.abs().max()


@needs_ext
def test_arcface_both_branches_and_exact_margin_gradient():
    """θ + m > π takes the fallback (slope 1); elsewhere the exact derivative of
    cos(θ + m), checked against finite differences of the op itself."""
    m = MARGINS["arcface"]
    x, w, _, t, _ = make_case(8, 6, 5, None, torch.float64, seed=0)
    cos = (x * F.normalize(w[t.clamp(min=0)], dim=1)).sum(1)
    assert (cos[3] < math.cos(math.pi - 0.5)) and cos[4] > 0.9  # both branches present
    xr = x.clone().requires_grad_(True)

    def f(xx):
        return margin_softmax(xx, w, None, t, m).target_logit.sum()

    assert torch.autograd.gradcheck(f, (xr,), eps=1e-6, atol=1e-5)


@needs_ext
def test_k_zero_and_all_offshard():
    m = MARGINS["arcface"]
    x, w, _, _, _ = make_case(5, 4, 6, None, torch.float64, seed=1, near=False)
    out = margin_softmax(x, w, torch.empty(0, dtype=torch.long), torch.full((5,), -1), m)
    assert torch.isneginf(out.lse).all() and (out.target_logit == 0).all()
    out = margin_softmax(x, w, None, torch.full((5,), -1), m)
    ref = torch.logsumexp(64 * x @ F.normalize(w, dim=1).T, 1)
    torch.testing.assert_close(out.lse, ref)


@needs_ext
def test_sinks_receive_the_scored_rows_gradient():
    m = MARGINS["softmax"]
    x, w, idx, t, bias = make_case(9, 5, 40, 17, torch.float64, seed=2, bias=True)
    ws, bs = rows_sink(17, 5, torch.float64), rows_sink(17, None, torch.float64)
    out = margin_softmax(x, w, idx, t, m, bias=bias, w_rows_sink=ws, bias_rows_sink=bs)
    (out.lse - out.target_logit).sum().backward()
    wr, br = w.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    ref = margin_softmax_reference(x, wr, idx, t, br, None, None, *m.args(), False, 0)
    (ref.lse - ref.target_logit).sum().backward()
    torch.testing.assert_close(ws.grad, wr.grad[idx])
    torch.testing.assert_close(bs.grad, br.grad[idx])
    assert ws.grad.shape == (17, 5) and ws.grad.is_contiguous()


@needs_ext
@pytest.mark.parametrize("gemm", ["0", "1"], ids=["fp32-gemm-on-rounded-operands", "bf16-gemm"])
def test_bf16_gemm_within_tolerance_of_fp32(gemm, monkeypatch):
    """bf16 operands (8-bit mantissa: cos off by ≲ 4e-3 per element) with fp32 accumulation:
    at s = 64 the log-sum-exp stays within 0.3 and the gradients within 2 % of their scale.
    Both CPU paths (DPFACE_CPU_BF16_GEMM): fp32 GEMMs on bf16-rounded operands, and oneDNN's
    bf16 GEMMs (used where the CPU has AVX512-BF16/AMX), whose outputs are rounded to bf16."""
    monkeypatch.setenv("DPFACE_CPU_BF16_GEMM", gemm)
    m = MARGINS["arcface"]
    x, w, idx, t, _ = make_case(64, 128, 2000, 500, torch.float32, seed=4)
    ref = run(None, x, w, idx, t, None, m, 0)
    got = run(None, x, w, idx, t, None, m, 0, bf16=True)
    assert (got[0].lse - ref[0].lse).abs().max() < 0.3
    for u, v in zip(got[1], ref[1]):
        assert (u - v).abs().max() < 0.02 * v.abs().max()
    # Against the reference with bf16-rounded operands: the target's score and logit are
    # exact (recomputed from the operands with fp32 sums) on both paths. Other scores are
    # exact with fp32 GEMMs; bf16 GEMMs round them to bf16 (|error| ≤ 2^-9 |score|), which
    # moves the log-sum-exp by at most s · 2^-9 · max |score| and the max score by
    # 2^-9 |max|. Backward rounds the gradient tile to bf16 for its GEMMs (as tensor cores
    # would), the autograd reference does not: within 1 % (fp32 GEMMs) / 2 % of the scale.
    exact = run(margin_softmax_reference, x, w, idx, t, None, m, 0, bf16=True)
    for name in ("target_logit", "target_score"):
        torch.testing.assert_close(getattr(got[0], name), getattr(exact[0], name), rtol=1e-4, atol=1e-4)
    top = exact[0].max_score.abs().max().item()
    tol = {"lse": 1e-4 + (m.s * 2 ** -9 * top if gemm == "1" else 0),
           "max_score": 1e-6 + (2 ** -9 * top if gemm == "1" else 0)}
    for name, bound in tol.items():
        err = (getattr(got[0], name) - getattr(exact[0], name)).abs().max().item()
        assert err <= bound, (name, err, bound)
    for u, v in zip(got[1], exact[1]):
        assert (u - v).abs().max() < (0.01 if gemm == "0" else 0.02) * v.abs().max()


@needs_ext
def test_opcheck_margin_ops():
    x, w, idx, t, bias = make_case(20, 8, 50, 30, torch.float64, seed=5, bias=True)
    for m, b, ix in ((MARGINS["arcface"], None, idx), (MARGINS["softmax"], bias, None)):
        args = (x.clone().requires_grad_(True), w.clone().requires_grad_(True), ix, t, b, None,
                None, *m.args(), False, 10)
        torch.library.opcheck(torch.ops.dpface.margin_softmax_fwd.default, args)
        out = torch.ops.dpface.margin_softmax_fwd(*[a.detach() if torch.is_tensor(a) else a
                                                    for a in args])
        bargs = (torch.rand(20, dtype=torch.float64), torch.rand(20, dtype=torch.float64),
                 out[0], x, w, ix, t, b, out[4], out[5], *m.args(), False)
        torch.library.opcheck(torch.ops.dpface.margin_softmax_bwd.default, bargs)


@needs_ext
def test_torch_compile_traces_through_the_op():
    m = MARGINS["cosface"]
    x, w, idx, t, _ = make_case(16, 8, 60, 25, torch.float32, seed=6)

    def loss_fn(xx, ww):
        out = margin_softmax(xx, ww, idx, t, m)
        return (out.lse - out.target_logit).mean()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (loss_fn, compiled):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        value = fn(xx, ww)
        grads.append((value.detach(),) + torch.autograd.grad(value, [xx, ww]))
    for u, v in zip(*grads):
        torch.testing.assert_close(u, v)


@needs_ext
@pytest.mark.parametrize("case, message", [
    ("dtype", "argument 'x' must be float32, float64 or bfloat16"),
    ("mixed", "must have the same dtype"),
    ("shape", "argument 'w' must be 2-D"),
    ("dim", "embedding size mismatch"),
    ("noncontig", "argument 'w' must be contiguous"),
    ("target", "argument 'target' holds columns outside [-1, 30)"),
    ("target_dtype", "argument 'target' must be int64"),
    ("idx", "argument 'idx' holds rows outside [0, 50)"),
    ("bias", "a 'bias' needs normalize=false"),
    ("scale", "raw scores (normalize=false) take no scale or margin"),
])
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_bad_input_names_the_argument(case, message, impl):
    x, w, idx, t, _ = make_case(6, 8, 50, 30, torch.float32, seed=7)
    m, bias = MARGINS["arcface"], None
    if case == "dtype":
        x = x.half()
    elif case == "mixed":
        w = w.double()
    elif case == "shape":
        w = w[0]
    elif case == "dim":
        w = w[:, :5].contiguous()
    elif case == "noncontig":
        w = w.t().contiguous().t()
    elif case == "target":
        t = t.clone()
        t[0] = 30
    elif case == "target_dtype":
        t = t.int()
    elif case == "idx":
        idx = idx.clone()
        idx[-1] = 50
    elif case == "bias":
        bias = torch.zeros(50)
    elif case == "scale":
        m = FusedMargin(s=64.0, normalize=False)
    with pytest.raises(RuntimeError) as e:
        margin_softmax(x, w, idx, t, m, bias=bias, impl=impl)
    assert message in str(e.value) and "dpface::margin_softmax" in str(e.value)


# -- range loss -------------------------------------------------------------------------

def range_case(n, d, ids, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, ids, (n,), generator=g)
    labels[0] = 0  # keep one singleton identity: it contributes no pairs
    labels[labels == ids - 1] = ids - 2
    labels[-1] = ids - 1
    return torch.randn(n, d, generator=g, dtype=dtype), labels


@needs_ext
@pytest.mark.parametrize("k, margin", [(2, 100.0), (3, 0.5), (50, 30.0)])
def test_range_op_matches_reference(k, margin):
    x, y = range_case(40, 6, 7, torch.float64, seed=k)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = ops.range_loss_terms(xa, y, k, margin, kernel="fused")
    ref = range_loss_terms_reference(xb, y, k, margin)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v)
    (got[0] + 0.7 * got[1]).backward()
    (ref[0] + 0.7 * ref[1]).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    assert xa.grad.abs().sum() > 0


@needs_ext
def test_range_op_edge_cases_and_opcheck():
    x = torch.randn(3, 4, dtype=torch.float64)
    one_id = ops.range_loss_terms(x, torch.zeros(3, dtype=torch.long), 2, 1.0, kernel="fused")
    assert one_id[1].item() == 0.0 and one_id[0].item() > 0
    dup = ops.range_loss_terms(torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long),
                               2, 1.0, kernel="fused")
    assert math.isclose(dup[0].item(), 1e-6)  # sqrt of the clamp: no inf, no NaN
    x, y = range_case(12, 3, 4, torch.float64, seed=9)
    torch.library.opcheck(torch.ops.dpface.range_loss_fwd.default,
                          (x.requires_grad_(True), y, 2, 10.0))
    assert torch.autograd.gradcheck(
        lambda xx: sum(torch.ops.dpface.range_loss_fwd(xx, y, 2, 10.0)), (x,))


@needs_ext
def test_range_op_bad_input():
    with pytest.raises(RuntimeError, match="argument 'labels' must have 3 entries"):
        ops.range_loss_terms(torch.randn(3, 4), torch.zeros(2, dtype=torch.long), 2, 1.0,
                             kernel="fused")
    with pytest.raises(RuntimeError, match="'k' must be >= 1"):
        torch.ops.dpface.range_loss_fwd(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), 0, 1.0)


# -- sampled-row SGD ----------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_rows_matches_torch_sgd_on_those_rows(dtype):
    """The compiled row update vs torch.optim.SGD applied to the sampled rows alone; rows
    outside idx are untouched (weights and momentum)."""
    from dpface.ops.row_sgd import sgd_rows_

    g = torch.Generator().manual_seed(0)
    p = torch.randn(50, 7, generator=g, dtype=dtype)
    buf = torch.randn(50, 7, generator=g, dtype=dtype)
    idx = torch.tensor([3, 8, 9, 31, 49])
    grad = torch.randn(5, 7, generator=g, dtype=dtype)
    rows = torch.nn.Parameter(p[idx].clone())
    opt = torch.optim.SGD([rows], lr=0.3, momentum=0.9, weight_decay=0.01)
    opt.state[rows]["momentum_buffer"] = buf[idx].clone()
    rows.grad = grad.clone()
    opt.step()
    p0, b0 = p.clone(), buf.clone()
    sgd_rows_(p, buf, idx, grad, 0.3, 0.9, 0.01)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(p[idx], rows.detach(), **tol)
    torch.testing.assert_close(buf[idx], opt.state[rows]["momentum_buffer"], **tol)
    keep = torch.ones(50, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(p[keep], p0[keep]) and torch.equal(buf[keep], b0[keep])


@needs_ext
def test_sgd_rows_opcheck_and_bad_input():
    p, buf = torch.randn(10, 4), torch.zeros(10, 4)
    args = (p, buf, torch.tensor([1, 5]), torch.randn(2, 4), 0.1, 0.9, 0.0)
    torch.library.opcheck(torch.ops.dpface.sgd_rows_.default, args)
    with pytest.raises(RuntimeError, match="argument 'idx' holds rows outside"):
        torch.ops.dpface.sgd_rows_(p, buf, torch.tensor([1, 10]), torch.randn(2, 4), 0.1, 0.9, 0.0)
    with pytest.raises(RuntimeError, match="argument 'momentum_buf' must have param's shape"):
        torch.ops.dpface.sgd_rows_(p, torch.zeros(9, 4), torch.tensor([1]), torch.randn(1, 4),
                                   0.1, 0.9, 0.0)
