"""`dpface train`: a recipe and dotted overrides; signals stop it with a checkpoint."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("--config", required=True, help="recipe, e.g. configs/cpu_demo.yaml")
    once = t.add_mutually_exclusive_group()
    once.add_argument("--resume", default=None,
                      help="'auto' (latest complete checkpoint of this run) or a checkpoint dir")
    once.add_argument("--overwrite", action="store_true",
                      help="start a fresh run where checkpoints of an earlier run are: delete that run's "
                           "checkpoints and metrics first (without it such a start is refused)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (recipe + overrides) as YAML and exit")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.05")
    t.set_defaults(fn=run)


def run(args) -> int:
    from dpface.config import load_config
    from dpface.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from dpface import distributed as dist
    from dpface.engine.preempt import StopRequested

    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except StopRequested as e:  # SIGTERM/SIGINT: checkpoint written; 143/130, not an error
        if dist.get_rank() == 0:
            print(f"dpface: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


