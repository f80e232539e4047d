"""GPU figures, for a machine with a CUDA device (the CPU machines skip it).

1. The model-parallel head at world size 1 on one GPU: step time (forward + backward +
   SGD update) and peak GPU memory for sample rates 1.0 / 0.3 / 0.1 against the
   single-process full FC, at C = 1e6 and beyond. Measured side by side in one run.
2. End-to-end training throughput of `dpface train` on synthetic faces (iresnet50,
   ArcFace, batch 128, channels-last): bf16 autocast and fp16 with dpface's loss scaler.

    python benchmarks/bench_gpu.py --out gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpface.heads import FullFC, PartialFC  # noqa: E402
from dpface.heads.row_optim import make_head_optimizer  # noqa: E402
from dpface.losses import build_loss  # noqa: E402


def time_head(head, classes: int, batch: int, dim: int, steps: int, device: str = "cuda") -> dict:
    dev = torch.device(device)
    if getattr(head, "update", "dense") == "sampled":
        opt = make_head_optimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator(device=dev).manual_seed(0)
    emb = torch.randn(batch, dim, device=dev, generator=g, requires_grad=True)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 2):
        labels = torch.randint(0, classes, (batch,), device=dev, generator=g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = head(emb, labels, step)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(head, "clear_sampled"):
            head.clear_sampled()
        torch.cuda.synchronize()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"step_ms": 1e3 * times[len(times) // 2],
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "loss": out.loss.item()}


def bench_heads(classes_list, rates, updates, batch, dim, steps, full: bool) -> list[dict]:
    rows = []
    arc = {"name": "arcface", "s": 64.0, "m": 0.5}
    for classes in classes_list:
        variants = [("full-fc", None, None)] if full else []
        variants += [(f"partial-fc {u} r={r:g}", r, u) for u in updates for r in rates]
        for name, r, update in variants:
            torch.cuda.empty_cache()
            head = (FullFC(dim, classes, build_loss(arc)) if r is None
                    else PartialFC(dim, classes, build_loss(arc), sample_rate=r, update=update)).cuda()
            row = {"classes": classes, "head": name, **time_head(head, classes, batch, dim, steps)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del head
    return rows


def bench_train(amp: str, steps: int, batch: int, workers: int) -> dict:
    from dpface.config import load_config
    from dpface.engine.trainer import Trainer

    out = tempfile.mkdtemp()
    cfg = load_config(ROOT / "configs" / "base.yaml", [
        f"experiment.output_dir={out}", f"experiment.name=gpu-{amp}", "experiment.device=cuda",
        "model={name: iresnet50}", f"data.batch_size={batch}", f"data.num_workers={workers}",
        "data.synthetic={num_identities: 2000, max_images: 40, min_images: 10}",
        f"train.steps={steps}", f"train.amp={amp}", "train.log_every=10", "train.warmup_steps=10",
        "eval.num_identities=50", "eval.num_pairs=200", "wandb.enabled=false",
    ])
    t = Trainer(cfg)
    t0 = time.perf_counter()
    final = t.fit()
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (Path(out) / cfg.experiment.name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    # Skip the first log window (cuDNN autotuning, worker start-up).
    rate = sorted(r["img_s"] for r in train[1:])
    return {"amp": amp, "steps": steps, "batch": batch, "median_img_s": rate[len(rate) // 2],
            "final_loss": train[-1]["loss"], "skipped": sum(r["skipped"] for r in train),
            "loss_scale": train[-1].get("loss_scale"), "wall_s": wall,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "synthetic_acc": final.get("synthetic/acc")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    ap.add_argument("--updates", nargs="+", default=["dense", "sampled"], choices=["dense", "sampled"])
    ap.add_argument("--no-full", dest="full", action="store_false", help="skip the FullFC reference")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "heads": bench_heads(args.classes, args.rates, args.updates, args.batch, args.dim,
                                   args.steps, args.full)}
    if not args.skip_train:
        result["train"] = []
        for amp in ("bf16", "fp16"):
            row = bench_train(amp, args.train_steps, 128, args.workers)
            print(json.dumps(row), flush=True)
            result["train"].append(row)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
