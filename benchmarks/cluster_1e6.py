"""`dpface cluster` end to end on 10⁶ embeddings on this machine (issue 24, "done when").

A face-like pool (``face_like_pool``: D = 128, difficulty varying per identity and image) of
about 10⁶ embeddings is written as .npz; a GCN is trained with ``dpface cluster train-gcn`` on
a separate labelled pool of other identities; then ``dpface cluster`` (index ``auto``: HNSW at
this size) clusters the 10⁶ pool and scores it against its labels. Each command runs as its
own process: its wall time and peak RSS are reported, with the stage times the CLI writes.

    python benchmarks/cluster_1e6.py --out runs/cluster_1e6
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpface.data.synthetic.embeddings import face_like_pool  # noqa: E402


def run(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one child process (its own rusage, from wait4)."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def make_pools(out: Path, identities: int, fit_identities: int) -> None:
    for path, ids, seed in ((out / "pool.npz", identities, 7), (out / "fit.npz", fit_identities, 8)):
        x, y = face_like_pool(ids, 128, seed=seed)
        np.savez(path, embeddings=x, labels=y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=325_000, help="≈ 10⁶ embeddings (mean size ≈ 3.1)")
    ap.add_argument("--fit-identities", type=int, default=700)
    ap.add_argument("--method", default=None, help="passed to dpface cluster as --method when given")
    ap.add_argument("--out", type=Path, default=Path("runs/cluster_1e6"))
    ap.add_argument("--make-pools", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.make_pools:
        return make_pools(args.out, args.identities, args.fit_identities)
    pool, fit = args.out / "pool.npz", args.out / "fit.npz"
    if not pool.is_file():  # in a child: this process stays small, so nothing it forks inherits the pool
        run([sys.executable, __file__, "--make-pools", "--out", str(args.out), "--identities", str(args.identities),
             "--fit-identities", str(args.fit_identities)])
    with np.load(pool) as d:
        n = int(d["labels"].size)
    print(f"pool: {n:,} embeddings of {args.identities:,} identities", flush=True)
    dp = [sys.executable, "-m", "dpface", "cluster"]
    res = {"n": n, "train_gcn": run(dp + ["train-gcn", "--embeddings", str(fit), "--out", str(args.out / "gcn.pt")])}
    method = ["--method", args.method] if args.method else []
    res["cluster"] = run(dp + ["--embeddings", str(pool), "--gcn", str(args.out / "gcn.pt"), *method, "--score",
                               "--out", str(args.out / "clusters.json")])
    out = json.loads((args.out / "clusters.json").read_text())
    res["timing_s"], res["params"] = out["timing_s"], out["params"]
    res["metrics"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in out["metrics"].items()}
    print(json.dumps(res, indent=1))
    (args.out / "result.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
