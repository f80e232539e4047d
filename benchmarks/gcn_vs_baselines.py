"""The linkage GCN against its baselines on held-out identities, 3 seeds (issue 24, item 2).

Per seed: a fitting pool (the GCN's training set, where every threshold is tuned) and a test
pool of other identities. Three kinds of pool (``--pools``):

* ``simple``: ``embedding_pool``, one isotropic spread per identity (D = 128, within-identity
  cosine ≈ 0.62, impostor ≈ 0 ± 0.09): a single global threshold separates it almost perfectly;
* ``face-like``: ``face_like_pool``, difficulty varying as in real embeddings (per-identity
  spread, two-mode identities, demographic groups, a hub of low-quality images);
* ``real``: a trained backbone's embeddings (``--backbone RUN``, e.g. the README demo's
  network trained 600 steps) of rendered synthetic faces of identities it never saw: blur,
  noise, occlusion and pose make quality and difficulty vary per image.

Methods: the GCN (k1 10, k2 5, k_adj 5, ``--epochs``), agglomerative average linkage with the
tuned threshold (O(N²): up to 4·10⁴), k-means with the true k, and the scalable kNN-graph
threshold (single linkage on the k = 10 graph, tuned cosine). Pairwise and BCubed F on the
test pool, mean ± std over the seeds; the pools' cosine statistics are printed.

    OMP_NUM_THREADS=1 python benchmarks/gcn_vs_baselines.py --pools simple face-like
    python -m dpface train --config configs/cpu_demo.yaml train.steps=600 \\
        experiment.output_dir=runs experiment.name=cluster_backbone
    python benchmarks/gcn_vs_baselines.py --pools real --backbone runs/cluster_backbone --fit-identities 2000
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


def simulated(kind: str, identities: int, seed: int):
    if kind == "simple":
        return embeddings.embedding_pool(identities, 128, spread=(0.5, 1.1), max_size=40, min_size=3,
                                         exponent=0.7, seed=seed)
    return embeddings.face_like_pool(identities, 128, max_size=40, min_size=3, exponent=0.7, seed=seed)


def rendered(backbone_dir: Path, work: Path, identities: int, offset: int):
    """Embeddings of ``identities`` synthetic identities from ``offset`` on (cached as .npz)."""
    cache = work / f"ids{identities}_at{offset}.npz"
    if not cache.is_file():
        from dpface.cluster.embed import embed_manifest, load_backbone
        from dpface.data.formats.convert import convert_synthetic

        backbone, cfg, _ = load_backbone(backbone_dir)
        shards = work / f"ids{identities}_at{offset}"
        convert_synthetic(str(shards), num_identities=identities, identity_offset=offset,
                          image_size=cfg.data.image_size, max_images=20, min_images=3, exponent=0.8,
                          num_workers=0, progress=False, overwrite=True)
        x, y, _ = embed_manifest(backbone, shards / "manifest.json", cfg.data.image_size)
        np.savez(cache, embeddings=x, labels=y)
    d = np.load(cache)
    return d["embeddings"], d["labels"]


def sd(z) -> float:
    return statistics.stdev(z) if len(z) > 1 else 0.0


def cosine_stats(x, y) -> dict:
    """Within / between identity cosine (mean, std, impostor 99.9th percentile) and the spread
    of the per-identity mean within-identity cosine (10th, 50th, 90th percentile)."""
    n = min(1500, len(x))
    s = x[:n] @ x.T
    same = y[:n, None] == y[None, :]
    same[np.arange(n), np.arange(n)] = False
    other = ~same
    other[np.arange(n), np.arange(n)] = False
    per = [s[(y[:n] == i)[:, None] & same].mean() for i in np.unique(y[:n]) if (y == i).sum() > 1]
    return {"intra": round(float(s[same].mean()), 3), "intra_std": round(float(s[same].std()), 3),
            "inter": round(float(s[other].mean()), 3), "inter_std": round(float(s[other].std()), 3),
            "inter_p99.9": round(float(np.quantile(s[other], 0.999)), 3),
            "per_identity_intra_p10_50_90": [round(float(v), 3) for v in np.quantile(per, [0.1, 0.5, 0.9])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", nargs="+", choices=("simple", "face-like", "real"), default=["simple", "face-like"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, nargs="+", default=[80])
    ap.add_argument("--fit-identities", type=int, default=700)
    ap.add_argument("--test-identities", type=int, default=2000)
    ap.add_argument("--backbone", type=Path, default=None, help="run directory of the network for --pools real")
    ap.add_argument("--work", type=Path, default=Path("runs/gcn_vs_baselines"), help="cache of rendered pools")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    if "real" in args.pools and args.backbone is None:
        ap.error("--pools real needs --backbone RUN")
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    table: dict[tuple[str, str], list[tuple[float, float]]] = {}
    t0 = time.time()
    for kind in args.pools:
        for seed in args.seeds:
            if kind == "real":  # identities far above the backbone's training ones, disjoint per seed
                base = 100_000 + 10_000 * seed
                x, y = rendered(args.backbone, args.work, args.fit_identities, base)
                xt, yt = rendered(args.backbone, args.work, args.test_identities, base + 5_000)
            else:
                x, y = simulated(kind, args.fit_identities, 2 * seed + 1)
                xt, yt = simulated(kind, args.test_identities, 2 * seed + 2)
            if seed == args.seeds[0]:
                print(f"[{kind}] test pool {len(xt)} embeddings of {np.unique(yt).size} identities;",
                      json.dumps(cosine_stats(xt, yt)), flush=True)
            thr, _ = baselines.tune_agglomerative_threshold(x, y)
            kthr, _ = baselines.tune_knn_threshold(x, y)
            results = {f"agglomerative (tuned {thr:.2f})": baselines.agglomerative(xt, thr),
                       "k-means (true k)": baselines.kmeans(xt, int(np.unique(yt).size), seed=seed),
                       f"kNN-graph threshold (tuned {kthr:.2f})": baselines.knn_threshold(xt, kthr)}
            for ep in args.epochs:
                model, _ = gcn.train_gcn(x, y, k1=10, k2=5, k_adj=5, epochs=ep, seed=seed)
                results[f"GCN, {ep} epochs"] = gcn.cluster(model, xt)[0]
            for name, lab in results.items():
                m = metrics.all_metrics(lab, yt)
                key = (kind, name.split(" (tuned")[0])
                table.setdefault(key, []).append((m["pairwise_f"], m["bcubed_f"]))
                print(kind, seed, name, round(m["pairwise_f"], 4), round(m["bcubed_f"], 4), flush=True)
    print("\n| pool | method | pairwise F | BCubed F |\n|---|---|---|---|")
    rows = []
    for (kind, name), v in table.items():
        f, b = [a for a, _ in v], [c for _, c in v]
        rows.append({"pool": kind, "method": name, "pairwise_f": f, "bcubed_f": b})
        print(f"| {kind} | {name} | {statistics.mean(f):.3f} ± {sd(f):.3f} | {statistics.mean(b):.3f} ± {sd(b):.3f} |")
    print(f"\n({round(time.time() - t0)} s)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
