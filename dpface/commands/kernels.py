"""`dpface kernels [--check]`: what of the compiled ops is built, and whether each one
agrees with the PyTorch reference on this machine's devices."""
from __future__ import annotations


def add_parser(sub) -> None:
    k = sub.add_parser("kernels", help="what of the compiled kernels is built (CPU / CUDA / missing)")
    k.add_argument("--check", action="store_true",
                   help="run every compiled op on each device against the PyTorch reference (exit 1 on a mismatch)")
    k.set_defaults(fn=run)


def run(args) -> int:
    from dpface import ops

    print(ops.report())
    if not args.check:
        return 0
    import torch

    from dpface.ops.selfcheck import check_all

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    checks = check_all(devices)
    for c in checks:
        print(f"  {c.line()}")
    if not checks:
        print("  nothing to check: the compiled ops are not built")
    return 0 if all(c.ok for c in checks) else 1


