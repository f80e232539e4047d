"""Fused margin-softmax head vs the reference on one GPU (where a device is lent).

Side by side in one run: PartialFC at world size 1, ArcFace, sampled-rows SGD, a step =
forward + backward + update; fp32 and bf16 GEMM operands; step time (median, CUDA-
synchronised), peak memory above the parameters and optimizer state
(``torch.cuda.max_memory_allocated`` − the allocated bytes before the step) and the
achieved TFLOP/s of the head's three GEMMs (2·B·K·D each; the fused op's recompute GEMM is
not counted as useful work). Also the range-loss op vs its reference.

    python benchmarks/bench_gpu_fused.py --out $OUT/fused_gpu.json
    python benchmarks/bench_gpu_fused.py --device cpu --classes 20000 --steps 1   # smoke run
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


def head_step(dev, classes, rate, kernel, precision, batch, dim, steps):
    torch.manual_seed(0)
    head = PartialFC(dim, classes, build_loss({"name": "arcface", "s": 64, "m": 0.5}),
                     sample_rate=rate, update="sampled", kernel=kernel,
                     precision=precision).to(dev)
    opt = SampledRowSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)
    g = torch.Generator(device=dev).manual_seed(0)
    times, peaks = [], []
    for step in range(steps + 2):
        x = torch.nn.functional.normalize(torch.randn(batch, dim, device=dev, generator=g))
        x.requires_grad_(True)
        y = torch.randint(0, classes, (batch,), device=dev, generator=g)
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = head(x, y, step)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        sync(dev)
        if step >= 2:
            times.append(time.perf_counter() - t0)
            if dev.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated() - base)
    t = statistics.median(times)
    flops = 3 * 2 * batch * out.num_sampled * dim
    return {"classes": classes, "rate": rate, "kernel": kernel, "precision": precision,
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--classes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rows = [{"kernels": ops.report(), "device": torch.cuda.get_device_name() if dev.type == "cuda"
             else "cpu", "torch": torch.__version__}]
    for c in args.classes:
        for r in args.rates:
            for kernel, precision in (("reference", "fp32"), ("fused", "fp32"), ("fused", "bf16")):
                try:
                    row = head_step(dev, c, r, kernel, precision, args.batch, args.dim, args.steps)
                except Exception as e:  # record and go on (e.g. out of memory)
                    row = {"classes": c, "rate": r, "kernel": kernel, "precision": precision,
                           "error": f"{type(e).__name__}: {e}"[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    try:
        rows.append(range_bench(dev))
    except Exception as e:
        rows.append({"range_error": f"{type(e).__name__}: {e}"[:300]})
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
