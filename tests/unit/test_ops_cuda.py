"""The CUDA backend of the dpface ops against plain-PyTorch float64 references.

Runs only where torch has a GPU and dpface._kernels was built with CUDA. The references
here materialise the [B, K] logits and use autograd; they are written independently of
dpface/ops so that a shared mistake cannot hide. Tolerances are relative to the largest
reference magnitude of each output: fp32 kernels vs float64 at 2e-4; the bf16 paths (the
reference rounds x and w to bf16 as the kernels do, but not the backward's da) at 2e-2.
"""
from __future__ import annotations

import math

import pytest
import torch

try:
    import dpface._kernels as _kernels
    _WITH_CUDA = bool(getattr(_kernels, "WITH_CUDA", 0))
    _IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means "not built"
    _kernels, _WITH_CUDA, _IMPORT_ERROR = None, False, e

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA ops cannot run here", allow_module_level=True)
if _kernels is None:
    pytest.skip(f"dpface._kernels is not built ({_IMPORT_ERROR})", allow_module_level=True)
if not _WITH_CUDA:
    pytest.skip("dpface._kernels was built without CUDA (torch without CUDA or no nvcc)",
                allow_module_level=True)

DEV = torch.device("cuda")
F32_TOL, BF16_TOL = 2e-4, 2e-2


def call(name, **kw):
    """torch.ops.dpface.<name> with positional arguments in schema order; optional
    arguments not given (e.g. the autograd sinks) are None."""
    op = getattr(torch.ops.dpface, name)
    args = []
    for a in op.default._schema.arguments:
        args.append(kw.pop(a.name) if a.name in kw else None)
    assert not kw, f"{name} has no arguments {sorted(kw)}"
    return op(*args)


def close(got, ref, tol, what):
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), f"{what}: non-finite entries differ"
    if fin.any():
        scale = max(1.0, ref[fin].abs().max().item())
        err = (got[fin] - ref[fin]).abs().max().item()
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"
    assert torch.equal(got[~fin], ref[~fin]), f"{what}: infinities differ"


# ---- margin softmax reference ------------------------------------------------------------

def psi_ref(c, m1, m2, m3, easy):
    """Combined margin cos(m1 theta + m2) - m3 with the clamp and the monotone fallback."""
    if m1 == 1.0 and m2 == 0.0:
        return c - m3
    eps = 1e-7
    cc = c.clamp(-1 + eps, 1 - eps)
    theta_star = min(math.pi, (math.pi - m2) / m1)
    cts = math.cos(theta_star)
    if m1 == 1.0:
        margin = cc * math.cos(m2) - torch.sqrt(1 - cc * cc) * math.sin(m2)
        fallback = cc - m2 * math.sin(m2)
    else:
        margin = torch.cos(m1 * torch.acos(cc) + m2)
        fallback = cc - (cts + 1)
    out = torch.where(cc > cts, margin, fallback) - m3
    if easy:
        out = torch.where(cc > 0, out, c)
    return out


def bf16_ste(t):
    """t rounded to bf16, with an identity gradient (the kernels' bf16 GEMM operands)."""
    return t + (t.to(torch.bfloat16).double() - t).detach()


def margin_ref(x, w, idx, target, bias, s, m1, m2, m3, easy, normalize, round_bf16):
    """float64, materialised: returns outputs and leaves (x, rows, bias rows) for autograd."""
    xl = x.detach().double().requires_grad_(True)
    rows_src = w.detach().double()
    rows = (rows_src[idx] if idx is not None else rows_src).clone().requires_grad_(True)
    bl = None
    if bias is not None:
        b = bias.detach().double()
        bl = (b[idx] if idx is not None else b).clone().requires_grad_(True)
    xg, rg = (bf16_ste(xl), bf16_ste(rows)) if round_bf16 else (xl, rows)
    dots = xg @ rg.T
    if normalize:
        inv = 1.0 / rows.norm(dim=1).clamp_min(1e-12)
        score = dots * inv
    else:
        inv = torch.ones(rows.shape[0], dtype=torch.float64, device=x.device)
        score = dots + bl if bl is not None else dots
    B, K = score.shape
    has = target >= 0
    r = has.nonzero().squeeze(1)
    c = target[r]
    z = s * score
    if r.numel():
        z = z.index_put((r, c), s * psi_ref(score[r, c], m1, m2, m3, easy))
    lse = torch.logsumexp(z, 1) if K else torch.full((B,), -math.inf, dtype=torch.float64, device=x.device)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    col = target.clamp(min=0)
    ar = torch.arange(B, device=x.device)
    tl = torch.where(has, z[ar, col], zero) if K else torch.zeros(B, dtype=torch.float64, device=x.device)
    ts = torch.where(has, score[ar, col], zero) if K else torch.zeros(B, dtype=torch.float64, device=x.device)
    ms = score.max(1).values if K else torch.full((B,), -math.inf, dtype=torch.float64, device=x.device)
    return dict(lse=lse, tl=tl, ts=ts, ms=ms, inv=inv, z=z, score=score, leaves=(xl, rows, bl))


def make_case(B, C, D, K=None, dtype=torch.float32, seed=0, near_minus_one=True, off_shard=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * 0.05
    if K is None:
        idx = None
        K = C
    else:
        idx = torch.randperm(C, generator=g)[:K].sort().values
    # Repeated labels: targets drawn from a few columns; some rows off-shard (-1).
    target = torch.randint(0, max(1, min(K, 7)), (B,), generator=g)
    if K:
        target = torch.where(torch.rand(B, generator=g) < 0.5, torch.randint(0, K, (B,), generator=g), target)
    else:
        target = torch.full((B,), -1)
    if off_shard:
        target[torch.rand(B, generator=g) < 0.2] = -1
    if near_minus_one and K:
        # cos = -0.96 at the target: past theta* for every margin here (the fallback
        # branch), yet clear of the +-(1 - 1e-7) clamp, whose in/out decision fp32 and
        # fp64 may take differently.
        for i in range(0, B, 5):
            if target[i] >= 0:
                c = idx[target[i]] if idx is not None else target[i]
                wh = torch.nn.functional.normalize(w[c], dim=0)
                u = torch.randn(D, generator=g, dtype=torch.float64)
                u = torch.nn.functional.normalize(u - (u @ wh) * wh, dim=0)
                x[i] = -0.96 * wh + 0.28 * u
    bias = torch.randn(C, generator=g, dtype=torch.float64) * 0.1
    grad_lse = torch.randn(B, generator=g, dtype=torch.float64)
    grad_t = torch.randn(B, generator=g, dtype=torch.float64)
    to = lambda t: t.to(DEV)  # noqa: E731
    return dict(x=to(x.to(dtype)), w=to(w.to(dtype)), idx=None if idx is None else to(idx),
                target=to(target), bias=to(bias.to(dtype)), grad_lse=to(grad_lse.float()),
                grad_t=to(grad_t.float()))


CONFIGS = {
    "softmax_bias": dict(normalize=False, s=1.0, m=(1.0, 0.0, 0.0), easy=False, bias=True),
    "softmax_nobias": dict(normalize=False, s=1.0, m=(1.0, 0.0, 0.0), easy=False, bias=False),
    "normface": dict(normalize=True, s=30.0, m=(1.0, 0.0, 0.0), easy=False, bias=False),
    "cosface": dict(normalize=True, s=64.0, m=(1.0, 0.0, 0.35), easy=False, bias=False),
    "arcface": dict(normalize=True, s=64.0, m=(1.0, 0.5, 0.0), easy=False, bias=False),
    "arcface_easy": dict(normalize=True, s=64.0, m=(1.0, 0.5, 0.0), easy=True, bias=False),
    "combined_m1_2": dict(normalize=True, s=32.0, m=(2.0, 0.3, 0.2), easy=False, bias=False),
}


def run_margin(case, cfg, keep_cols, bf16):
    m1, m2, m3 = cfg["m"]
    bias = case["bias"] if cfg["bias"] else None
    common = dict(x=case["x"], w=case["w"], idx=case["idx"], target=case["target"], bias=bias,
                  s=cfg["s"], m1=m1, m2=m2, m3=m3, t=0.0, easy_margin=cfg["easy"], angle_clip=False,
                  normalize=cfg["normalize"], bf16=bf16)
    lse, tl, ts, ms, inv, saved = call("margin_softmax_fwd", keep_cols=keep_cols, **common)
    gx, grows, gbias = call("margin_softmax_bwd", grad_lse=case["grad_lse"], grad_target=case["grad_t"],
                            lse=lse, inv_norm=inv, saved=saved, **common)
    return dict(lse=lse, tl=tl, ts=ts, ms=ms, inv=inv, saved=saved, gx=gx, grows=grows, gbias=gbias)


def check_margin(case, cfg, keep_cols, bf16, tol):
    got = run_margin(case, cfg, keep_cols, bf16)
    m1, m2, m3 = cfg["m"]
    round_bf16 = bf16 or case["x"].dtype == torch.bfloat16
    ref = margin_ref(case["x"], case["w"], case["idx"], case["target"], case["bias"] if cfg["bias"] else None,
                     cfg["s"], m1, m2, m3, cfg["easy"], cfg["normalize"], round_bf16)
    for key in ("lse", "tl", "ts", "ms", "inv"):
        assert got[key].dtype == torch.float32, key
        close(got[key], ref[key], tol, key)
    K = ref["z"].shape[1]
    n_keep = min(K, keep_cols)
    assert got["saved"].shape == (case["x"].shape[0], n_keep)
    close(got["saved"], ref["score"][:, :n_keep], tol, "saved")
    xl, rows, bl = ref["leaves"]
    loss = (case["grad_lse"].double() * ref["lse"]).sum() + (case["grad_t"].double() * ref["tl"]).sum()
    leaves = [xl, rows] + ([bl] if bl is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    assert got["gx"].dtype == case["x"].dtype and got["grows"].dtype == case["w"].dtype
    close(got["gx"], grads[0], tol, "grad_x")
    close(got["grows"], grads[1], tol, "grad_rows")
    if bl is not None:
        close(got["gbias"], grads[2], tol, "grad_bias")
    else:
        assert got["gbias"].numel() == 0


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("use_idx", [False, True], ids=["all_rows", "idx"])
@pytest.mark.parametrize("keep_cols", [0, 50, 10_000], ids=["keep0", "keep_partial", "keep_all"])
def test_margin_fp32(cfg, use_idx, keep_cols):
    # B and K are not multiples of the 64-wide tiles, D not of the 32-deep k-slices.
    case = make_case(B=70, C=150, D=40, K=97 if use_idx else None, seed=1)
    check_margin(case, CONFIGS[cfg], keep_cols, bf16=False, tol=F32_TOL)


@pytest.mark.parametrize("cfg", ["softmax_bias", "normface", "arcface", "combined_m1_2"])
@pytest.mark.parametrize("io", ["fp32_bf16_gemm", "bf16_inputs"])
def test_margin_bf16(cfg, io):
    dtype = torch.bfloat16 if io == "bf16_inputs" else torch.float32
    case = make_case(B=70, C=150, D=72, K=97, dtype=dtype, seed=2)
    check_margin(case, CONFIGS[cfg], keep_cols=50, bf16=(io == "fp32_bf16_gemm"), tol=BF16_TOL)


def test_margin_large_multi_chunk():
    """Many column blocks in the forward and several column chunks in the backward."""
    case = make_case(B=4100, C=9000, D=64, K=8500, seed=3)
    check_margin(case, CONFIGS["arcface"], keep_cols=700, bf16=False, tol=F32_TOL)


def test_margin_empty_shard():
    case = make_case(B=9, C=20, D=16, K=0, seed=4, near_minus_one=False)
    got = run_margin(case, CONFIGS["arcface"], keep_cols=5, bf16=False)
    assert torch.isneginf(got["lse"]).all() and torch.isneginf(got["ms"]).all()
    assert (got["tl"] == 0).all() and (got["ts"] == 0).all()
    assert got["saved"].shape == (9, 0) and got["inv"].shape == (0,)
    assert (got["gx"] == 0).all() and got["grows"].shape == (0, 16)


def test_margin_deterministic():
    """Bitwise repeatable; this shape also splits the grad_x GEMM over the columns."""
    case = make_case(B=300, C=3000, D=128, K=2500, seed=5)
    check_margin(case, CONFIGS["cosface"], keep_cols=100, bf16=False, tol=F32_TOL)
    a = run_margin(case, CONFIGS["cosface"], keep_cols=100, bf16=False)
    b = run_margin(case, CONFIGS["cosface"], keep_cols=100, bf16=False)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_margin_cuda_matches_cpu_op():
    """The two backends agree (CPU in float64)."""
    case = make_case(B=33, C=80, D=24, K=61, seed=6)
    cfg = CONFIGS["combined_m1_2"]
    got = run_margin(case, cfg, keep_cols=20, bf16=False)
    cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in case.items()}
    for k in ("x", "w", "bias", "grad_lse", "grad_t"):
        cpu[k] = case[k].double().cpu()
    want = run_margin(cpu, cfg, keep_cols=20, bf16=False)
    for key in ("lse", "tl", "ts", "ms", "inv", "saved", "gx", "grows"):
        close(got[key], want[key], F32_TOL, key)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_per_sample_margins_match_the_cpu_op(impl):
    """The adaptive margins' form (per-sample scale and margins with AdaFace's clipped angle,
    CurricularFace's hard negatives) on the GPU against the CPU op in float64 (itself equal
    to the reference to 1e-10: tests/unit/test_ops.py), gradients of the margins included."""
    from dataclasses import replace

    from dpface.ops import FusedMargin, margin_softmax

    case = make_case(B=130, C=700, D=40, K=500, seed=8)
    g = torch.Generator().manual_seed(8)
    B = 130
    u = torch.rand(B, 3, generator=g, dtype=torch.float64)
    base = FusedMargin(s=1.0, angle_clip=True, scale=16 + 48 * u[:, 0],
                       margin=torch.stack([torch.ones(B, dtype=torch.float64), 0.8 * u[:, 1] - 0.4, 0.3 * u[:, 2]], 1),
                       hard_threshold=torch.rand(B, generator=g, dtype=torch.float64) - 0.3, t=0.5)
    outs = []
    for dev, dtype in ((DEV, torch.float32), ("cpu", torch.float64)):
        x = case["x"].to(dev, dtype).requires_grad_(True)
        w = case["w"].to(dev, dtype).requires_grad_(True)
        margin = base.margin.to(dev, dtype).requires_grad_(True)
        m = replace(base, scale=base.scale.to(dev, dtype), margin=margin,
                    hard_threshold=base.hard_threshold.to(dev, dtype))
        out = margin_softmax(x, w, case["idx"].to(dev), case["target"].to(dev), m, keep_cols=100,
                             impl=impl if dev != "cpu" else "fused")
        ((out.lse * case["grad_lse"].to(dev, dtype)).sum()
         + (out.target_logit * case["grad_t"].to(dev, dtype)).sum()).backward()
        outs.append((out.lse, out.target_logit, out.target_score, out.saved, x.grad, w.grad, margin.grad))
    for a, b, what in zip(*outs, ("lse", "target_logit", "target_score", "saved", "grad_x", "grad_w",
                                  "grad_margin")):
        close(a, b, F32_TOL, what)


def test_margin_float64_is_cpu_only():
    case = make_case(B=4, C=8, D=8, seed=7)
    with pytest.raises(RuntimeError, match="float64"):
        call("margin_softmax_fwd", x=case["x"].double(), w=case["w"].double(), idx=None,
             target=case["target"], bias=None, s=30.0, m1=1.0, m2=0.0, m3=0.0, t=0.0, easy_margin=False,
             angle_clip=False, normalize=True, bf16=False, keep_cols=0)


# ---- range loss reference ----------------------------------------------------------------

def range_ref(x, labels, k, margin):
    """float64 RangeLoss terms: intra = sum over identities of k'/sum(1/D) over the k'
    largest pair distances; inter = hinge on the smallest squared centre distance."""
    xl = x.detach().double().cpu().requires_grad_(True)
    lab = labels.cpu()
    intra = torch.zeros((), dtype=torch.float64)
    centres = []
    for v in lab.unique(sorted=True).tolist():
        xi = xl[lab == v]
        centres.append(xi.mean(0))
        n = xi.shape[0]
        if n < 2:
            continue
        d = torch.stack([((xi[a] - xi[b]) ** 2).sum().clamp_min(1e-12).sqrt()
                         for a in range(n) for b in range(a + 1, n)])
        top = d.topk(min(k, d.numel())).values
        intra = intra + top.numel() / (1.0 / top).sum()
    inter = torch.zeros((), dtype=torch.float64)
    if len(centres) >= 2:
        c = torch.stack(centres)
        d2 = torch.stack([((c[q] - c[r]) ** 2).sum() for q in range(len(c)) for r in range(q + 1, len(c))])
        inter = (margin - d2.min()).clamp_min(0.0)
    return intra, inter, xl


RANGE_CASES = {
    # name: (labels, D, k, margin)
    "pk_batch": ([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], 16, 2, 10.0),
    "singletons_and_k_above_pairs": ([5, 9, 5, 7, 9, 9, 9, 1], 8, 5, 10.0),
    "hinge_inactive": ([0, 1, 0, 1, 2, 2], 8, 2, 0.0),
    "one_identity": ([3, 3, 3, 3, 3], 8, 3, 1.0),
    "all_singletons": ([4, 1, 3, 2], 8, 2, 50.0),
    "unsorted_many": ([int(v) for v in torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(0))],
                      32, 3, 5.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(RANGE_CASES), ids=list(RANGE_CASES))
def test_range_loss(name, dtype):
    labels, D, k, margin = RANGE_CASES[name]
    g = torch.Generator().manual_seed(len(labels) * 31 + D)
    N = len(labels)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    if name == "singletons_and_k_above_pairs":
        x[2] = x[0]  # a duplicate pair: distance clamped, k covers every pair (no tie choice)
    lab = torch.tensor(labels, dtype=torch.long)
    intra_ref, inter_ref, xl = range_ref(x, lab, k, margin)
    xd, ld = x.to(dtype).to(DEV), lab.to(DEV)
    intra, inter = call("range_loss_fwd", x=xd, labels=ld, k=k, margin=margin)
    assert intra.dim() == 0 and inter.dim() == 0 and intra.dtype == dtype
    tol = F32_TOL if dtype == torch.float32 else 1e-10
    close(intra, intra_ref, tol, "intra")
    close(inter, inter_ref, tol, "inter")
    gi, ge = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    if intra_ref.requires_grad or inter_ref.requires_grad:
        (ref_gx,) = torch.autograd.grad(gi * intra_ref + ge * inter_ref, xl, allow_unused=True)
    else:
        ref_gx = None
    if ref_gx is None:
        ref_gx = torch.zeros_like(xl)
    gx = call("range_loss_bwd", grad_intra=gi.to(dtype).to(DEV), grad_inter=ge.to(dtype).to(DEV),
              x=xd, labels=ld, k=k, margin=margin)
    assert gx.dtype == dtype and gx.shape == xd.shape
    close(gx, ref_gx, tol, "grad_x")


def test_range_loss_deterministic():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1000, 64, generator=g).to(DEV)
    lab = torch.randint(0, 100, (1000,), generator=g).to(DEV)
    a = call("range_loss_fwd", x=x, labels=lab, k=2, margin=20.0)
    b = call("range_loss_fwd", x=x, labels=lab, k=2, margin=20.0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    one = torch.ones((), device=DEV)
    ga = call("range_loss_bwd", grad_intra=one, grad_inter=one, x=x, labels=lab, k=2, margin=20.0)
    gb = call("range_loss_bwd", grad_intra=one, grad_inter=one, x=x, labels=lab, k=2, margin=20.0)
    assert torch.equal(ga, gb)


# ---- the chunked path, the self-check and kernel=auto's timing, on the GPU ----------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_self_check_passes_on_this_gpu(impl, precision):
    from dpface.ops.selfcheck import check_margin_softmax

    c = check_margin_softmax(impl, "cuda", precision)
    assert c.ok, c.line()


@pytest.mark.parametrize("name", ["arcface", "softmax_bias", "combined_m1_2"])
@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_equals_fused_on_a_large_shard(name, bf16):
    """chunked (cuBLAS + our epilogues, chunks of 1000 columns) vs the fused op on 20k
    sampled columns: the same contract, so the same values up to summation order."""
    from dpface.ops import FusedMargin, margin_softmax

    cfg = CONFIGS[name]
    case = make_case(300, 40_000, 128, K=20_000, seed=5)
    m = FusedMargin(s=cfg["s"], m1=cfg["m"][0], m2=cfg["m"][1], m3=cfg["m"][2], easy_margin=cfg["easy"],
                    normalize=cfg["normalize"])
    outs = []
    for impl in ("fused", "chunked"):
        x = case["x"].clone().requires_grad_(True)
        w = case["w"].clone().requires_grad_(True)
        out = margin_softmax(x, w, case["idx"], case["target"], m, bias=case["bias"] if cfg["bias"] else None,
                             bf16=bf16, keep_cols=5000, impl=impl)
        ((out.lse * case["grad_lse"]).sum() + (out.target_logit * case["grad_t"]).sum()).backward()
        outs.append((out.lse, out.target_logit, out.max_score, x.grad, w.grad))
    tol = BF16_TOL if bf16 else F32_TOL
    for a, b, what in zip(*outs, ("lse", "target_logit", "max_score", "grad_x", "grad_w")):
        close(a, b, tol, what)


def test_autotune_times_both_on_the_gpu():
    from dpface.heads import PartialFC
    from dpface.losses import build_loss

    head = PartialFC(512, 200_000, build_loss({"name": "arcface", "s": 64, "m": 0.5}), sample_rate=0.1).to(DEV)
    ms = head.autotune(512, DEV)
    assert set(ms) == {"fused", "chunked"} and all(v > 0 for v in ms.values())
    impl, why = head.kernel_choice("cuda")
    assert impl == min(ms, key=ms.get) and "auto: fused" in why
