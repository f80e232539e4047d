"""Activation checkpointing on CPU: peak memory and step time with and without it, and ViT vs
iresnet training / inference throughput at the CPU demo's size.

    python benchmarks/bench_checkpointing.py memory      [--models iresnet50,vit_s] [--batch 32]
    python benchmarks/bench_checkpointing.py throughput  [--models iresnet_tiny,vit_tiny_cpu,...]

Every configuration runs in a fresh subprocess, so one's allocations cannot raise another's
high-water mark. Memory is the process's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``)
after one training forward + backward of the backbone alone (B images 112x112, embedding 512,
a fixed random projection of the output as the loss); reported beside it is the resident set
just before that step, after the model, its (pre-allocated) gradients and the batch exist, so
peak − before is what the step itself needs: activations kept for backward plus workspace.
Step time: the median of ``--steps`` further steps (forward + backward, no optimizer), wall
clock and process CPU time (the latter less disturbed by other load on a shared machine).
Throughput: images/s of a training step (forward + backward) and of an eval forward, at the
demo's batch (32), embedding (128) and image size (112), median of ``--steps``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = (("none", 2), ("blocks", 2), ("every_n", 2))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(HERE))
    from dpface.models import build_backbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = {"name": args.model}
    if args.mode != "none":
        spec.update(checkpoint=args.mode, checkpoint_every=args.every)
    model = build_backbone(spec, embedding_size=args.embedding).train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1
    proj = torch.randn(args.batch, args.embedding, generator=g)
    for p in model.parameters():  # allocated now, so the step's peak is the step's own memory
        p.grad = torch.zeros_like(p)

    def train_step():
        (model(x) * proj).sum().backward()

    out = {"model": args.model, "mode": args.mode, "every": args.every, "batch": args.batch,
           "threads": args.threads, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    before, peak_before = rss_mb(), peak_mb()
    t0 = time.perf_counter()
    train_step()
    out.update(first_step_s=time.perf_counter() - t0, rss_before_mb=before, peak_before_mb=peak_before,
               peak_mb=peak_mb())
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out["step_s"], out["step_cpu_s"] = times, cpu
    if args.eval:
        model.eval()
        ev = []
        with torch.no_grad():
            model(x)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                model(x)
                ev.append(time.perf_counter() - t0)
        out["eval_s"] = ev
    return out


def run(model, mode, every, args, embedding, evaluate=False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_child", "--model", model, "--mode", mode,
           "--every", str(every), "--batch", str(args.batch), "--steps", str(args.steps),
           "--threads", str(args.threads), "--embedding", str(embedding), "--size", str(args.size)]
    if evaluate:
        cmd.append("--eval")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{model} {mode}: child failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory(args) -> None:
    print(f"batch {args.batch}, {args.size}x{args.size}, embedding 512, {args.threads} threads; "
          "RSS in MiB (ru_maxrss); step = forward + backward, median of "
          f"{args.steps} (min-max)")
    print(f"{'model':<10} {'mode':<10} {'params':>7} {'before':>7} {'peak':>7} {'peak-before':>12} "
          f"{'saved':>6} {'step s':>16} {'ratio':>6} {'cpu s':>7} {'ratio':>6}")
    for model in args.models.split(","):
        base = None
        for mode, every in MODES:
            r = run(model, mode, every, args, 512)
            need = r["peak_mb"] - r["rss_before_mb"]
            med, cpu = statistics.median(r["step_s"]), statistics.median(r["step_cpu_s"])
            if base is None:
                base = (need, med, cpu)
            label = mode if mode != "every_n" else f"every_{every}"
            print(f"{model:<10} {label:<10} {r['params_M']:6.1f}M {r['rss_before_mb']:7.0f} {r['peak_mb']:7.0f} "
                  f"{need:12.0f} {1 - need / base[0]:6.0%} {med:7.2f} ({min(r['step_s']):.2f}-"
                  f"{max(r['step_s']):.2f}) {med / base[1]:6.2f} {cpu:7.2f} {cpu / base[2]:6.2f}", flush=True)


def throughput(args) -> None:
    print(f"batch {args.batch}, {args.size}x{args.size}, embedding 128 (the CPU demo), {args.threads} threads; "
          f"img/s from the median of {args.steps} steps (min-max)")
    print(f"{'model':<14} {'params':>7} {'train img/s':>22} {'eval img/s':>22} {'train img/CPU-s':>16}")
    for model in args.models.split(","):
        r = run(model, "none", 2, args, 128, evaluate=True)
        tr = [args.batch / t for t in r["step_s"]]
        ev = [args.batch / t for t in r["eval_s"]]
        print(f"{model:<14} {r['params_M']:6.2f}M {statistics.median(tr):9.1f} ({min(tr):.1f}-{max(tr):.1f}) "
              f"{statistics.median(ev):9.1f} ({min(ev):.1f}-{max(ev):.1f}) "
              f"{args.batch / statistics.median(r['step_cpu_s']):16.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["memory", "throughput", "_child"])
    ap.add_argument("--models", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=112)
    # _child only
    ap.add_argument("--model")
    ap.add_argument("--mode", default="none")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--embedding", type=int, default=512)
    ap.add_argument("--eval", action="store_true")
    args = ap.parse_args()
    if args.what == "_child":
        print(json.dumps(child(args)))
    elif args.what == "memory":
        args.models = args.models or "iresnet50,vit_s"
        memory(args)
    else:
        args.models = args.models or "iresnet_tiny,vit_tiny_cpu,mobilefacenet,vit_t,iresnet50,vit_s"
        throughput(args)


if __name__ == "__main__":
    main()
