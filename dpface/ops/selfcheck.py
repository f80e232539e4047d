"""The compiled ops checked on the device they are about to run on.

A kernel that was never run on a device kind (a new GPU generation, a CPU without some
instruction) is where a silent wrong result would come from, so before the first step the
trainer runs each compiled op it will use on a small random problem there and compares it
with the PyTorch reference (float64, on the CPU). ``dpface kernels --check`` runs the same
checks for every op and prints a line per op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dpface.ops.contract import FusedMargin

# (forward outputs, gradients), of the largest reference magnitude of each. fp32: the
# kernels' sums in another order, amplified by s = 64 (measured ≤ 2e-5 here). bf16:
# operands rounded to 8 bits, and on CPUs with bf16 GEMMs their outputs too: the
# log-sum-exp moves by ≤ s·2⁻⁹ = 0.125 at lse ≈ s (kernels/OPS.md), gradients by ~1 %
# (measured ≤ 1.2e-2). A real kernel bug is off by 1e-2 to 1.
TOL = {"fp32": (5e-4, 5e-4), "bf16": (5e-3, 5e-2)}
B, C, K, D, KEEP = 37, 300, 150, 40, 50
MARGIN = FusedMargin(s=64.0, m2=0.5)  # ArcFace


@dataclass(frozen=True)
class OpCheck:
    op: str  # e.g. "margin_softmax fused (cuda, fp32)"
    error: float  # max |got - ref| / max(1, max |ref|) over the outputs and gradients
    tol: float
    worst: str  # which output or gradient gave the error

    @property
    def ok(self) -> bool:
        return self.error <= self.tol  # NaN fails

    def line(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return f"{self.op}: {verdict} (max error {self.error:.1e} in {self.worst}, tolerance {self.tol:.0e})"


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if ref.numel() == 0:
        return 0.0
    if got.shape != ref.shape:
        return float("inf")
    scale = max(1.0, ref.abs().max().item())
    return (got - ref).abs().max().item() / scale


def _margin_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    idx = torch.randperm(C, generator=g)[:K].sort().values
    target = torch.randint(-1, K, (B,), generator=g)
    # half the samples near their target row, so the margin branch is exercised
    near = (target >= 0) & (torch.arange(B) % 2 == 0)
    rows = torch.nn.functional.normalize(w[idx[target.clamp(min=0)]], dim=1)
    x = torch.where(near[:, None], torch.nn.functional.normalize(x + 2 * rows, dim=1), x)
    cw = torch.linspace(0.2, 1.0, B, dtype=torch.float64)  # upstream gradients of lse / target logit
    return x, w, idx, target, cw


def _margin_outputs(fn, x, w, idx, target, cw, bf16: bool):
    """(forward outputs, (grad x, grad of the scored rows)) of ``fn`` (the op's signature)."""
    x = x.clone().requires_grad_(True)
    w_sink = torch.zeros((), dtype=w.dtype, device=w.device).expand(K, D).requires_grad_(True)
    out = fn(x, w, idx, target, None, w_sink, None, *MARGIN.args(), bf16, KEEP)
    loss = (out[0] * cw.to(out[0])).sum() - (out[1] * cw.flip(0).to(out[1])).sum()
    gx, grows = torch.autograd.grad(loss, [x, w_sink])
    return out, (gx, grows)


def _impl_fn(impl: str):
    if impl == "fused":
        return torch.ops.dpface.margin_softmax_fwd
    from dpface.ops.chunked import chunked_margin_softmax

    def chunked(*args):
        return chunked_margin_softmax(*args, width=64)  # several chunks even on this small problem

    return chunked


def check_margin_softmax(impl: str, device: torch.device | str, precision: str = "fp32") -> OpCheck:
    """``impl`` ("fused" / "chunked") on ``device`` in fp32 (bf16: rounded GEMM operands)
    against the float64 reference on the CPU."""
    from dpface.ops.reference import margin_softmax_reference

    device = torch.device(device)
    bf16 = precision == "bf16"
    x, w, idx, target, cw = _margin_problem()
    ref_out, ref_grads = _margin_outputs(margin_softmax_reference, x, w, idx, target, cw, bf16)
    dev = [t.to(device) for t in (x.float(), w.float(), idx, target)]
    out, grads = _margin_outputs(_impl_fn(impl), *dev, cw.to(device), bf16)
    names = ("lse", "target logit", "target score", "max score", "inv norm", "kept scores", "grad x",
             "grad rows")
    errs = [_rel_err(g, r) for g, r in zip((*out, *grads), (*ref_out, *ref_grads))]
    tols = [TOL[precision][0]] * len(out) + [TOL[precision][1]] * len(grads)
    worst = max(range(len(errs)), key=lambda i: (errs[i] != errs[i], errs[i] / tols[i]))  # NaN first
    return OpCheck(f"margin_softmax {impl} ({device.type}, {precision})", errs[worst], tols[worst],
                   names[worst])


def check_range_loss(device: torch.device | str) -> OpCheck:
    from dpface.ops.range_loss import range_loss_terms
    from dpface.ops.reference import range_loss_terms_reference

    device = torch.device(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (24,), generator=g)
    errs = []
    for fn, dev, dt in ((range_loss_terms_reference, "cpu", torch.float64), (None, device, torch.float32)):
        xx = x.to(dev, dt).requires_grad_(True)
        a, b = (fn(xx, y, 2, 4.0) if fn else range_loss_terms(xx, y.to(dev), 2, 4.0, kernel="fused"))
        (gx,) = torch.autograd.grad(0.7 * a + 1.3 * b, [xx])
        errs.append((a, b, gx))
    ref, got = errs
    err = [_rel_err(u, v) for u, v in zip(got, ref)]
    i = max(range(3), key=lambda k: (err[k] != err[k], err[k]))
    return OpCheck(f"range_loss ({device.type}, fp32)", err[i], TOL["fp32"][0], ("intra", "inter", "grad x")[i])


def check_sgd_rows() -> OpCheck:
    """The sampled-row SGD update (CPU only) against torch.optim.SGD on those rows."""

    g = torch.Generator().manual_seed(2)
    param = torch.randn(50, 8, generator=g)
    buf = torch.randn(50, 8, generator=g)
    idx = torch.randperm(50, generator=g)[:20].sort().values
    grad = torch.randn(20, 8, generator=g)
    ref = param[idx].clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt.state[ref]["momentum_buffer"] = buf[idx].clone()
    ref.grad = grad.clone()
    opt.step()
    torch.ops.dpface.sgd_rows_(param, buf, idx, grad, 0.1, 0.9, 1e-3)
    return OpCheck("sgd_rows (cpu, fp32)", _rel_err(param[idx], ref), TOL["fp32"][0], "updated rows")


def check_all(devices: list[str]) -> list[OpCheck]:
    """Every compiled op on every device in ``devices`` where it is built."""
    from dpface.ops.build import available

    out = []
    for d in devices:
        if not available(d):
            continue
        for impl in ("fused", "chunked"):
            for precision in ("fp32", "bf16"):
                out.append(check_margin_softmax(impl, d, precision))
        out.append(check_range_loss(d))
        if d == "cpu":
            out.append(check_sgd_rows())
    return out


__all__ = ["OpCheck", "check_margin_softmax", "check_range_loss", "check_sgd_rows", "check_all", "TOL"]
