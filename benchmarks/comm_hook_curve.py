"""The demo's loss curve on 2 gloo ranks with the backbone's gradient all-reduce
uncompressed, and compressed to bf16 and fp16 (``train.comm_hook``), side by side.

    python benchmarks/comm_hook_curve.py --steps 100 --out /tmp/comm_hook

Each run: ``torchrun --nproc-per-node 2 -m dpface train configs/cpu_demo.yaml`` with the
same seed, so the runs differ only in the rounding of the averaged gradients. Prints the
logged loss at every ``log_every`` step and the final verification accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(hook: str, args) -> dict:
    name = f"hook_{hook}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29600 + hash(hook) % 200), "-m", "dpface", "train", "--config", str(REPO / "configs" / "cpu_demo.yaml"),
           f"experiment.output_dir={args.out}", f"experiment.name={name}", f"train.steps={args.steps}",
           f"train.comm_hook={hook}", "train.ckpt_every=0", "data.batch_size=16", "data.num_workers=0",
           "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["loss"]) for r in rows if r.get("kind", "train") == "train" and "loss" in r]
    final = json.loads((Path(args.out) / name / "final_metrics.json").read_text())
    return {"hook": hook, "curve": curve, "acc": final.get("synthetic/acc"), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="/tmp/comm_hook")
    args = p.parse_args()
    results = [run(h, args) for h in ("none", "bf16", "fp16")]
    steps = [s for s, _ in results[0]["curve"]]
    print("| step | " + " | ".join(f"loss ({r['hook']})" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for i, s in enumerate(steps):
        print(f"| {s} | " + " | ".join(f"{r['curve'][i][1]:.4f}" for r in results) + " |")
    print("| final acc | " + " | ".join(f"{r['acc']:.4f}" for r in results) + " |")
    print("| wall (s) | " + " | ".join(f"{r['wall_s']:.0f}" for r in results) + " |")
    Path(args.out, "comm_hook.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
