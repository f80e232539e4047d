"""Set pooling study: does quality-aware pooling (QAN) beat mean and norm pooling on
templates of mixed quality?

Per seed, one backbone (``qan`` around ``iresnet_tiny``, 32 px) is trained jointly with
its quality branch on degraded synthetic faces (``dpface.data.templates.DegradedFaceDataset``:
half the images very poor) by a plain-torch loop: P×K batches (``PKBatchSampler``),
ArcFace through ``FullFC`` on every image plus ``weight ×`` the set-to-set loss
(``qan_set``) on quality-pooled sets; the branch learns only from the latter. Then the
*same* trained backbone is evaluated on held-out identities' templates
(``make_templates``) with every pooling (``evaluate_set_poolings``): mean, norm
(‖x‖ weights, training-free) and qan, plus an oracle pooling weighted by the known
degradation (1 − u), as a reference for what quality weighting could gain.

Reports 1:1 template TAR@FAR (1e-2, 1e-1) and 1:N rank-1, mean ± sample std over seeds.
The data set and the templates are fixed (``--data-seed``); seeds vary initialisation and
batch order.

    python benchmarks/set_pooling.py --out runs/set_pooling.json          # 3 seeds, ~10 min
    python benchmarks/set_pooling.py --steps 30 --seeds 0 --out /tmp/sp.json  # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dpface.data.streams.pk_sampler import PKBatchSampler
from dpface.data.synthetic.templates import DegradedFaceDataset, make_templates
from dpface.data.transforms import normalize
from dpface.eval.sets import evaluate_set_poolings
from dpface.heads.full_fc import FullFC
from dpface.losses import AUX_LOSSES, LOSSES
from dpface.models import build_backbone

FARS = (1e-2, 1e-1)


def train_one(seed: int, images: torch.Tensor, labels: np.ndarray, args) -> torch.nn.Module:
    torch.manual_seed(seed)
    num_classes = int(labels.max()) + 1
    model = build_backbone({"name": "qan", "hidden": 32,
                            "base": {"name": "iresnet_tiny", "base_width": args.width,
                                     "input_size": args.image_size}}, embedding_size=args.dim)
    head = FullFC(args.dim, num_classes, LOSSES.build({"name": "arcface", "s": 32.0, "m": 0.3}), seed=seed)
    set_loss = AUX_LOSSES.build({"name": "qan_set", "set_size": args.set_size},
                                num_classes=num_classes, embedding_size=args.dim)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    sampler = PKBatchSampler(labels, args.p, args.k, seed=seed)
    lab_t = torch.from_numpy(labels)
    model.train()
    t0 = time.perf_counter()
    for step, idx in zip(range(args.steps), sampler):
        idx = torch.tensor(idx)
        x, y = normalize(images[idx]), lab_t[idx]
        emb, q = model(x, with_quality=True)
        cls = head(emb, y, step).loss
        st = set_loss(emb, y, step, q)
        loss = cls + args.set_weight * st
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  seed {seed} step {step:4d}  cls {cls.item():.3f}  set {st.item():.3f}  "
                  f"q {q.min().item():.2f}..{q.max().item():.2f}  {time.perf_counter() - t0:.0f}s",
                  flush=True)
    return model


def summary(runs: list[dict], key) -> tuple[float, float]:
    vals = [key(r) for r in runs]
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--identities", type=int, default=200)
    ap.add_argument("--eval-identities", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--set-size", type=int, default=2)
    ap.add_argument("--set-weight", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--poor-fraction", type=float, default=0.5)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats are slow on x86 CPUs; they carry nothing here

    t0 = time.perf_counter()
    ds = DegradedFaceDataset(args.identities, seed=args.data_seed, image_size=args.image_size,
                             max_images=24, min_images=8, exponent=0.5, poor_fraction=args.poor_fraction)
    images = torch.stack([ds[i][0] for i in range(len(ds))])  # rendered once, shared by seeds
    labels = ds.labels
    tmpl = make_templates(args.eval_identities, identity_offset=args.identities, templates_per_identity=3,
                          min_images=2, max_images=6, poor_fraction=args.poor_fraction,
                          seed=args.data_seed, image_size=args.image_size)
    oracle = {"oracle(1-u)": 1.0 - tmpl.degradation + 1e-3}
    print(f"data: {len(ds)} training images of {args.identities} identities; {len(tmpl)} template "
          f"images, {tmpl.num_templates} templates, {len(tmpl.pairs)} pairs "
          f"({int(tmpl.issame.sum())} genuine); {time.perf_counter() - t0:.0f}s", flush=True)

    runs = []
    for seed in args.seeds:
        model = train_one(seed, images, labels, args)
        r = evaluate_set_poolings(model, tmpl, fars=FARS, extra_weights=oracle)
        r["seed"] = seed
        runs.append(r)
        print(f"seed {seed}: " + "  ".join(
            f"{k}: TAR@1e-2 {v['tar_at_far'][1e-2]:.3f} TAR@1e-1 {v['tar_at_far'][1e-1]:.3f} "
            f"rank1 {v['rank1']:.3f}" for k, v in r.items() if isinstance(v, dict) and "rank1" in v)
            + f"  spearman(q, u) {r['quality']['spearman_vs_degradation']:.3f}", flush=True)

    names = [k for k in runs[0] if isinstance(runs[0][k], dict) and "rank1" in runs[0][k]]
    table = {}
    lines = ["| pooling | TAR@FAR=1e-2 | TAR@FAR=1e-1 | rank-1 |", "|---|---|---|---|"]
    for n in names:
        cols = {}
        for label, key in (("tar@1e-2", lambda r, n=n: r[n]["tar_at_far"][1e-2]),
                           ("tar@1e-1", lambda r, n=n: r[n]["tar_at_far"][1e-1]),
                           ("rank1", lambda r, n=n: r[n]["rank1"])):
            cols[label] = summary(runs, key)
        table[n] = cols
        lines.append(f"| {n} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cols.values()) + " |")
    # Paired differences (same backbone, same seed): the comparison that matters.
    for a, b in (("qan", "mean"), ("qan", "norm"), ("norm", "mean")):
        if a in names and b in names:
            d = summary(runs, lambda r, a=a, b=b: r[a]["tar_at_far"][1e-2] - r[b]["tar_at_far"][1e-2])
            d1 = summary(runs, lambda r, a=a, b=b: r[a]["rank1"] - r[b]["rank1"])
            lines.append(f"| {a} − {b} (paired) | {d[0]:+.3f} ± {d[1]:.3f} | | {d1[0]:+.3f} ± {d1[1]:.3f} |")
    rho = summary(runs, lambda r: r["quality"]["spearman_vs_degradation"])
    lines.append(f"\nSpearman(qan quality, degradation u) over template images: {rho[0]:.3f} ± {rho[1]:.3f} "
                 f"(negative = lower quality for worse images); seeds {args.seeds}, "
                 f"{time.perf_counter() - t0:.0f}s total")
    text = "\n".join(lines)
    print(text)
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "runs": [{k: ({str(f): x for f, x in v["tar_at_far"].items()} | {"rank1": v["rank1"]}
                         if isinstance(v, dict) and "rank1" in v else v) for k, v in r.items()}
                    for r in runs],
           "summary": {n: {k: list(v) for k, v in c.items()} for n, c in table.items()},
           "table": text}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
