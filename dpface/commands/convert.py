"""`dpface convert folder|recordio|synthetic` (→ WebDataset shards and a manifest),
`dpface convert synthetic-ijb` (→ an IJB-format set for `dpface eval --protocol ijb|ijb-1n`) and
`dpface convert pairs-to-bin` (an image folder + pairs.txt → a .bin for `dpface eval --bin`)."""
from __future__ import annotations

import errno
from pathlib import Path

from dpface.commands.errors import InputError


def add_parser(sub) -> None:
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
        sp.set_defaults(fn=run)
    _add_synthetic_ijb(csub)
    _add_pairs_to_bin(csub)


def run(args) -> int:
    from dpface.data.formats import convert

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


def run_synthetic_ijb(args) -> int:
    from dpface.data.synthetic.ijb import make_synthetic_ijb

    try:
        info = make_synthetic_ijb(args.out, num_identities=args.identities,
                                  templates_per_identity=args.templates,
                                  identity_offset=args.identity_offset, seed=args.seed,
                                  image_size=args.image_size, overwrite=args.overwrite)
    except ValueError as e:
        raise InputError(str(e)) from None
    print(f"wrote {info['faces']} faces of {info['identities']} identities in {info['templates']} "
          f"templates ({info['media']} media), {info['pairs']} pairs ({info['genuine']} genuine) "
          f"to {info['dir']}")
    return 0


def _add_synthetic_ijb(csub) -> None:
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
    c.set_defaults(fn=run_synthetic_ijb)


def _add_pairs_to_bin(csub) -> None:
    c = csub.add_parser("pairs-to-bin", help="an image folder + LFW-style pairs.txt → an insightface .bin "
                                              "verification set (`dpface eval --bin`)")
    c.add_argument("src", help="image folder: SRC/NAME/NAME_0001.jpg, ...")
    c.add_argument("pairs", help="pairs.txt: 'NAME I J' (same person) or 'NAME1 I NAME2 J' lines")
    c.add_argument("out", help="the .bin to write")
    c.add_argument("--landmarks", default=None,
                   help="five points per image ('NAME/FILE x1 y1 ... x5 y5'): align to the ArcFace template")
    c.add_argument("--image-size", type=int, default=112)
    c.add_argument("--format", choices=("png", "jpeg"), default="png",
                   help="image encoding in the .bin (png: lossless; jpeg: as the published sets)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=run_pairs_to_bin)


def run_pairs_to_bin(args) -> int:
    from dpface.eval.pairs_to_bin import PairsError, pairs_to_bin

    try:
        info = pairs_to_bin(args.src, args.pairs, args.out, image_size=args.image_size, landmarks=args.landmarks,
                            format=args.format, overwrite=args.overwrite)
    except PairsError as e:
        raise InputError(str(e)) from None
    how = "aligned by their landmarks" if info["aligned"] else f"{info['resized']} resized to {args.image_size} px"
    print(f"wrote {info['pairs']} pairs ({info['same']} same-person) of {info['images']} images ({how}) to {args.out}")
    return 0
