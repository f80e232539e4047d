"""`dpface plan`: per-rank memory and traffic of the model-parallel head, before a run."""
from __future__ import annotations

from dpface.commands.errors import InputError


def add_parser(sub) -> None:
    pl = sub.add_parser("plan", help="per-rank memory and traffic of the model-parallel head")
    pl.add_argument("--classes", type=int, default=None,
                    help="class count; default: the data of --config (data.sources: their total)")
    pl.add_argument("--config", default=None, help="a recipe whose data section gives the class count")
    pl.add_argument("--dim", type=int, default=512)
    pl.add_argument("--world", type=int, required=True)
    pl.add_argument("--batch", type=int, required=True, help="per-rank batch size")
    pl.add_argument("--sample-rate", type=float, default=1.0)
    pl.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    pl.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    pl.add_argument("--kernel", default="fused", choices=["fused", "reference"],
                    help="head implementation (head.kernel; auto is fused where built)")
    pl.add_argument("--logits-budget-mb", type=int, default=128, help="head.logits_budget_mb")
    pl.add_argument("--subcenters", type=int, default=1, help="head.subcenters (needs --kernel reference)")
    pl.set_defaults(fn=run)


def run(args) -> int:
    from dpface.heads.plan import format_plan, plan

    classes = args.classes
    if classes is None:
        if args.config is None:
            raise InputError("plan: give --classes N, or --config RECIPE to read the class count from its data")
        from dpface.config import load_config

        classes = load_config(args.config).data.num_classes()
    try:
        p = plan(classes=classes, dim=args.dim, world=args.world, batch=args.batch,
                 sample_rate=args.sample_rate, param_dtype=args.dtype, optimizer=args.optimizer,
                 kernel=args.kernel, logits_budget_mb=args.logits_budget_mb, subcenters=args.subcenters)
    except ValueError as e:
        raise InputError(f"plan: {e}") from e
    print(format_plan(p))
    return 0


