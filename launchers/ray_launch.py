#!/usr/bin/env python
"""Run `dpface train` as a Ray Train job, on a running Ray cluster or a local Ray.

    python launchers/ray_launch.py --address auto --num-workers 16 --gpus-per-worker 1 \\
        --max-failures 3 --config configs/ms1mv3_r100_pfc01_bf16.yaml train.lr=0.2
    python launchers/ray_launch.py --num-workers 2 --config configs/cpu_demo.yaml   # local, CPU

The config file and its dotted overrides are the job's only input; every Ray worker
builds the same Trainer a torchrun rank builds. `--address` connects to a cluster
(`auto`: the one this node belongs to; `ray://head:10001`: Ray Client); without it a
local Ray is started. The run directory (experiment.output_dir) should be on storage
every node sees; Ray also keeps copies of the checkpoints under --storage-path.
Environment variables named DPFACE_*, WANDB_*, NCCL_*, TORCH_NCCL_* are forwarded to
the workers.
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_launch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe, e.g. configs/cpu_demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.05")
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto', 'ray://host:10001'); default: start a local Ray")
    p.add_argument("--num-workers", type=int, required=True, help="training processes (ranks)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="0: CPU workers (gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--max-failures", type=int, default=0,
                   help="restarts of the worker group after a worker dies (each resumes from "
                        "the latest complete checkpoint); -1: unlimited")
    p.add_argument("--storage-path", default=None,
                   help="where Ray keeps run state and checkpoint copies (default: <run dir>/ray; "
                        "multi-node: shared storage or s3://…)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (default: the latest complete checkpoint of this run, if any) or a "
                        "checkpoint directory to start from when the run has none yet")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (no --address)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ray.train import TrainingFailedError

    from dpface.config import ConfigError
    from dpface.engine.checkpoint import CheckpointError
    from dpface.engine.ray_train import launch

    try:
        result, run_dir = launch(args.config, args.overrides, address=args.address, num_cpus=args.num_cpus,
                        num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                        cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                        storage_path=args.storage_path, resume=args.resume)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"ray_launch.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingFailedError as e:  # the workers failed more often than --max-failures allows
        print(f"ray_launch.py: training failed: {e}", file=sys.stderr)
        return 1
    if result.error is not None:
        print(f"ray_launch.py: training failed: {result.error}", file=sys.stderr)
        return 1
    final = run_dir / "final_metrics.json"
    print(json.dumps({"run_dir": str(run_dir),
                      "ray_checkpoint": result.checkpoint.path if result.checkpoint else None,
                      "final_metrics": json.loads(final.read_text()) if final.is_file() else None},
                     indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
