"""Fused margin-softmax op vs the PyTorch reference head: step time and step temporaries.

One PartialFC shard per fresh process (1 thread, world 1), ArcFace, sampled-rows SGD
(momentum 0.9, weight decay 5e-4; at r = 1 it is the dense update): a step is forward +
backward + update on random unit embeddings. Configurations run side by side in one
invocation, so ratios compare like with like on a shared machine.

Memory (Linux VmHWM, reset before each step; W and the momentum buffer are written
beforehand, so their pages are resident): "head temporaries" = peak RSS over forward +
backward − RSS before the step − the [K, D] row gradient (which both heads produce for the
optimizer): the logits, workspaces and kept tiles; "step peak" = the same over the whole
step, row gradient and optimizer temporaries included.

"reference (c68a0ae)" is the reference head with the row update of that commit (three
indexed torch ops) — the step as it was before the kernels; "reference" uses the compiled
row update, like the fused head, so the two isolate the margin-softmax op.

    python benchmarks/bench_fused_head.py                         # the RESULTS.md table
    python benchmarks/bench_fused_head.py --classes 50000 --rates 0.1 --no-write
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Fused margin-softmax head (benchmarks/bench_fused_head.py)"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Linux: restart the peak-RSS count (VmHWM) from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(cfg: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from dpface.heads import PartialFC
    from dpface.heads.row_optim import SampledRowSGD
    from dpface.losses import build_loss

    torch.set_num_threads(1)
    b, d = cfg["batch"], cfg["dim"]
    g = torch.Generator().manual_seed(0)

    def make(classes, kernel, budget):
        head = PartialFC(d, classes, build_loss({"name": "arcface", "s": 64, "m": 0.5}),
                         sample_rate=cfg["rate"], update="sampled", kernel=kernel,
                         precision=cfg["precision"], logits_budget_mb=budget)
        opt = SampledRowSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
        opt.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight).zero_()
        return head, opt

    def steps(head, opt, n, times=None, temps=None):
        for step in range(n):
            x = torch.nn.functional.normalize(torch.randn(b, d, generator=g)).requires_grad_()
            y = torch.randint(0, head.num_classes, (b,), generator=g)
            rss0 = rss_bytes()
            reset_peak()
            t0 = time.perf_counter()
            out = head(x, y, step)
            out.loss.backward()
            head_peak = peak_bytes() - rss0
            opt.step()
            opt.zero_grad()
            if times is not None:
                times.append(time.perf_counter() - t0)
                # beyond the [K, D] row gradient, which both heads hand to the optimizer
                temps.append((head_peak - out.num_sampled * d * 4, peak_bytes() - rss0))
        return out

    steps(*make(2048, cfg["kernel"], cfg["budget"]), 2)  # library pages and pools resident
    if cfg["old_row_update"]:  # the row update as of c68a0ae: three indexed torch ops
        from dpface.heads import row_optim
        from dpface.ops.row_sgd import sgd_rows_reference

        row_optim.sgd_rows_ = sgd_rows_reference
    head, opt = make(cfg["classes"], cfg["kernel"], cfg["budget"])
    times, temps = [], []
    out = steps(head, opt, cfg["warmup"] + cfg["steps"], times, temps)
    while sum(times[cfg["warmup"]:]) < cfg["min_time"]:  # short steps: more of them
        out = steps(head, opt, 1, times, temps)
    return {"step_s": statistics.median(times[cfg["warmup"]:]),
            "temp_mib": max(t[0] for t in temps[cfg["warmup"]:]) / 2**20,
            "step_peak_mib": max(t[1] for t in temps[cfg["warmup"]:]) / 2**20,
            "rows": out.num_sampled, "loss": out.loss.item(),
            "why": head.kernel_choice("cpu")[1]}


# glibc keeps freed heap blocks and raises its mmap threshold after the first large free, so
# RSS misses reused memory; with a fixed threshold every tensor above it is its own mapping,
# returned on free, and the peak RSS follows the live bytes. Page faults then slow the step,
# so time and memory come from separate runs.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


def run_one(cfg: dict, timeout: float) -> dict:
    out = {}
    for env, part in (({}, "time"), (MEMORY_ENV, "memory")):
        c = dict(cfg, steps=1, min_time=0) if part == "memory" else cfg
        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(c)],
                           capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **env})
        if r.returncode != 0:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if part == "time":
            out = res
        else:
            out["temp_mib"], out["step_peak_mib"] = res["temp_mib"], res["step_peak_mib"]
    return out


def configs(budgets):
    """The heads compared at one (C_local, r): references, the fused op per budget, bf16."""
    yield {"kernel": "reference", "precision": "fp32", "budget": 0, "old_row_update": True}
    yield {"kernel": "reference", "precision": "fp32", "budget": 0}
    for budget in budgets:
        yield {"kernel": "fused", "precision": "fp32", "budget": budget}
    yield {"kernel": "fused", "precision": "bf16", "budget": budgets[-1]}
    yield {"kernel": "chunked", "precision": "fp32", "budget": budgets[-1]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--classes", type=int, nargs="+", default=[50_000, 500_000])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 128],
                    help="fused op logits budgets (MiB) to run")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=5.0,
                    help="keep stepping until the measured steps add up to this many seconds")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--range-n", type=int, nargs="*", default=[256, 1024],
                    help="range-loss batch sizes (P x 4 images) to time, op vs reference")
    ap.add_argument("--no-write", dest="write", action="store_false")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    for classes in args.classes:
        for rate in args.rates:
            for c in configs(args.budgets):
                cfg = {"old_row_update": False, **c, "classes": classes, "rate": rate, "batch": args.batch,
                       "dim": args.dim, "steps": args.steps, "warmup": args.warmup,
                       "min_time": args.min_time}
                row = {**cfg, **run_one(cfg, args.timeout)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    ranges = [range_row(n) for n in args.range_n]
    text = to_markdown(rows, args) + range_markdown(ranges)
    print(text)
    if args.write:
        write_section(args.out, text)


def range_row(n: int, d: int = 512, steps: int = 3) -> dict:
    """Range loss forward + backward on a P×K batch (K = 4), compiled op vs reference."""
    import torch

    sys.path.insert(0, str(ROOT))
    from dpface import ops
    from dpface.ops.reference import range_loss_terms_reference

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    y = torch.arange(n) // 4
    out = {"n": n}
    for name, fn in (("op", lambda: ops.range_loss_terms(x, y, 2, 1.0, kernel="fused")),
                     ("reference", lambda: range_loss_terms_reference(x, y, 2, 1.0))):
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            a, b = fn()
            (a + b).backward()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def range_markdown(rows) -> str:
    if not rows:
        return ""
    out = ["", "Range loss (k = 2, D = 512, P identities × 4 images, forward + backward, 1 thread):",
           "", "| batch | compiled op (ms) | reference (ms) | op / reference |", "|---:|---:|---:|---:|"]
    out += [f"| {r['n']} | {1e3 * r['op']:.1f} | {1e3 * r['reference']:.1f} | "
            f"{r['op'] / r['reference']:.3f} |" for r in rows]
    return "\n".join(out) + "\n"


def to_markdown(rows, args) -> str:
    ref = {(r["classes"], r["rate"]): r for r in rows
           if r["kernel"] == "reference" and not r["old_row_update"] and "error" not in r}
    out = [SECTION, "",
           f"{datetime.date.today()} · {platform.machine()} {platform.processor() or ''}, "
           f"{os.cpu_count()} cores shared with other jobs (load {os.getloadavg()[0]:.1f} at the end), "
           f"1 thread per process · B = {args.batch}, D = {args.dim}, ArcFace s = 64 m = 0.5, "
           f"sampled-rows SGD · median of ≥ {args.steps} steps (≥ {args.min_time:g} s) after "
           f"{args.warmup} warm-up · "
           f"`python benchmarks/bench_fused_head.py`", "",
           "| C_local | r | head | GEMM operands | logits budget | step (s) | × reference | "
           "head temporaries (MiB) | × reference | step peak (MiB) |",
           "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = {"fused": "fused op", "chunked": "chunked (ATen GEMMs)"}.get(r["kernel"]) or (
            "reference (c68a0ae)" if r["old_row_update"] else "reference")
        budget = "–" if r["kernel"] == "reference" else f"{r['budget']} MiB"
        if "error" in r:
            out.append(f"| {r['classes']:,} | {r['rate']} | {head} | {r['precision']} | {budget} "
                       f"| failed: {r['error']} | | | | |")
            continue
        base = ref.get((r["classes"], r["rate"]))
        ts = f"{r['step_s'] / base['step_s']:.2f}" if base else "–"
        tm = f"{r['temp_mib'] / base['temp_mib']:.2f}" if base and base["temp_mib"] > 0 else "–"
        out.append(f"| {r['classes']:,} | {r['rate']} | {head} | {r['precision']} | {budget} | "
                   f"{r['step_s']:.3f} | {ts} | {r['temp_mib']:,.0f} | {tm} | "
                   f"{r['step_peak_mib']:,.0f} |")
    return "\n".join(out) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it), keeping the rest."""
    old = path.read_text() if path.exists() else "# dpface benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
