"""The options of `dpface eval --protocol …` and `dpface convert synthetic-ijb` (kept apart from
dpface/eval_commands.py, which runs them, so building the parser imports no torch)."""
from __future__ import annotations

PROTOCOLS = ("verification", "ijb", "identification", "sets")


def add_eval_arguments(e) -> None:
    """The protocol options of `dpface eval`."""
    e.add_argument("--protocol", choices=PROTOCOLS, default="verification",
                   help="verification: 10-fold pairs (default); ijb: 1:1 templates of an IJB-format "
                        "set (--ijb-dir); identification: 1:N gallery/probe search; sets: "
                        "mixed-quality synthetic templates pooled by mean, norm and quality")
    g = e.add_argument_group("ijb")
    g.add_argument("--ijb-dir", action="append", default=[],
                   help="IJB-format set: meta/*_face_tid_mid.txt, *_template_pair_label.txt, "
                        "*_name_5pts_score.txt + loose_crop/ (repeatable)")
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


def cmd_synthetic_ijb(args) -> int:
    from dpface.eval.ijb import make_synthetic_ijb

    info = make_synthetic_ijb(args.out, num_identities=args.identities,
                              templates_per_identity=args.templates, identity_offset=args.identity_offset,
                              seed=args.seed, image_size=args.image_size, overwrite=args.overwrite)
    print(f"wrote {info['faces']} faces of {info['identities']} identities in {info['templates']} "
          f"templates ({info['media']} media), {info['pairs']} pairs ({info['genuine']} genuine) "
          f"to {info['dir']}")
    return 0


def add_convert_parser(csub) -> None:
    """`dpface convert synthetic-ijb OUT`: a synthetic IJB-format set (not shards)."""
    c = csub.add_parser("synthetic-ijb", help="synthetic faces → an IJB-format set (meta files + "
                                               "loose crops) for `dpface eval --protocol ijb`")
    c.add_argument("out", help="output directory (meta/ and loose_crop/)")
    c.add_argument("--identities", type=int, default=30)
    c.add_argument("--templates", type=int, default=2, help="templates per identity")
    c.add_argument("--identity-offset", type=int, default=100_000,
                   help="first global synthetic identity (keep it beyond the training identities)")
    c.add_argument("--seed", type=int, default=0, help="synthetic seed (the training set's, data.synthetic.seed)")
    c.add_argument("--image-size", type=int, default=112)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_synthetic_ijb)
