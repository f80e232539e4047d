"""Clustering benchmark: GCN linkage vs agglomerative (tuned threshold) vs k-means (true k).

Simulated pools (``dpface.data.synthetic.embeddings.embedding_pool``): identity centres uniform on the
unit sphere in R^D, each image centre + Gaussian noise of norm ~spread (an identity draws its
spread uniformly from --spread), L2-normalised; identity sizes long-tailed,
floor(max·(i+1)^-exponent) clipped to [min, max]. The GCN and the agglomerative threshold
are fitted on a separate labelled pool (other seed, other identities); each test pool of
size n is clustered and scored (pairwise F, BCubed F, NMI) with wall times of the kNN
graph (faiss IndexFlatIP), GCN inference (IPS + forward) and merging. Agglomerative needs
O(n²) memory: skipped beyond 2·10^4; k-means with the true k beyond 2·10^4 as well (k ~ n/10
centroids: hours on 2 cores).

    python benchmarks/cluster_bench.py --sizes 1000 10000 100000
    python benchmarks/cluster_bench.py --real   # 10^3 pool of real embeddings (tiny backbone)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpface.cluster import baselines, gcn, metrics  # noqa: E402
from dpface.data.synthetic import embeddings  # noqa: E402
from dpface.data.synthetic.faces import long_tail_counts  # noqa: E402


def identities_for(n: int, max_size: int, min_size: int, exponent: float) -> int:
    """Fewest identities whose long-tailed sizes sum to at least n."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if long_tail_counts(mid, max_size, min_size, exponent).sum() >= n:
            hi = mid
        else:
            lo = mid + 1
    return lo


def pool(n, args, seed):
    ids = identities_for(n, args.max_size, args.min_size, args.exponent)
    x, y = embeddings.embedding_pool(ids, args.dim, spread=tuple(args.spread), max_size=args.max_size,
                                   min_size=args.min_size, exponent=args.exponent, seed=seed)
    return x, y


def score(pred, y) -> dict:
    m = metrics.all_metrics(pred, y)
    return {k: round(m[k], 4) for k in ("pairwise_f", "bcubed_f", "nmi")} | {"clusters": m["num_clusters"]}


def run_pools(args, model, x_fit, y_fit, pools, label) -> list:
    t0 = time.perf_counter()
    thr, f_fit = baselines.tune_agglomerative_threshold(x_fit, y_fit)
    print(f"[{label}] agglomerative threshold {thr:.3f} (pairwise F {f_fit:.3f} on the fitting pool, "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)
    rows = []
    for _, (x, y) in pools:
        row = {"pool": label, "n": int(len(x)), "identities": int(np.unique(y).size)}
        t0 = time.perf_counter()
        lab, t = gcn.cluster(model, x, batch_size=256)
        row["gcn"] = score(lab, y) | {"knn_s": round(t["knn_s"], 2), "gcn_s": round(t["gcn_s"], 2),
                                      "merge_s": round(t["merge_s"], 2), "total_s": round(time.perf_counter() - t0, 2)}
        if len(x) <= args.max_baseline:
            t0 = time.perf_counter()
            row["agglomerative"] = score(baselines.agglomerative(x, thr), y) | {"s": round(time.perf_counter() - t0, 2)}
            t0 = time.perf_counter()
            row["kmeans_true_k"] = score(baselines.kmeans(x, int(np.unique(y).size), seed=0), y) | {
                "s": round(time.perf_counter() - t0, 2)}
        else:
            row["agglomerative"] = row["kmeans_true_k"] = f"skipped (n > {args.max_baseline}: O(n²) memory / time)"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def real_embeddings(args):
    """A briefly trained tiny backbone on synthetic faces; embeddings of held-out identities."""
    from dpface.cluster.embed import embed_manifest, load_backbone
    from dpface.config import load_config
    from dpface.data.formats.convert import convert_synthetic
    from dpface.engine.trainer import train

    work = Path(tempfile.mkdtemp(prefix="cluster_bench_"))
    n_train = args.real_train_identities
    over = ["experiment.device=cpu", f"experiment.output_dir={work}", "experiment.name=tiny",
            f"model={{name: iresnet_tiny, base_width: 16, input_size: {args.real_size}}}",
            f"data.image_size={args.real_size}", "head.embedding_size=64", "head.loss={name: cosface, s: 32.0, m: 0.3}",
            f"data.synthetic={{num_identities: {n_train}, max_images: 20, min_images: 6, exponent: 0.8}}",
            "data.batch_size=64", "data.num_workers=0", f"train.steps={args.real_steps}", "train.lr=0.1",
            "eval.num_identities=50", "eval.num_pairs=200", "eval.folds=5", "wandb.enabled=false"]
    t0 = time.perf_counter()
    final = train(load_config(None, over))
    print(f"[real] tiny backbone: {args.real_steps} steps in {time.perf_counter() - t0:.0f} s, held-out "
          f"verification {final.get('synthetic/acc')}", flush=True)
    backbone, cfg, _ = load_backbone(work / "tiny")
    common = dict(image_size=args.real_size, num_workers=0, progress=False, max_images=20, min_images=4, exponent=0.8)
    # GCN fitting identities and the test pool: both disjoint from training and from each other.
    convert_synthetic(str(work / "fit"), num_identities=100, identity_offset=n_train + 1000, **common)
    convert_synthetic(str(work / "test"), num_identities=args.real_identities, identity_offset=n_train + 2000, **common)
    xf, yf, _ = embed_manifest(backbone, work / "fit", args.real_size)
    xt, yt, _ = embed_manifest(backbone, work / "test", args.real_size)
    return xf, yf, xt, yt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--spread", type=float, nargs=2, default=[0.5, 1.1])
    p.add_argument("--max-size", type=int, default=40)
    p.add_argument("--min-size", type=int, default=3)
    p.add_argument("--exponent", type=float, default=0.7)
    p.add_argument("--fit-size", type=int, default=4000, help="labelled pool the GCN and threshold are fitted on")
    p.add_argument("--k1", type=int, default=30)
    p.add_argument("--k2", type=int, default=5)
    p.add_argument("--k-adj", type=int, default=5)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-baseline", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action="store_true", help="also (or, with --sizes and nothing else, only) real embeddings")
    p.add_argument("--real-steps", type=int, default=400)
    p.add_argument("--real-size", type=int, default=48)
    p.add_argument("--real-train-identities", type=int, default=200)
    p.add_argument("--real-identities", type=int, default=120)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}; args {vars(args)}", flush=True)
    rows = []
    kw = dict(k1=args.k1, k2=args.k2, k_adj=args.k_adj, hidden=64, layers=2, epochs=args.epochs, lr=5e-3,
              batch_size=64, seed=args.seed)
    if args.sizes:
        xf, yf = pool(args.fit_size, args, seed=1000 + args.seed)
        t0 = time.perf_counter()
        model, info = gcn.train_gcn(xf, yf, **kw)
        print(f"[simulated] GCN trained on {len(xf)} embeddings / {np.unique(yf).size} identities in "
              f"{time.perf_counter() - t0:.0f} s; threshold {info['threshold']} (pairwise F "
              f"{info['tuned_pairwise_f']:.3f} on the fitting pool)", flush=True)
        pools = [(n, pool(n, args, seed=args.seed + i)) for i, n in enumerate(args.sizes)]
        rows += run_pools(args, model, xf, yf, pools, "simulated")
    if args.real:
        xf, yf, xt, yt = real_embeddings(args)
        t0 = time.perf_counter()
        model, info = gcn.train_gcn(xf, yf, **kw)
        print(f"[real] GCN trained on {len(xf)} embeddings / {np.unique(yf).size} identities in "
              f"{time.perf_counter() - t0:.0f} s; threshold {info['threshold']}", flush=True)
        rows += run_pools(args, model, xf, yf, [(len(xt), (xt, yt))], "real")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
