"""`dpface cluster` (cluster embeddings with a linkage GCN) and `dpface cluster train-gcn`.

The parser is built without importing torch; every expected failure of the library
(:class:`~dpface.cluster.knn.ClusterError`) becomes the CLI's InputError: one
``dpface: error: …`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dpface.commands.errors import InputError, err

EPILOG = """examples:
  dpface cluster train-gcn --checkpoint runs/demo --images labelled/manifest.json --out gcn.pt
  dpface cluster --checkpoint runs/demo --images pool/manifest.json --gcn gcn.pt --out clusters.json
  dpface cluster --embeddings pool.npy --gcn gcn.pt --out clusters.json
"""


def add_parser(sub) -> None:
    """Register `dpface cluster` (and its `train-gcn`) on the main parser's sub-commands."""
    c = sub.add_parser("cluster", help="cluster face embeddings by GCN linkage (Wang et al. 2019); "
                                       "`dpface cluster train-gcn` trains the GCN",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _source_options(c, None)
    c.add_argument("--gcn", default=None, help="GCN file written by `dpface cluster train-gcn`")
    c.add_argument("--out", default=None, help="clusters.json to write")
    c.add_argument("--method", choices=("auto", "gcn", "knn-threshold"), default="auto",
                   help="gcn: the GCN's linkage; knn-threshold: kNN-graph edges above a cosine threshold "
                        "(the threshold train-gcn tuned, or --threshold); auto (default): the one that "
                        "scored higher on the GCN's held-out identities at training (printed)")
    c.add_argument("--threshold", type=float, default=None,
                   help="linkage probability (gcn) or cosine (knn-threshold) an edge must exceed "
                        "(default: the one tuned at training)")
    c.add_argument("--max-size", type=int, default=None,
                   help="pseudo label propagation: re-split clusters larger than this at a raised threshold")
    c.add_argument("--score", action="store_true",
                   help="compare the clusters with the labels of --images / of the .npz (metrics in the output)")
    c.add_argument("--save-embeddings", default=None, help="also write the embeddings (+ labels) as .npz")
    c.add_argument("--index", choices=("auto", "flat", "ivf", "hnsw"), default="auto",
                   help="kNN graph: flat = exact, ivf / hnsw = approximate (faiss); auto: exact up to "
                        "100,000 embeddings, hnsw above")
    c.set_defaults(fn=cmd_cluster)
    csub = c.add_subparsers(dest="cluster_cmd", metavar="train-gcn")
    t = csub.add_parser("train-gcn", help="train the linkage GCN on labelled identities")
    # Defaults suppressed: argparse would otherwise overwrite the same options given before `train-gcn`.
    _source_options(t, argparse.SUPPRESS)
    t.add_argument("--out", default=argparse.SUPPRESS, help="GCN file to write (e.g. gcn.pt)")
    for name, typ, default, text in (
            ("--k1", int, 10, "1-hop neighbours of a pivot (its IPS; above the typical cluster size)"),
            ("--k2", int, 5, "2-hop neighbours per 1-hop node"),
            ("--k-adj", int, 5, "nearest neighbours that define the IPS's edges"),
            ("--hidden", int, 64, "GCN width"), ("--layers", int, 3, "graph convolutions"),
            ("--epochs", int, 80, "passes over the training pivots (6 underfits: benchmarks/RESULTS.md)"),
            ("--lr", float, 3e-3, "Adam learning rate"),
            ("--val-fraction", float, 0.2, "identities held out to tune the merge threshold"),
            ("--seed", int, 0, "split, initialisation and batch order")):
        t.add_argument(name, type=typ, default=default, help=f"{text} (default {default})")
    t.set_defaults(fn=cmd_train_gcn)


def _source_options(p, default) -> None:
    p.add_argument("--checkpoint", default=default, help="run directory or checkpoint dir (…/checkpoints/step-N) "
                                                          "whose backbone embeds --images")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", default=default, help="manifest.json of a converted set (`dpface convert`)")
    src.add_argument("--embeddings", default=default,
                     help=".npy [N, D] embeddings, or .npz with 'embeddings' (and 'labels')")
    p.add_argument("--batch-size", type=int, default=default, help="images / pivots per batch")


def _opt(args, name):
    return getattr(args, name, None)


def _load_embeddings(path, need_labels: bool):
    import numpy as np

    from dpface.cluster.knn import ClusterError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--embeddings: no such file: {p}")
    try:
        data = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ClusterError(f"--embeddings {p}: not a .npy / .npz file ({e})") from e
    labels = None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if "embeddings" not in data.files:
                raise ClusterError(f"--embeddings {p}: the .npz holds {data.files}, not 'embeddings'")
            x = data["embeddings"]
            labels = data["labels"] if "labels" in data.files else None
    else:
        x = data
    if need_labels and labels is None:
        raise ClusterError(f"--embeddings {p}: training needs labels: a .npz with 'embeddings' and 'labels'")
    if labels is not None and labels.shape != (len(x),):
        raise ClusterError(f"--embeddings {p}: 'labels' has shape {labels.shape} for {len(x)} embeddings")
    return x, labels


def _embeddings(args, need_labels: bool):
    """(embeddings, labels or None, items or None) from --embeddings or --checkpoint + --images."""
    if _opt(args, "embeddings"):
        if _opt(args, "checkpoint"):
            raise _input("--checkpoint is for --images; --embeddings are used as they are")
        x, y = _load_embeddings(args.embeddings, need_labels)
        return x, y, None
    if not _opt(args, "images"):
        raise _input("give the pool: --embeddings FILE, or --checkpoint RUN --images MANIFEST")
    if not _opt(args, "checkpoint"):
        raise _input("--images needs --checkpoint (the run or checkpoint whose backbone embeds them)")
    from dpface import distributed as dist
    from dpface.cluster.embed import embed_manifest, load_backbone

    backbone, cfg, ckpt = load_backbone(args.checkpoint)
    device = dist.pick_device(cfg.experiment.device)
    backbone.to(device)
    t0 = time.perf_counter()
    x, y, items = embed_manifest(backbone, args.images, cfg.data.image_size, device=device,
                                 batch_size=_opt(args, "batch_size") or cfg.eval.batch_size, flip=cfg.eval.flip)
    err(f"dpface cluster: embedded {len(x)} images of {args.images} with {ckpt} "
         f"({time.perf_counter() - t0:.1f} s, D={x.shape[1]})")
    return x, y, items


def _input(msg: str):
    return InputError(msg)


def _as_input_error(fn):
    def run(args) -> int:
        from dpface.cluster.knn import ClusterError

        try:
            return fn(args)
        except ClusterError as e:
            raise _input(str(e)) from e
    return run


@_as_input_error
def cmd_train_gcn(args) -> int:
    from dpface.cluster.gcn import save_gcn, train_gcn

    out = _opt(args, "out")
    if not out:
        raise _input("train-gcn needs --out FILE (the GCN file to write, e.g. gcn.pt)")
    x, y, _ = _embeddings(args, need_labels=True)
    model, info = train_gcn(x, y, k1=args.k1, k2=args.k2, k_adj=args.k_adj, hidden=args.hidden,
                            layers=args.layers, epochs=args.epochs, batch_size=_opt(args, "batch_size") or 32,
                            lr=args.lr, val_fraction=args.val_fraction, seed=args.seed, log=err)
    info["source"] = str(_opt(args, "embeddings") or _opt(args, "images"))
    save_gcn(model, out, info)
    print(f"wrote {out}: GCN for D={x.shape[1]} (k1={args.k1}, k2={args.k2}, k_adj={args.k_adj}) trained on "
          f"{info['train_items']} embeddings of {info['train_identities']} identities; merge threshold "
          f"{info['threshold']:.2f} (pairwise F {info['tuned_pairwise_f']:.3f} on the {info['threshold_tuned_on']})")
    f = info["heldout_pairwise_f"]
    if f:  # what `dpface cluster --method auto` will choose by
        print(f"held-out identities ({info['val_items']} embeddings): pairwise F gcn {f['gcn']:.3f}, "
              f"knn-threshold {f['knn_threshold']:.3f} (cosine {info['knn_threshold']:.3f})")
    return 0


@_as_input_error
def cmd_cluster(args) -> int:
    import numpy as np

    from dpface.cluster import metrics as M
    from dpface.cluster.gcn import cluster, load_gcn
    from dpface.io import atomic_write_json

    if not args.gcn:
        raise _input("dpface cluster needs --gcn FILE (train one with `dpface cluster train-gcn`)")
    if not args.out:
        raise _input("dpface cluster needs --out FILE (the clusters.json to write)")
    if args.max_size is not None and args.max_size < 1:
        raise _input(f"--max-size must be >= 1, got {args.max_size}")
    model = load_gcn(args.gcn)  # before the (slow) embedding: a bad GCN file fails at once
    method, why = _pick_method(args.method, model.info)
    if method == "knn-threshold" and args.threshold is None and "knn_threshold" not in model.info:
        raise _input(f"{args.gcn} records no tuned cosine threshold (a GCN file from an older dpface): "
                     "give --threshold, or retrain it with `dpface cluster train-gcn`")
    x, y, items = _embeddings(args, need_labels=False)
    src = "--embeddings" if args.embeddings else "--images"
    def progress(done, total, seconds):
        if done == total or done % (16 * 8192) == 0:
            err(f"dpface cluster: kNN search {done:,}/{total:,} ({seconds:.0f} s)")

    if method == "gcn":
        labels, times = cluster(model, x, threshold=args.threshold, max_size=args.max_size,
                                batch_size=args.batch_size or 256, name=f"{src} {args.embeddings or args.images}",
                                index=args.index, progress=progress)
    else:
        labels, times = _knn_threshold(model, x, args, progress)
    if args.save_embeddings:
        from dpface.io import atomic_write

        atomic_write(args.save_embeddings, lambda f: np.savez(f, embeddings=x, **({} if y is None else {"labels": y})))
    sizes = np.bincount(labels)
    out = {"format": "dpface-clusters", "version": 1, "num_items": int(len(labels)),
           "num_clusters": int(sizes.size), "singletons": int((sizes == 1).sum()),
           "labels": labels.tolist(), "sizes": sizes.tolist(),
           "params": {"method": method, "method_reason": why, "gcn": str(args.gcn), "threshold": times["threshold"],
                      "max_size": args.max_size,
                      "index": times["index"],
                      **{k: model.config[k] for k in ("k1", "k2", "k_adj")}, "source": src,
                      "path": str(args.embeddings or args.images),
                      "checkpoint": str(args.checkpoint) if args.checkpoint else None},
           "timing_s": {k[:-2]: round(v, 4) for k, v in times.items() if k.endswith("_s")}}
    if items is not None:
        out["items"] = [{"shard": s, "key": k} for s, k in items]
    if args.score:
        if y is None:
            raise _input("--score needs labels: --images, or an --embeddings .npz with 'labels'")
        out["metrics"] = M.all_metrics(labels, y)
    atomic_write_json(args.out, out, indent=None)
    print(f"wrote {args.out}: {len(labels)} items in {sizes.size} clusters ({out['singletons']} singletons, "
          f"largest {int(sizes.max())}); method {method}, threshold {times['threshold']:.2f}, index "
          f"{times['index']}; " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in times.items() if k.endswith("_s")))
    print(f"method {method}: {why}")
    big = model.info.get("largest_identity")
    if big and sizes.max() > max(10 * big, 100) and args.max_size is None:
        # A pool far denser than the labelled one (benchmarks/RESULTS.md, 10⁶ embeddings):
        # low-quality images chain into one component at the threshold tuned on the small set.
        labelled = model.info.get("train_items", 0) + model.info.get("val_items", 0)
        err(f"dpface cluster: warning: the largest cluster holds {int(sizes.max()):,} items, "
            f"{int(sizes.max()) // big}x the largest identity train-gcn saw ({big}): the threshold tuned on "
            f"{labelled} labelled embeddings is likely too low for a pool of {len(labels):,}; "
            "raise --threshold or set --max-size")
    if args.score:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out["metrics"].items()}))
    return 0


def _pick_method(method: str, info: dict) -> tuple[str, str]:
    """(method, why): ``auto`` is the one with the higher pairwise F on the held-out identities
    train-gcn scored both on (the GCN on a tie, or when the file has no such record)."""
    if method != "auto":
        return method, "--method"
    f = info.get("heldout_pairwise_f") or {}
    if "gcn" not in f or "knn_threshold" not in f:
        return "gcn", "auto: the GCN file records no held-out comparison"
    scores = f"pairwise F on the GCN's held-out identities: gcn {f['gcn']:.3f}, knn-threshold {f['knn_threshold']:.3f}"
    return ("knn-threshold" if f["knn_threshold"] > f["gcn"] else "gcn"), f"auto: {scores}"


def _knn_threshold(model, x, args, progress) -> tuple:
    """Labels and timings of the kNN-graph cosine threshold on the GCN's k1 neighbours."""
    from dpface.cluster.baselines import knn_threshold
    from dpface.cluster.gcn import check_pool
    from dpface.cluster.knn import pick_index

    t = model.info["knn_threshold"] if args.threshold is None else float(args.threshold)
    if not -1 <= t < 1:
        raise _input(f"--threshold: a cosine threshold must be in [-1, 1), got {t}")
    # The file's dimension and k apply too: its cosine threshold was tuned on that network's embeddings.
    x = check_pool(model, x, "--embeddings" if args.embeddings else "--images")
    t0 = time.perf_counter()
    labels = knn_threshold(x, t, k=model.k1, index=args.index, progress=progress, max_size=args.max_size)
    return labels, {"knn_merge_s": time.perf_counter() - t0, "threshold": t, "index": pick_index(args.index, len(x))}
