"""Partial-FC head vs a single-process full FC: step time and peak memory per rank.

Each configuration runs in fresh processes (so the peak RSS belongs to it alone): the
Partial-FC head on ``--world`` gloo ranks (one thread each) for every sample rate,
and FullFC in one process with ``--world`` threads (the same cores). A step is
forward + backward + SGD(momentum 0.9, weight decay 5e-4) update on random unit
embeddings (a leaf tensor stands in for the backbone output), ArcFace logits.

Memory is measured two ways, per rank:
- peak RSS delta: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end minus the
  resident size just before the head is built (so torch/gloo start-up is excluded;
  allocator slack and gloo buffers are included);
- tensor bytes: parameters + gradients + optimizer state, counted exactly, and the
  ``dpface.heads.plan`` estimate, which adds the step's activations.

    python benchmarks/bench_partial_fc.py                       # C = 1e5 and 1e6
    python benchmarks/bench_partial_fc.py --classes 20000 --steps 2 --no-write
    python benchmarks/bench_partial_fc.py --updates dense sampled --rates 1.0 0.1 --no-full

``--updates sampled`` runs ``PartialFC(update="sampled")`` with ``SampledRowSGD`` (only
the sampled rows get a gradient and an update; see ``dpface.heads.row_optim``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpface.heads import FullFC, PartialFC, plan  # noqa: E402
from dpface.heads.row_optim import SampledRowSGD  # noqa: E402
from dpface.losses import build_loss  # noqa: E402

SECTION = "## Partial-FC head (benchmarks/bench_partial_fc.py)"


# glibc returns large freed blocks to the kernel, so every step's fresh [C_local, D]
# gradient and optimizer temporaries are page-faulted (and zeroed) again; "cached"
# keeps them in the heap, as jemalloc/tcmalloc or the CUDA caching allocator would.
ALLOCATORS = {
    "system": ("glibc malloc, defaults", {}),
    "cached": ("glibc malloc keeping freed memory (MALLOC_MMAP_THRESHOLD_=16G, "
               "MALLOC_TRIM_THRESHOLD_=64G, MALLOC_TOP_PAD_=1G)",
               {"MALLOC_MMAP_THRESHOLD_": str(16 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
                "MALLOC_TOP_PAD_": str(1 << 30)}),
}


TARGETS = ("Targets (2 ranks): per-rank memory ≤ 0.55 × FullFC; "
           "step at r = 0.1 ≤ 0.2 × r = 1.0.")
READING = (
    "Reading: at r < 1 the matmuls and the logits shrink with r, but a step still touches the "
    "whole shard — the dense [C_local, D] gradient is zero-filled and the optimizer updates "
    "every row (momentum, weight decay) — memory-bound work that does not shrink with r and, "
    "at 1 GiB per array per rank for C = 10⁶ on one CPU core, costs seconds; it caps the "
    "speed-up here. A GPU shows the same shape: on one H200 (world 1, C = 10⁶, an ad-hoc check "
    "outside this script) r = 0.1 took 0.36× the r = 1.0 step and the SGD update was ~60 % of "
    "its GPU time. The peak RSS is the same for every r at C = 10⁶ because it is reached in the "
    "SGD step (W + grad + momentum + SGD's weight-decay temporary), not in the logits.")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(head, opt, grad_rows=None) -> int:
    n = 0
    for p in head.parameters():
        n += p.numel() * p.element_size()
        # its gradient: dense, allocated every step, or (update="sampled") grad_rows rows
        rows = p.shape[0] if grad_rows is None else grad_rows
        n += p[:rows].numel() * p.element_size()
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                n += v.numel() * v.element_size()
    return n


def worker(rank: int, world: int, cfg: dict, tmp: str) -> None:
    torch.set_num_threads(cfg["threads"])
    if cfg["kind"] == "partial" and world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                                 world_size=world,
                                 timeout=datetime.timedelta(seconds=cfg["timeout"]))
    sync = tdist.barrier if tdist.is_initialized() else (lambda: None)
    classes, dim, b_global = cfg["classes"], cfg["dim"], cfg["global_batch"]
    transform = build_loss({"name": "arcface", "s": 64, "m": 0.5})
    b_local = b_global // world if cfg["kind"] == "partial" else b_global

    def make(num_classes):
        if cfg["kind"] == "partial":
            head = PartialFC(dim, num_classes, transform, sample_rate=cfg["rate"], seed=0,
                             update=cfg["update"])
            if cfg["update"] == "sampled":
                return head, SampledRowSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
        else:
            head = FullFC(dim, num_classes, transform, seed=0)
        return head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def train(head, opt, steps, gen, times=None, sampled=None):
        for step in range(steps):
            x = torch.nn.functional.normalize(torch.randn(b_local, dim, generator=gen))
            x.requires_grad_(True)
            y = torch.randint(0, head.num_classes, (b_local,), generator=gen)
            sync()
            t0 = time.perf_counter()
            out = head(x, y, step)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if times is not None and step >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
                sampled.append(out.num_sampled)
        return out.loss.item()

    g = torch.Generator().manual_seed(1000 + rank)
    # A tiny head first, so library code pages and thread pools are resident before the
    # baseline is taken: the RSS delta is then the head's own memory.
    train(*make(64 * world), 2, g)
    rss0 = rss_bytes()
    head, opt = make(classes)
    times, sampled = [], []
    loss = train(head, opt, cfg["warmup"] + cfg["steps"], g, times, sampled)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    result = {"rank": rank, "times": times, "num_sampled": sampled, "peak_rss_delta": peak,
              "tensor_bytes": tensor_bytes(head, opt, max(sampled) if cfg["update"] == "sampled"
                                           else None), "loss": loss}
    with open(Path(tmp) / f"rank{rank}.json", "w") as f:
        json.dump(result, f)
    if tdist.is_initialized():
        tdist.destroy_process_group()


def launch(cfg: dict, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(worker, args=(world, cfg, tmp), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + cfg["timeout"]
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{cfg} did not finish in {cfg['timeout']} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def run(args) -> list[dict]:
    rows = []
    base = {"dim": args.dim, "global_batch": args.global_batch, "steps": args.steps,
            "warmup": args.warmup, "timeout": args.timeout}
    for classes in args.classes:
        configs = [{"kind": "partial", "rate": r, "threads": 1, "update": u}
                   for u in args.updates for r in args.rates]
        if args.full:
            configs.append({"kind": "full", "rate": 1.0, "threads": args.world,
                            "update": "dense"})
        for c in configs:
            cfg = {**base, **c, "classes": classes}
            world = args.world if c["kind"] == "partial" else 1
            t0 = time.monotonic()
            est = plan(classes, args.dim, world, args.global_batch // world, c["rate"])
            row = {"classes": classes, "rate": c["rate"], "ranks": world,
                   "head": "PartialFC" if c["kind"] == "partial" else "FullFC",
                   "threads": c["threads"], "update": c["update"], "plan_mib": est["memory_total"] / 2**20}
            try:
                res = launch(cfg, world)
            except Exception as e:  # e.g. a rank killed for memory: record it, go on
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row.update({
                # a step ends at a barrier, so every rank sees the same time: take rank 0
                "step_s": statistics.median(res[0]["times"]),
                "num_sampled": max(max(r["num_sampled"]) for r in res),
                "peak_rss_mib": max(r["peak_rss_delta"] for r in res) / 2**20,
                "tensor_mib": max(r["tensor_bytes"] for r in res) / 2**20,
                "loss": res[0]["loss"], "wall_s": time.monotonic() - t0,
            })
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def to_markdown(rows: list[dict], args) -> str:
    title = (f"### Further run: {ALLOCATORS[args.allocator][0]}; update "
             f"{' / '.join(args.updates)}" if args.append else SECTION)
    out = [title, "",
           f"{datetime.date.today()} · {platform.machine()}, {os.cpu_count()} CPU cores shared "
           f"with other jobs (load average {os.getloadavg()[0]:.1f} at the end) · torch "
           f"{torch.__version__} · D = {args.dim}, global batch {args.global_batch}, ArcFace, "
           f"SGD(momentum 0.9, wd 5e-4) · median of {args.steps} steps after {args.warmup} "
           f"warm-up · PartialFC: {args.world} gloo ranks x 1 thread"
           + (f"; FullFC: 1 process x {args.world} threads" if args.full else "")
           + f" · allocator: {ALLOCATORS[args.allocator][0]}.",
           "",
           "Peak RSS delta = ru_maxrss at the end − RSS before building the head, worst rank. "
           "Tensor bytes = params + grads + optimizer state (exact). plan = `dpface.heads.plan` "
           "estimate incl. activations.",
           "",
           "| classes | head | update | rate | ranks | step (s) | rows scored/rank | peak RSS Δ/rank (MiB) "
           "| params+grad+state/rank (MiB) | plan (MiB) |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['classes']:,} | {r['head']} | {r['update']} | {r['rate']} | "
                       f"{r['ranks']} | failed: {r['error']} | | | | {r['plan_mib']:,.0f} |")
            continue
        out.append(f"| {r['classes']:,} | {r['head']} | {r['update']} | {r['rate']} | "
                   f"{r['ranks']} | {r['step_s']:.3f} | {r['num_sampled']:,} | {r['peak_rss_mib']:,.0f} | "
                   f"{r['tensor_mib']:,.0f} | {r['plan_mib']:,.0f} |")
    if not args.append:
        out += ["", READING]
    out += ["", TARGETS]
    for c in sorted({r["classes"] for r in rows}):
        sel = {(r["head"], r["update"], r["rate"]): r for r in rows
               if r["classes"] == c and "error" not in r}
        p1 = sel.get(("PartialFC", "dense", 1.0))
        full = sel.get(("FullFC", "dense", 1.0))
        parts = []
        if p1 and full:
            parts.append(f"memory r=1 / FullFC: peak RSS "
                         f"{p1['peak_rss_mib'] / full['peak_rss_mib']:.2f}, "
                         f"tensors {p1['tensor_mib'] / full['tensor_mib']:.2f}")
        for u in args.updates:
            a, b = sel.get(("PartialFC", u, 1.0)), sel.get(("PartialFC", u, 0.1))
            if a and b:
                parts.append(f"step r=0.1 / r=1.0 ({u}): {b['step_s'] / a['step_s']:.2f}")
        if p1 and full:
            parts.append(f"step r=1 / FullFC: {p1['step_s'] / full['step_s']:.2f}")
        if parts:
            out.append(f"- C = {c:,}: " + "; ".join(parts))
    return "\n".join(out) + "\n"


def write_section(path: Path, text: str, append: bool = False) -> None:
    """Replace this benchmark's section of RESULTS.md (or add it), keeping the rest; with
    ``append``, add ``text`` at the end of the section instead (a further run)."""
    old = path.read_text() if path.exists() else "# dpface benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        if append:
            raise SystemExit(f"--append: {path} has no '{SECTION}' section to add to")
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        end = len(old) if end < 0 else end + 1
        rest = "\n" + old[end:] if end < len(old) else ""
        if append:
            new = old[:end].rstrip("\n") + "\n\n" + text + rest
        else:
            new = old[:start] + text + rest
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    ap.add_argument("--updates", nargs="+", choices=["dense", "sampled"], default=["dense"],
                    help="PartialFC update modes to run (sampled: SampledRowSGD)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-full", dest="full", action="store_false", help="skip FullFC")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    ap.add_argument("--allocator", choices=sorted(ALLOCATORS), default="system")
    ap.add_argument("--no-write", dest="write", action="store_false")
    ap.add_argument("--append", action="store_true",
                    help="add this run to the end of the section instead of replacing it")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    if args.global_batch % args.world:
        ap.error(f"--global-batch {args.global_batch} must divide by --world {args.world}")
    os.environ.update(ALLOCATORS[args.allocator][1])  # read by the spawned workers' libc
    rows = run(args)
    text = to_markdown(rows, args)
    print(text)
    if args.write:
        write_section(args.out, text, append=args.append)


if __name__ == "__main__":
    main()
