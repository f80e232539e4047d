"""Command line: `dpface train|eval|plan|export-head|convert` (also `python -m dpface`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from dpface.config import load_config
    from dpface.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=args.resume)
    return 0


def _cmd_eval(args) -> int:
    import torch

    from dpface.config import apply_overrides, config_from_dict, load_config
    from dpface.engine.checkpoint import CheckpointError, load_file, read_meta, resolve_resume
    from dpface.engine.trainer import build_eval_sets, evaluate
    from dpface.models import build_backbone

    ckpt = resolve_resume(str(args.checkpoint), Path(args.checkpoint))
    meta = read_meta(ckpt)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = config_from_dict(meta["config"], f"{ckpt}/meta.json")
        if args.overrides:
            data = apply_overrides(cfg.to_dict(), args.overrides)
            cfg = config_from_dict(data, f"{ckpt}/meta.json (with overrides)")
    if args.bin:
        cfg.eval.bin_sets = list(args.bin)
    backbone = build_backbone(cfg.model, embedding_size=cfg.head.embedding_size)
    state = load_file(ckpt / "trainer.pt")["backbone"]
    saved = {k: tuple(v.shape) for k, v in state.items()}
    mine = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    diff = [k for k in mine if k in saved and saved[k] != mine[k]]
    if diff or saved.keys() != mine.keys():
        saved_dim = meta["config"]["head"]["embedding_size"]
        raise CheckpointError(
            f"{ckpt}: checkpoint backbone does not fit this config (checkpoint embedding size "
            f"{saved_dim}, config {cfg.head.embedding_size}; first differing tensor: "
            f"{(diff or sorted(saved.keys() ^ mine.keys()))[0]})"
        )
    backbone.load_state_dict(state)
    device = "cuda" if torch.cuda.is_available() and cfg.experiment.device != "cpu" else "cpu"
    backbone.to(device)
    metrics = evaluate(backbone, build_eval_sets(cfg), cfg, device)
    if not metrics:
        print("nothing to evaluate: synthetic data or --bin sets are needed", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=1))
    return 0


def _cmd_plan(args) -> int:
    from dpface.heads.plan import format_plan, plan

    print(format_plan(plan(classes=args.classes, dim=args.dim, world=args.world, batch=args.batch,
                           sample_rate=args.sample_rate, param_dtype=args.dtype,
                           optimizer=args.optimizer)))
    return 0


def _cmd_export_head(args) -> int:
    from dpface.heads.sharding import merge_shards

    ckpt = Path(args.checkpoint)
    shards = sorted(ckpt.glob("head-rank*.pt"))
    if not shards:
        raise SystemExit(f"no head shards (head-rank*.pt) in {ckpt}")
    merge_shards(shards, Path(args.out))
    print(f"wrote {args.out} from {len(shards)} shard(s)")
    return 0


def _cmd_convert(args) -> int:
    from dpface.data import convert

    common = dict(image_size=args.image_size, max_shard_bytes=args.shard_mb << 20,
                  num_workers=args.workers, overwrite=args.overwrite)
    if args.source == "folder":
        m = convert.convert_image_folder(args.src, args.out, **common)
    elif args.source == "recordio":
        m = convert.convert_recordio(args.src, args.out, idx_path=args.idx, **common)
    else:
        m = convert.convert_synthetic(args.out, num_identities=args.identities, seed=args.seed,
                                      max_images=args.max_images, min_images=args.min_images,
                                      exponent=args.exponent, **common)
    print(f"wrote {m['num_images']} images of {m['num_classes']} classes in "
          f"{len(m['shards'])} shard(s); manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpface", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("--config", required=True, help="recipe, e.g. configs/cpu_demo.yaml")
    t.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint of this run) or a checkpoint dir")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.05")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="verification of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory (…/checkpoints/step-N)")
    e.add_argument("--config", default=None, help="recipe to use instead of the checkpoint's own")
    e.add_argument("--bin", action="append", default=[], help="insightface .bin set (repeatable)")
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
    pl.set_defaults(fn=_cmd_plan)

    x = sub.add_parser("export-head", help="merge a checkpoint's head shards into one matrix")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.set_defaults(fn=_cmd_export_head)

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
    return p


def main(argv: list[str] | None = None) -> int:
    from dpface.config import ConfigError
    from dpface.engine.checkpoint import CheckpointError
    from dpface.registry import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, SpecError) as e:
        print(f"dpface: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
