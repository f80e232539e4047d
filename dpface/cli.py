"""Command line: `dpface train|eval|plan|export-head|convert` (also `python -m dpface`)."""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
from pathlib import Path

# Exit codes (README "Errors"): 0 ok; 1 an unexpected failure (a bug: traceback);
# 2 bad input (config, override, spec, checkpoint, command arguments, missing file);
# 3 bad data (shards, labels, too many unusable samples, a data position that cannot
# continue); 4 training diverged
# (non-finite gradients); 5 no space left on device.
EXIT_INPUT, EXIT_DATA, EXIT_DIVERGED, EXIT_NO_SPACE = 2, 3, 4, 5


class InputError(Exception):
    """A command's arguments are wrong (plan, convert, --bin): exit 2, no traceback."""


def _error_message(e: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for an expected failure; None for anything else,
    which keeps its traceback."""
    from dpface.data.shards import ShardError
    from dpface.eval.ijb import ProtocolError
    from dpface.heads.sharding import HeadShardError
    from dpface.registry import SpecError
    from dpface.rundir import CheckpointError
    from dpface.schema import ConfigError

    chain, c = [], e
    while c is not None and len(chain) < 10:  # torch wraps a failed write in its own error
        chain.append(c)
        c = c.__cause__ or c.__context__
    for c in chain:
        if isinstance(c, OSError) and c.errno == errno.ENOSPC:
            where = next((x.filename for x in chain if isinstance(x, OSError) and x.filename), None)
            return f"no space left on device{f' writing {where}' if where else ''}", EXIT_NO_SPACE
    # A path the user chose cannot be written (a read-only output directory, a file where
    # a directory should be): the path and the reason, not a traceback.
    if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)) and e.filename:
        return f"cannot write {e.filename}: {e.strerror}", EXIT_INPUT
    text = str(e)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep its last line
        last = [l for l in text.splitlines() if l.strip()][-1]
        # "module.LabelError: sample …" → "sample …"
        text = re.sub(r"^[A-Za-z_][\w.]*(Error|Exception): ", "", last)
    if isinstance(e, ShardError):
        return text, EXIT_DATA
    if isinstance(e, FloatingPointError):
        return text, EXIT_DIVERGED
    if isinstance(e, (ConfigError, CheckpointError, HeadShardError, SpecError, InputError,
                      FileNotFoundError, ProtocolError)):
        return text, EXIT_INPUT
    return None


def _json_metrics(metrics: dict) -> str:
    """JSON without bare NaN/Infinity (not JSON; strict parsers reject them): null instead."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in metrics.items()}
    return json.dumps(clean, indent=1, allow_nan=False)


def _cmd_train(args) -> int:
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


def _cmd_eval(args) -> int:
    from dpface import distributed as dist
    from dpface.config import load_config
    from dpface.restore import load_backbone
    from dpface.rundir import RunDir

    own = load_config(args.config, args.overrides) if args.config else None
    backbone, cfg, meta, ckpt = load_backbone(args.checkpoint, args.overrides, cfg=own)
    if args.bin:
        cfg.eval.bin_sets = list(args.bin)
    device = dist.pick_device(cfg.experiment.device)
    backbone.to(device)
    if args.protocol != "verification":  # ijb | identification (dpface/eval_commands.py)
        from dpface.eval.model_card import append_checkpoint_evaluation
        from dpface.eval_commands import run_protocol

        metrics = run_protocol(args, backbone, cfg, device, ckpt, int(meta.get("step", 0)))
        print(_json_metrics(metrics))
        card = append_checkpoint_evaluation(ckpt, cfg, meta, metrics, note=f"protocol {args.protocol}")
        if card is not None:
            print(f"dpface eval: results appended to {card}", file=sys.stderr, flush=True)
        return 0
    try:
        sets = cfg.eval.build_sets(cfg.data)
    except (ValueError, OSError) as e:  # a missing or unreadable --bin / eval.bin_sets file
        raise InputError(str(e)) from e
    if not sets:
        raise InputError("nothing to evaluate: synthetic data or --bin sets are needed")
    for name, v in sets.items():  # (images a, images b, issame, …)
        if len(v[2]) < cfg.eval.folds:
            raise InputError(f"{name}: {len(v[2])} pairs cannot be split into eval.folds={cfg.eval.folds} folds")
    # Progress on stderr (stdout is the JSON): one line per set, cheap.
    print("dpface eval: " + ", ".join(f"{k} ({len(v[2])} pairs)" for k, v in sets.items()),
          file=sys.stderr, flush=True)
    rocs: dict = {}
    metrics = cfg.eval.run(backbone, sets, device, rocs)
    from dpface.eval_commands import verification_plots

    for path in verification_plots(rocs, RunDir.of_checkpoint(ckpt).plots, int(meta.get("step", 0))):
        print(f"dpface eval: wrote {path}", file=sys.stderr, flush=True)
    print(_json_metrics(metrics))
    from dpface.eval.model_card import append_checkpoint_evaluation

    card = append_checkpoint_evaluation(ckpt, cfg, meta, metrics,
                                        note=f"sets: {', '.join(sets)}" + (" (own --config)" if args.config else ""))
    if card is not None:
        print(f"dpface eval: results appended to {card}", file=sys.stderr, flush=True)
    return 0


def _cmd_plan(args) -> int:
    from dpface.heads.plan import format_plan, plan

    try:
        p = plan(classes=args.classes, dim=args.dim, world=args.world, batch=args.batch,
                 sample_rate=args.sample_rate, param_dtype=args.dtype, optimizer=args.optimizer,
                 kernel=args.kernel, logits_budget_mb=args.logits_budget_mb, subcenters=args.subcenters)
    except ValueError as e:
        raise InputError(f"plan: {e}") from e
    print(format_plan(p))
    return 0


def _output_file(out: str, force: bool) -> Path:
    """An --out file the command may write: not a directory, not inside a checkpoint or a
    run's checkpoints/ (an export once overwrote trainer.pt), not an existing file
    unless --force."""
    from dpface.rundir import inside_checkpoints

    path = Path(out)
    if path.is_dir():
        raise InputError(f"--out {out} is a directory: name the file to write")
    parent = inside_checkpoints(path)
    if parent is not None:
        raise InputError(f"--out {out} is inside the checkpoint directory {parent}: dpface never writes "
                         "into checkpoints; write the file elsewhere")
    if path.exists() and not force:
        raise InputError(f"--out {out} exists; pass --force to replace it")
    return path


def _cmd_export_head(args) -> int:
    from dpface.heads.sharding import merge_shards
    from dpface.rundir import checkpoint_dir

    ckpt = checkpoint_dir(args.checkpoint, "--checkpoint")
    out = _output_file(args.out, args.force)
    shards = sorted(ckpt.glob("head-rank*.pt"))
    if not shards:
        raise InputError(f"--checkpoint: no head shards (head-rank*.pt) in {ckpt}")
    merge_shards(shards, out)
    print(f"wrote {args.out} from {len(shards)} shard(s)")
    return 0


def _cmd_export_onnx(args) -> int:
    from dpface.eval.export_onnx import ExportError, export_checkpoint
    from dpface.restore import load_backbone

    if args.check_images < 1:
        raise InputError(f"--check-images must be at least 1, got {args.check_images}")
    out = _output_file(args.out, args.force)
    try:
        r = export_checkpoint(load_backbone(args.checkpoint, args.overrides), out, tol=args.tol,
                              num_images=args.check_images)
    except ExportError as e:  # the export or its onnxruntime check failed: not bad input
        print(f"dpface: error: {e}", file=sys.stderr)
        return 1
    for name, c in r.checks.items():
        print(f"onnxruntime vs PyTorch on {name}: max |Δ| {c['max_abs_diff']:.2e} (L2-normalised), "
              f"{c['max_abs_diff_raw']:.2e} raw (max |embedding| {c['max_abs_raw']:.3g})")
    print(f"wrote {r.path} (opset {r.opset}, input 'data' [N,3,{r.metadata['image_size']},"
          f"{r.metadata['image_size']}] (x-127.5)/127.5, embedding {r.metadata['embedding_size']}; "
          f"export {r.export_s:.1f} s)")
    return 0


def _cmd_convert(args) -> int:
    from dpface.data import convert

    common = dict(image_size=args.image_size, max_shard_bytes=args.shard_mb << 20,
                  num_workers=args.workers, overwrite=args.overwrite)
    try:
        if args.source == "folder":
            m = convert.convert_image_folder(args.src, args.out, **common)
        elif args.source == "recordio":
            m = convert.convert_recordio(args.src, args.out, idx_path=args.idx, **common)
        else:
            m = convert.convert_synthetic(args.out, num_identities=args.identities, seed=args.seed,
                                          max_images=args.max_images, min_images=args.min_images,
                                          exponent=args.exponent, **common)
    except (ValueError, RuntimeError, OSError) as e:  # bad source / output directory
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise
        raise InputError(f"convert {args.source}: {e}") from e
    print(f"wrote {m['num_images']} images of {m['num_classes']} classes in "
          f"{len(m['shards'])} shard(s); manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def _cmd_kernels(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    from dpface import __version__

    p = argparse.ArgumentParser(prog="dpface", description=__doc__)
    p.add_argument("--version", action="version", version=f"dpface {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also: environment DPFACE_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)

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
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint: verification, IJB templates, 1:N identification")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory (…/checkpoints/step-N)")
    e.add_argument("--config", default=None, help="recipe to use instead of the checkpoint's own")
    e.add_argument("--bin", action="append", default=[], help="insightface .bin set (repeatable)")
    from dpface.cli_protocols import add_convert_parser, add_eval_arguments

    add_eval_arguments(e)  # --protocol ijb|identification and their options
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=_cmd_eval)

    pl = sub.add_parser("plan", help="per-rank memory and traffic of the model-parallel head")
    pl.add_argument("--classes", type=int, required=True)
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
    pl.set_defaults(fn=_cmd_plan)

    k = sub.add_parser("kernels", help="what of the compiled kernels is built (CPU / CUDA / missing)")
    k.add_argument("--check", action="store_true",
                   help="run every compiled op on each device against the PyTorch reference (exit 1 on a mismatch)")
    k.set_defaults(fn=_cmd_kernels)

    x = sub.add_parser("export-head", help="merge a checkpoint's head shards into one matrix")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(fn=_cmd_export_head)

    xo = sub.add_parser("export-onnx", help="a checkpoint's backbone as ONNX (insightface input convention), "
                                            "checked with onnxruntime")
    xo.add_argument("--checkpoint", required=True, help="checkpoint directory (…/checkpoints/step-N)")
    xo.add_argument("--out", required=True, help="the .onnx file to write")
    xo.add_argument("--force", action="store_true", help="replace --out if it exists")
    xo.add_argument("--tol", type=float, default=1e-4,
                    help="largest |Δ| of L2-normalised embeddings, onnxruntime vs PyTorch (fp32)")
    xo.add_argument("--check-images", type=int, default=64,
                    help="evaluation-set images the onnxruntime check runs on (besides 8 random inputs)")
    xo.add_argument("overrides", nargs="*", help="dotted overrides of the checkpoint's config")
    xo.set_defaults(fn=_cmd_export_onnx)

    c = sub.add_parser("convert", help="image folder / insightface RecordIO / synthetic → WebDataset shards")
    csub = c.add_subparsers(dest="source", required=True)
    cf = csub.add_parser("folder", help="one sub-folder per identity")
    cf.add_argument("src")
    cr = csub.add_parser("recordio", help="insightface train.rec (+ train.idx)")
    cr.add_argument("src", help="path of train.rec")
    cr.add_argument("--idx", default=None, help="path of train.idx (default: beside the .rec)")
    cs = csub.add_parser("synthetic", help="procedural synthetic faces")
    cs.add_argument("--identities", type=int, required=True)
    cs.add_argument("--seed", type=int, default=0)
    cs.add_argument("--max-images", type=int, default=60)
    cs.add_argument("--min-images", type=int, default=2)
    cs.add_argument("--exponent", type=float, default=1.0)
    for sp in (cf, cr, cs):
        sp.add_argument("out", help="output directory for shards + manifest.json")
        sp.add_argument("--image-size", type=int, default=112)
        sp.add_argument("--shard-mb", type=int, default=1024, help="max size of one shard")
        sp.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs)")
        sp.add_argument("--overwrite", action="store_true")
        sp.set_defaults(fn=_cmd_convert)
    add_convert_parser(csub)  # convert synthetic-ijb: an IJB-format set, not shards
    from dpface.cluster.cli import add_cluster_parser

    add_cluster_parser(sub)  # dpface cluster [train-gcn]: GCN linkage face clustering
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand on both sides of an option (`a=1 --resume auto b=2`): argparse
    # fills a positional list once, so the later ones come back as extras.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    debug = args.debug or os.environ.get("DPFACE_DEBUG", "") not in ("", "0")
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 — expected failures become one line; bugs keep a traceback
        found = _error_message(e)
        if found is None:
            raise
        if debug:
            import traceback

            traceback.print_exc()
        print(f"dpface: error: {found[0]}", file=sys.stderr)
        return found[1]


if __name__ == "__main__":
    sys.exit(main())
