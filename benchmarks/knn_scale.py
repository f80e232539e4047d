"""The kNN graph and the linkage merge at 10⁵-10⁶ embeddings (issue 24), on this machine.

The pool imitates face embeddings from a trained network (D = 128, the demo's): identities
of 2-40 images (a long tail) around centres spread over the sphere with a weak group
structure (demographics), images at within-identity cosine ≈ 0.64 ± 0.04 and impostor cosine
≈ 0.00 ± 0.09 (99.9th percentile ≈ 0.3), the statistics printed with the results. Each
measurement runs in its own process (peak RSS is that process's).

* build + search time and peak memory of each index (flat: exact, hnsw, ivf) at 10⁵ and of
  the default (hnsw) at 10⁶; 10⁷ projected from the measured slope;
* recall of the approximate graph against the exact one at k = 80 (and 10): on every row at
  10⁵, on 2,000 random rows (exact by brute force) at 10⁶;
* the linkage merge (`cluster.linkage.merge`: symmetrised edges, a threshold, connected
  components) on the 10⁶ graph's k = 10 edges weighted by cosine: time and peak memory.

    python benchmarks/knn_scale.py --out runs/knn_scale
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
D, K = 128, 80


def pool(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_id = max(1, n // 8)
    groups = rng.standard_normal((64, D))
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    centres = 0.6 * groups[rng.integers(0, 64, n_id)] + rng.standard_normal((n_id, D)) / np.sqrt(D)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = np.clip((40 * (rng.permutation(n_id) + 1.0) ** -0.6).astype(int), 2, 40)
    labels = np.repeat(np.arange(n_id), sizes)
    if labels.size < n:
        labels = np.concatenate([labels, rng.integers(0, n_id, n - labels.size)])
    labels = rng.permutation(labels)[:n]
    x = np.empty((n, D), np.float32)
    for s in range(0, n, 1 << 17):  # in blocks: no float64 copy of the pool
        lab = labels[s:s + (1 << 17)]
        v = centres[lab] + 0.75 * rng.standard_normal((lab.size, D)) / np.sqrt(D)
        x[s:s + lab.size] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x, labels


def stats(x, labels) -> dict:
    s = x[:2000] @ x[:20000].T
    same = labels[:2000, None] == labels[None, :20000]
    same[np.arange(2000), np.arange(2000)] = False
    other = labels[:2000, None] != labels[None, :20000]
    return {"intra_mean": float(s[same].mean()), "intra_std": float(s[same].std()),
            "inter_mean": float(s[other].mean()), "inter_std": float(s[other].std()),
            "inter_p999": float(np.quantile(s[other], 0.999))}


def exact_rows(x, rows, k):
    """Exact k nearest (excluding the row) of the given rows, by brute force."""
    out = []
    for s in range(0, len(rows), 256):
        sim = x[rows[s:s + 256]] @ x.T
        sim[np.arange(sim.shape[0]), rows[s:s + 256]] = -np.inf
        top = np.argpartition(-sim, k, axis=1)[:, :k]
        order = np.take_along_axis(-sim, top, 1).argsort(1, kind="stable")
        out.append(np.take_along_axis(top, order, 1))
    return np.concatenate(out)


def measure(kind: str, n: int, out: Path) -> dict:
    """One measurement in this process (run by main() as a child)."""
    from dpface.cluster.knn import knn_graph, recall

    res = {"index": kind, "n": n}
    if kind == "merge":
        from dpface.cluster.linkage import merge

        ids, sims = np.load(out / f"graph-hnsw-{n}.npz").values()
        k = 10
        src = np.repeat(np.arange(n), k)
        t0 = time.perf_counter()
        merged = merge(n, src, ids[:, :k].ravel(), sims[:, :k].ravel(), threshold=0.5)
        res.update(edges=int(src.size), merge_s=time.perf_counter() - t0, clusters=int(merged.max() + 1))
    else:
        x, labels = pool(n)
        t0 = time.perf_counter()
        ids, sims = knn_graph(x, K, kind)
        res["seconds"] = time.perf_counter() - t0
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the recall's buffers
        if kind == "flat":
            np.save(out / f"exact-{n}.npy", ids)
        elif (out / f"exact-{n}.npy").is_file():
            exact = np.load(out / f"exact-{n}.npy")
            res["recall@80"], res["recall@10"] = recall(ids, exact), recall(ids[:, :10], exact[:, :10])
        else:
            rows = np.random.default_rng(1).choice(n, 2000, replace=False)
            exact = exact_rows(x, rows, K)
            res["recall@80"] = recall(ids[rows], exact)
            res["recall@10"] = recall(ids[rows, :10], exact[:, :10])
            res["recall_rows"] = 2000
        if kind == "hnsw":
            np.savez(out / f"graph-hnsw-{n}.npz", ids=ids[:, :10], sims=sims[:, :10])
        if kind == "flat":
            res["pool"] = stats(x, labels)
    res.setdefault("peak_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/knn_scale"))
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan", default="flat:100000,hnsw:100000,ivf:100000,hnsw:1000000,merge:1000000")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), out)))
        return
    results = []
    for step in args.plan.split(","):
        kind, n = step.split(":")
        r = subprocess.run([sys.executable, __file__, "--out", str(out), "--child", kind, n], check=True,
                           capture_output=True, text=True, cwd=REPO)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
