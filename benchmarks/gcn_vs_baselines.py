"""The linkage GCN against its baselines on held-out identities, 3 seeds (issue 24, item 2).

Per seed: a fitting pool (the GCN's training set, and where the agglomerative threshold is
tuned) and a test pool of other identities, both simulated with face embeddings' statistics
(D = 128; within-identity cosine ≈ 0.62, impostor cosine ≈ 0 ± 0.09; long-tailed sizes 3-40),
drawn from the seed's own random streams. Methods: the GCN (k1 10, k2 5, k_adj 5) at several
training lengths, agglomerative clustering with the tuned threshold, k-means with the true k.
Pairwise and BCubed F on the test pool, mean ± std over the seeds.

    OMP_NUM_THREADS=1 python benchmarks/gcn_vs_baselines.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpface.cluster import baselines, gcn, metrics  # noqa: E402
from dpface.data.synthetic import embeddings  # noqa: E402


def pool(identities: int, seed: int):
    return embeddings.embedding_pool(identities, 128, spread=(0.5, 1.1), max_size=40, min_size=3, exponent=0.7,
                                     seed=seed)


def cosine_stats(x, y) -> dict:
    s = x[:1500] @ x.T
    same = y[:1500, None] == y[None, :]
    same[np.arange(1500), np.arange(1500)] = False
    return {"intra": float(s[same].mean()), "inter": float(s[y[:1500, None] != y[None, :]].mean()),
            "inter_std": float(s[y[:1500, None] != y[None, :]].std())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, nargs="+", default=[6, 40, 80])
    ap.add_argument("--fit-identities", type=int, default=700)
    ap.add_argument("--test-identities", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[tuple[float, float]]] = {}
    t0 = time.time()
    for seed in args.seeds:
        x, y = pool(args.fit_identities, 2 * seed + 1)
        xt, yt = pool(args.test_identities, 2 * seed + 2)
        if seed == args.seeds[0]:
            print("test pool", len(xt), "embeddings;", json.dumps(cosine_stats(xt, yt)), flush=True)
        thr, _ = baselines.tune_agglomerative_threshold(x, y)
        results = {"agglomerative (tuned threshold)": baselines.agglomerative(xt, thr),
                   "k-means (true k)": baselines.kmeans(xt, int(np.unique(yt).size), seed=seed)}
        for ep in args.epochs:
            model, _ = gcn.train_gcn(x, y, k1=10, k2=5, k_adj=5, epochs=ep, seed=seed)
            results[f"GCN, {ep} epochs"] = gcn.cluster(model, xt)[0]
        for name, lab in results.items():
            m = metrics.all_metrics(lab, yt)
            rows.setdefault(name, []).append((m["pairwise_f"], m["bcubed_f"]))
            print(seed, name, round(m["pairwise_f"], 4), round(m["bcubed_f"], 4), flush=True)
    print("\n| method | pairwise F | BCubed F |\n|---|---|---|")
    for name, v in rows.items():
        f = [a for a, _ in v]
        b = [c for _, c in v]
        print(f"| {name} | {statistics.mean(f):.3f} ± {statistics.stdev(f):.3f} | "
              f"{statistics.mean(b):.3f} ± {statistics.stdev(b):.3f} |")
    print(f"\n({round(time.time() - t0)} s)")


if __name__ == "__main__":
    main()
