"""The adaptive margins (issue 22), measured:

* **quality**: the demo's recipe (iresnet_tiny, 200 steps on 200 synthetic identities, s = 32)
  trained with ArcFace (the demo's m = 0.4) and with AdaFace, MagFace, CurricularFace and
  ElasticFace-Arc at their papers' margins, 3 seeds (``experiment.seed``: initialisation and
  batch order; the data and the pairs are fixed). Each is verified on 1,200 held-out pairs
  (10-fold accuracy, thresholds chosen on the other folds), overall and on the pairs whose
  worse image is among the most degraded third (``SyntheticFaces.degradation``: blur, noise,
  occlusion as the generator applied them) and the least degraded third.
* **speed**: one PartialFC step (forward + backward, one process) per loss with the
  reference head, the fused op and the chunked op, side by side on the same shapes.

Results: a JSON file and Markdown tables (mean ± sample std over seeds).

    python benchmarks/adaptive_margins.py --out runs/adaptive_margins
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from start_from_trained import DEMO, stats, train  # the demo's training run and mean ± std, shared

LOSSES = {
    "ArcFace (m 0.4)": "{name: arcface, s: 32, m: 0.4}",
    "AdaFace (m 0.4, h 0.333)": "{name: adaface, s: 32, m: 0.4}",
    "MagFace (m 0.45-0.8, a 10-110, lambda_g 35)": "{name: magface, s: 32}",
    "CurricularFace (m 0.5)": "{name: curricularface, s: 32, m: 0.5}",
    "ElasticFace-Arc (m 0.5, sigma 0.05)": "{name: elasticface, s: 32, m: 0.5, sigma: 0.05}",
}
EVAL_PAIRS = 1200


def quality_split(cfg):
    """The held-out pairs of the demo's data and each pair's degradation (its worse image)."""
    from dpface.data.synthetic.pairs import make_verification_pairs

    s = cfg.data.synthetic
    p = make_verification_pairs(num_pairs=EVAL_PAIRS, identity_offset=s.num_identities,
                                num_identities=cfg.eval.num_identities, seed=s.seed,
                                image_size=cfg.data.image_size, difficulty=s.difficulty, num_folds=cfg.eval.folds)
    return p, np.maximum(p.degradation_a, p.degradation_b)


def verify(run: Path, pairs, worse: np.ndarray) -> dict:
    from dpface.eval.embeddings import extract_embeddings
    from dpface.eval.verification import kfold_accuracy, pair_scores
    from dpface.restore import load_backbone

    backbone = load_backbone(run).backbone
    scores = pair_scores(extract_embeddings(backbone, pairs.images_a), extract_embeddings(backbone, pairs.images_b))
    lo, hi = np.quantile(worse, [1 / 3, 2 / 3])
    out = {}
    for name, keep in (("all", np.ones_like(worse, bool)), ("low quality", worse >= hi), ("high quality", worse <= lo)):
        accs, _ = kfold_accuracy(scores[keep], pairs.issame[keep], folds=pairs.fold[keep])
        out[name] = float(np.mean(accs))
    return out


def quality(out: Path, seeds: list[int]) -> tuple[dict, str]:
    from dpface.config import load_config

    cfg = load_config(str(DEMO), [])
    pairs, worse = quality_split(cfg)
    results: dict[str, list[dict]] = {}
    for seed in seeds:
        for label, spec in LOSSES.items():
            key = label.split(" ")[0].lower()
            train(out, f"{key}-{seed}", f"head.loss={spec}", f"experiment.seed={seed}")
            results.setdefault(label, []).append(verify(out / f"{key}-{seed}", pairs, worse))
    lines = ["| loss | all pairs | low-quality third | high-quality third |", "|---|---|---|---|"]
    for label, rows in results.items():
        lines.append(f"| {label} | " + " | ".join(stats([r[k] for r in rows])
                                                  for k in ("all", "low quality", "high quality")) + " |")
    split = (f"{EVAL_PAIRS} pairs; degradation of a pair's worse image: low-quality third >= "
             f"{np.quantile(worse, 2 / 3):.2f}, high-quality third <= {np.quantile(worse, 1 / 3):.2f} (of 0-3)")
    return results, split + "\n\n" + "\n".join(lines)


def step_times(batch: int, dim: int, classes: int, rate: float, iters: int) -> tuple[dict, str]:
    """ms per PartialFC forward + backward of each loss and head path, side by side."""
    from dpface import ops
    from dpface.heads import PartialFC
    from dpface.losses import build_loss

    torch.manual_seed(0)
    x = torch.randn(batch, dim) * 8
    y = torch.randint(0, classes, (batch,))
    kernels = ["reference", *(["fused", "chunked"] if ops.available("cpu") else [])]
    table: dict[str, dict[str, float]] = {}
    for label, spec in LOSSES.items():
        for kernel in kernels:
            head = PartialFC(dim, classes, build_loss(yaml.safe_load(spec)), sample_rate=rate, kernel=kernel)
            times = []
            for step in range(iters + 2):
                xr = x.clone().requires_grad_(True)
                t0 = time.perf_counter()
                head(xr, y, step).loss.backward()
                times.append(time.perf_counter() - t0)
                head.weight.grad = None
            table.setdefault(label, {})[kernel] = 1e3 * statistics.median(times[2:])
    lines = ["| loss | " + " | ".join(f"{k} ms" for k in kernels) + " | reference / fused |",
             "|---|" + "---|" * (len(kernels) + 1)]
    for label, t in table.items():
        ratio = f"{t['reference'] / t['fused']:.2f}x" if "fused" in t else "-"
        lines.append(f"| {label} | " + " | ".join(f"{t[k]:.1f}" for k in kernels) + f" | {ratio} |")
    shape = (f"B = {batch}, D = {dim}, {classes:,} classes at sample rate {rate}, one process, "
             f"{torch.get_num_threads()} threads; median of {iters} steps")
    return table, shape + "\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/adaptive_margins"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--part", choices=["quality", "speed", "both"], default="both")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=7)
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report, tables = {}, []
    t0 = time.time()
    if args.part in ("speed", "both"):
        report["speed"], md = step_times(args.batch, args.dim, args.classes, args.rate, args.iters)
        tables.append("### Step time\n\n" + md)
    if args.part in ("quality", "both"):
        report["quality"], md = quality(out, args.seeds)
        tables.append("### Verification by image quality\n\n" + md)
    report["seconds"] = round(time.time() - t0)
    (out / f"results-{args.part}.json").write_text(json.dumps(report, indent=1))
    text = "\n\n".join(tables) + f"\n\n({report['seconds']} s)\n"
    (out / f"results-{args.part}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
