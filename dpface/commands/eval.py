"""`dpface eval`: a checkpoint's backbone on verification pairs (synthetic or .bin sets), or
with --protocol on IJB templates, 1:N identification or pooled sets (eval_protocols.py).
Results go to stdout as JSON, into the run's model card, and to W&B when it is enabled."""
from __future__ import annotations

import sys

from dpface.commands.errors import InputError, json_metrics

PROTOCOLS = ("verification", "ijb", "ijb-1n", "identification", "sets")


def add_protocol_arguments(e) -> None:
    """The protocol options of `dpface eval`."""
    e.add_argument("--protocol", choices=PROTOCOLS, default="verification",
                   help="verification: 10-fold pairs (default); ijb: 1:1 templates of an IJB-format "
                        "set (--ijb-dir); ijb-1n: its 1:N protocol (galleries G1/G2, mixed-media "
                        "probes); identification: 1:N gallery/probe search; sets: "
                        "mixed-quality synthetic templates pooled by mean, norm and quality")
    e.add_argument("--tar-convention", choices=("strict", "nearest"), default=None,
                   help="how TAR@FAR is read (eval.tar_convention): strict = at most floor(FAR*N) "
                        "impostors accepted, none below 1/N; nearest = insightface's ROC point with the "
                        "FPR nearest the target, for comparison with published tables "
                        "(keys nearest_tar@far=...)")
    g = e.add_argument_group("ijb")
    g.add_argument("--ijb-dir", action="append", default=[],
                   help="IJB-format set: meta/*_face_tid_mid.txt, *_template_pair_label.txt, "
                        "*_name_5pts_score.txt (1:N: *_1N_gallery_*.csv, *_1N_probe_mixed.csv) + "
                        "loose_crop/ (repeatable)")
    g.add_argument("--no-flip", action="store_true", help="ijb: features of the image alone "
                   "(default: image + mirror summed)")
    g.add_argument("--no-norm-score", action="store_true", help="ijb: L2-normalise each face "
                   "before pooling (default: the feature norm weighs the face)")
    g.add_argument("--no-detector-score", action="store_true", help="ijb: do not weigh faces by "
                   "their detector score")
    g.add_argument("--all-modes", action="store_true",
                   help="ijb: report all 8 flip/norm/detector combinations")
    i = e.add_argument_group("identification")
    i.add_argument("--id-dir", default=None,
                   help="identification from an image folder (one sub-folder per identity, aligned "
                        "crops; first image → gallery, the rest → probes); default: held-out "
                        "synthetic identities")
    i.add_argument("--distractor-dir", default=None,
                   help="folder of unlabelled distractor images (with --id-dir)")
    i.add_argument("--distractors", default="",
                   help="distractor counts added to the gallery, e.g. 10,100,1000 (nested sets)")
    i.add_argument("--identities", type=int, default=None,
                   help="synthetic identities (default: eval.num_identities)")
    i.add_argument("--probes-per-identity", type=int, default=2, help="synthetic probes per identity")
    i.add_argument("--nonmated-fraction", type=float, default=0.25,
                   help="share of identities left out of the gallery: their probes are the "
                        "non-mated searches that set the open-set threshold")


    t = e.add_argument_group("sets")
    t.add_argument("--templates-per-identity", type=int, default=3,
                   help="sets: synthetic templates per held-out identity (the first is the gallery)")
    t.add_argument("--poor-fraction", type=float, default=0.5,
                   help="sets: share of very poor images in the templates")


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint: verification, IJB templates, 1:N identification")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory (…/checkpoints/step-N)")
    e.add_argument("--config", default=None, help="recipe to use instead of the checkpoint's own")
    e.add_argument("--bin", action="append", default=[], help="insightface .bin set (repeatable)")
    add_protocol_arguments(e)  # --protocol ijb|identification|sets and their options
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=run)


def run(args) -> int:
    from dpface import distributed as dist
    from dpface.config import load_config
    from dpface.restore import load_backbone
    from dpface.rundir import RunDir

    own = load_config(args.config, args.overrides) if args.config else None
    backbone, cfg, meta, ckpt = load_backbone(args.checkpoint, args.overrides, cfg=own)
    if args.bin:
        cfg.eval.bin_sets = list(args.bin)
    if args.tar_convention:
        cfg.eval.tar_convention = args.tar_convention
    device = dist.pick_device(cfg.experiment.device)
    backbone.to(device)
    if args.protocol != "verification":  # ijb | identification | sets (eval_protocols.py)
        from dpface.commands.eval_protocols import run_protocol
        from dpface.eval.model_card import append_checkpoint_evaluation

        metrics = run_protocol(args, backbone, cfg, device, ckpt, int(meta.get("step", 0)))
        print(json_metrics(metrics))
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
    from dpface.commands.eval_protocols import log_to_wandb, verification_plots

    plots = verification_plots(rocs, RunDir.of_checkpoint(ckpt).plots, int(meta.get("step", 0)))
    for path in plots:
        print(f"dpface eval: wrote {path}", file=sys.stderr, flush=True)
    log_to_wandb(cfg, RunDir.of_checkpoint(ckpt).root, int(meta.get("step", 0)), metrics, plots, "eval")
    print(json_metrics(metrics))
    from dpface.eval.model_card import append_checkpoint_evaluation

    card = append_checkpoint_evaluation(ckpt, cfg, meta, metrics,
                                        note=f"sets: {', '.join(sets)}" + (" (own --config)" if args.config else ""))
    if card is not None:
        print(f"dpface eval: results appended to {card}", file=sys.stderr, flush=True)
    return 0


