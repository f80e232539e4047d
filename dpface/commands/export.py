"""`dpface export-head` (the head shards merged into one matrix) and `dpface export-onnx`
(the backbone as ONNX, checked with onnxruntime). Neither writes into a checkpoint nor
over an existing file without --force."""
from __future__ import annotations

import sys
from pathlib import Path

from dpface.commands.errors import InputError


def add_parser(sub) -> None:
    x = sub.add_parser("export-head", help="merge a checkpoint's head shards into one matrix")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(fn=run_head)

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
    xo.set_defaults(fn=run_onnx)


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


def run_head(args) -> int:
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


def run_onnx(args) -> int:
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


