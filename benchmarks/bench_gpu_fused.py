"""The head's three implementations side by side on one GPU (where a device is lent).

PartialFC at world size 1, ArcFace, sampled-rows SGD, a step = forward + backward + update,
for B in {256, 1024}, C_local in {1e6, 4e6}, r in {1, 0.1}: the PyTorch reference (fp32),
the fused op (our WMMA/SIMT GEMMs; fp32 and bf16) and the chunked path (cuBLAS GEMMs, our
epilogues; fp32 and bf16). Per row: step time (median, CUDA events), peak memory above the
parameters and optimizer state (``torch.cuda.max_memory_allocated`` − allocated before the
step), the achieved TFLOP/s of the head's three useful GEMMs (2·B·K·D each) and that as a
share of this device's measured bf16 GEMM rate (an 8192³ ``torch.mm``). Also the range-loss
op vs its reference. JSON to --out, a markdown table to --table.

    python benchmarks/bench_gpu_fused.py --out $OUT/heads.json --table $OUT/heads.md
    python benchmarks/bench_gpu_fused.py --device cpu --classes 20000 --batches 64 --steps 1   # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpface import ops  # noqa: E402
from dpface.heads import PartialFC  # noqa: E402
from dpface.heads.row_optim import SampledRowSGD  # noqa: E402
from dpface.losses import build_loss  # noqa: E402
from dpface.ops.reference import range_loss_terms_reference  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(dev, fn):
    """Seconds of fn() (CUDA events on a GPU)."""
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gemm_rate(dev, n=8192, reps=10) -> float:
    """This device's bf16 GEMM rate (TFLOP/s) on an n³ product: the yardstick."""
    if dev.type != "cuda":
        n, reps = 1024, 2
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    torch.mm(a, b)
    sync(dev)
    t = timed(dev, lambda: [torch.mm(a, b) for _ in range(reps)])
    return 2 * n ** 3 * reps / t / 1e12


def make_head(dev, classes, dim):
    torch.manual_seed(0)
    head = PartialFC(dim, classes, build_loss({"name": "arcface", "s": 64, "m": 0.5}), sample_rate=1.0,
                     update="sampled").to(dev)
    # lr 0: the update runs in full but leaves W as initialised, so every configuration
    # sees the same head (the rows are shared between configurations)
    opt = SampledRowSGD(head, lr=0.0, momentum=0.9, weight_decay=5e-4)
    opt.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)
    return head, opt


def head_step(dev, head, opt, rate, kernel, precision, batch, dim, steps):
    """One configuration on a head built once per C_local (its rows are 2-16 GB)."""
    head.sample_rate, head.kernel, head.precision = rate, kernel, precision
    classes = head.num_classes
    g = torch.Generator(device=dev).manual_seed(0)
    times, peaks = [], []
    out = None
    for step in range(steps + 2):
        x = torch.nn.functional.normalize(torch.randn(batch, dim, device=dev, generator=g))
        x.requires_grad_(True)
        y = torch.randint(0, classes, (batch,), device=dev, generator=g)
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()

        def run(x=x, y=y, step=step):
            nonlocal out
            out = head(x, y, step)
            out.loss.backward()
            opt.step()
            opt.zero_grad()

        t = timed(dev, run)
        if step >= 2:
            times.append(t)
            if dev.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated() - base)
    t = statistics.median(times)
    flops = 3 * 2 * batch * out.num_sampled * dim
    return {"batch": batch, "classes": classes, "rate": rate, "kernel": kernel, "precision": precision,
            "step_ms": 1e3 * t, "tflops": flops / t / 1e12,
            "temp_gib": max(peaks) / 2**30 if peaks else None, "loss": out.loss.item(),
            "why": head.kernel_choice(dev.type)[1]}


def range_bench(dev, n=1024, d=512, ids=256, steps=5):
    x = torch.randn(n, d, device=dev, requires_grad=True)
    y = torch.randint(0, ids, (n,), device=dev)
    res = {}
    for name, fn in (("fused", lambda: ops.range_loss_terms(x, y, 2, 1.0, kernel="fused")),
                     ("reference", lambda: range_loss_terms_reference(x, y, 2, 1.0))):
        times = []
        for i in range(steps + 1):
            sync(dev)
            t0 = time.perf_counter()
            a, b = fn()
            (a + b).backward()
            sync(dev)
            if i:
                times.append(time.perf_counter() - t0)
        res[name] = 1e3 * statistics.median(times)
    return {"range_n": n, "range_ms": res}


KERNELS = (("reference", "fp32"), ("fused", "fp32"), ("fused", "bf16"), ("chunked", "fp32"), ("chunked", "bf16"))


def table(rows, peak) -> str:
    out = [f"bf16 GEMM rate of this device (8192³ torch.mm): {peak:.0f} TFLOP/s", "",
           "| B | C_local | r | head | GEMMs | step (ms) | TFLOP/s | of bf16 peak | peak temp (GiB) |",
           "|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "step_ms" not in r:
            out.append(f"| {r['batch']} | {r['classes']:,} | {r['rate']} | {r['kernel']} | {r['precision']} | "
                       f"failed: {r.get('error', '?')[:80]} | | | |")
            continue
        temp = f"{r['temp_gib']:.2f}" if r["temp_gib"] is not None else "–"
        out.append(f"| {r['batch']} | {r['classes']:,} | {r['rate']} | {r['kernel']} | {r['precision']} | "
                   f"{r['step_ms']:.2f} | {r['tflops']:.1f} | {100 * r['tflops'] / peak:.0f} % | {temp} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    peak = gemm_rate(dev)
    meta = {"kernels": ops.report(), "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "bf16_gemm_tflops": peak}
    print(json.dumps(meta), flush=True)
    rows = []
    for c in args.classes:
        try:
            head, opt = make_head(dev, c, args.dim)
        except Exception as e:  # out of memory: record and go on
            rows.append({"batch": 0, "classes": c, "rate": 0, "kernel": "all", "precision": "-",
                         "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        for b in args.batches:
            for r in args.rates:
                for kernel, precision in KERNELS:
                    try:
                        row = head_step(dev, head, opt, r, kernel, precision, b, args.dim, args.steps)
                    except Exception as e:  # record and go on (e.g. out of memory)
                        row = {"batch": b, "classes": c, "rate": r, "kernel": kernel, "precision": precision,
                               "error": f"{type(e).__name__}: {e}"[:300]}
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    save(args, meta, rows, None, peak)  # what is done survives a timeout
        del head, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    try:
        rng = range_bench(dev)
    except Exception as e:
        rng = {"range_error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(rng), flush=True)
    print(table(rows, peak))
    save(args, meta, rows, rng, peak)


def save(args, meta, rows, rng, peak):
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "range": rng}, indent=1))
    if args.table:
        args.table.write_text(table(rows, peak))


if __name__ == "__main__":
    main()
