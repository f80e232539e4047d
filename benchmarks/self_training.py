"""Self-training benchmark: does training on GCN-clustered unlabelled faces help?

Synthetic faces, three disjoint identity ranges: labelled [0, L), unlabelled pool
[L, L+U), held-out verification [L+U, L+U+H). Per seed (``dpface.cluster.self_train``):
a teacher trains on the labelled set for --teacher-steps (webdataset backend, tiny
iresnet), its backbone embeds both sets, a linkage GCN trained on the labelled embeddings
clusters the pool, clusters of >= 2 images become new identities, and the teacher's
checkpoint continues for --extra-steps on labelled + pseudo-labelled images (self-train)
and, equally long, on the labelled images alone (control). Reported: held-out verification
accuracy / AUC of teacher, control and self-trained backbones, and the pool's clustering.

    python benchmarks/self_training.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpface.cluster.self_train import self_train  # noqa: E402
from dpface.data.formats.convert import convert_synthetic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labelled", type=int, default=60, help="labelled identities")
    p.add_argument("--pool", type=int, default=120, help="unlabelled pool identities")
    p.add_argument("--held-out", type=int, default=60, help="verification identities")
    p.add_argument("--images", type=int, default=12, help="images per identity (balanced)")
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--extra-steps", type=int, default=150)
    p.add_argument("--pairs", type=int, default=600)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="self_training_"))
    common = dict(image_size=args.size, num_workers=0, progress=False, max_images=args.images,
                  min_images=args.images)
    convert_synthetic(str(work / "L"), num_identities=args.labelled, **common)
    convert_synthetic(str(work / "U"), num_identities=args.pool, identity_offset=args.labelled, **common)
    base = ["experiment.device=cpu", f"model={{name: iresnet_tiny, base_width: 16, input_size: {args.size}}}",
            f"data.image_size={args.size}", "head.embedding_size=64", "head.loss={name: cosface, s: 32.0, m: 0.3}",
            "data.batch_size=64", "data.num_workers=0", "train.lr=0.1", "train.schedule=cosine",
            "wandb.enabled=false"]
    reports = []
    for seed in args.seeds:
        r = self_train(work / f"seed{seed}", work / "L", work / "U", base, teacher_steps=args.teacher_steps,
                       extra_steps=args.extra_steps, eval_offset=args.labelled + args.pool,
                       eval_identities=args.held_out, eval_pairs=args.pairs, eval_folds=10, seed=seed,
                       gcn_kwargs=dict(k1=2 * args.images, k2=5, k_adj=5, hidden=64, layers=2, epochs=8, lr=5e-3))
        v = r["verification"]
        print(json.dumps({"seed": seed, **{k: round(v[k]["acc"], 4) for k in v},
                          **{f"{k}_auc": round(v[k]["auc"], 4) for k in v},
                          "pool_pairwise_f": round(r["clustering"]["pairwise_f"], 3),
                          "pool_bcubed_f": round(r["clustering"]["bcubed_f"], 3),
                          "pseudo_identities": r["pseudo_identities"], "pseudo_images": r["pseudo_images"],
                          "pseudo_purity": round(r["pseudo_purity"], 3), "wall_s": round(r["wall_s"])}), flush=True)
        reports.append(r)
    gain = np.array([r["verification"]["self_train"]["acc"] - r["verification"]["control"]["acc"] for r in reports])
    print(f"self-train − control accuracy: mean {gain.mean():+.4f}, sd {gain.std(ddof=1) if gain.size > 1 else 0:.4f}, "
          f"per seed {np.round(gain, 4).tolist()}")
    (work / "summary.json").write_text(json.dumps(reports, indent=1, default=float))
    print(f"reports: {work}/summary.json")


if __name__ == "__main__":
    main()
