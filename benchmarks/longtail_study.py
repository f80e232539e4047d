"""Long-tail study: which losses help the identities with few training images?

Every run trains the same backbone (iresnet_tiny, small base width, small images) for
the same number of steps with the same data order per seed, through the real
``Trainer`` with a config from ``load_config(None, overrides)``; only ``head.loss`` and
``aux_losses`` differ between methods. The training set is the synthetic face
generator with power-law class sizes (``data.synthetic.exponent``).

Evaluation, per run (10-fold verification accuracy, threshold chosen on 9 folds):
* ``overall``: the trainer's own held-out set — pairs of identities never trained on
  (identities [N, N + M) of the generator).
* ``head`` / ``tail``: pairs among *training* identities, ranked by their image count:
  ``head`` = the most frequent identities (ids [0, n_head); counts are non-increasing
  in the id), ``tail`` = the least frequent ones (the last n_tail ids, all at
  ``min_images``). Every image of these pairs is a *fresh* sample of the identity
  (the "verification" sample indices, never used in training) and both sides of a
  different-identity pair come from the same group. This measures how well the
  embedding separates people it was trained on as a function of how many images it
  had of them — the claim of the range-loss paper. Held-out identities have no image
  count, so head/tail cannot be defined on them; this is the choice documented in
  RESULTS.md.

The dataset (``data.synthetic.seed``) and the evaluation pairs are fixed; the seeds
vary ``experiment.seed`` (backbone and head initialisation, batch order). Results go to
a JSON file and a Markdown table (mean ± sample std over seeds).

    python benchmarks/longtail_study.py --out runs/longtail   # the full study
    python benchmarks/longtail_study.py --steps 20 --seeds 0 --methods softmax --out /tmp/lt
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dpface.config import load_config
from dpface.data.config import DataConfig
from dpface.data.synthetic.faces import long_tail_counts
from dpface.data.synthetic.pairs import make_verification_pairs
from dpface.engine.trainer import Trainer
from dpface.eval import evaluate_pairs

RANGE = {"name": "range", "weight": 0.05, "k": 2, "margin": 1.0, "normalize": True}
METHODS = {
    "softmax": {"loss": {"name": "softmax"}},
    "arcface": {"loss": {"name": "arcface", "s": 32.0, "m": 0.4}},
    "cosface": {"loss": {"name": "cosface", "s": 32.0, "m": 0.35}},
    "arcface+range": {"loss": {"name": "arcface", "s": 32.0, "m": 0.4}, "aux": [RANGE]},
    "softmax+range": {"loss": {"name": "softmax"}, "aux": [RANGE]},
    "km": {"loss": {"name": "km", "gamma": 2.0}},
    "km+center": {"loss": {"name": "km", "gamma": 2.0},
                  "aux": [{"name": "center", "weight": 0.003, "alpha": 0.5}]},
}


def flow(value) -> str:
    """A value as YAML flow text for a dotted override."""
    return json.dumps(value)


def overrides(args, method: dict, seed: int, out: Path) -> list[str]:
    model = {"name": "iresnet_tiny", "base_width": args.base_width, "input_size": args.image_size}
    synthetic = {"num_identities": args.identities, "max_images": args.max_images,
                 "min_images": args.min_images, "exponent": args.exponent,
                 "difficulty": args.difficulty, "seed": 0}
    return [
        f"experiment.name=s{seed}", f"experiment.output_dir={out}", f"experiment.seed={seed}",
        "experiment.device=cpu", f"model={flow(model)}",
        f"head.embedding_size={args.embedding_size}", f"head.loss={flow(method['loss'])}",
        f"aux_losses={flow(method.get('aux', []))}",
        f"data.batch_size={args.batch_size}", "data.num_workers=1",
        f"data.image_size={args.image_size}", f"data.synthetic={flow(synthetic)}",
        f"train.steps={args.steps}", f"train.lr={args.lr}", "train.warmup_steps=20",
        "train.log_every=50", "train.ckpt_every=0", "train.keep_checkpoints=1",
        f"eval.num_identities={args.eval_identities}", f"eval.num_pairs={args.pairs}",
        "eval.fars=[0.1]", "wandb.enabled=false",
    ]


def group_pairs(args):
    """Verification pairs among the most and the least frequent training identities."""
    counts = long_tail_counts(args.identities, args.max_images, args.min_images, args.exponent)
    n_head = n_tail = args.group_identities
    common = dict(num_pairs=args.pairs, seed=0, image_size=args.image_size,
                  difficulty=args.difficulty)
    head = make_verification_pairs(identity_offset=0, num_identities=n_head, **common)
    tail = make_verification_pairs(identity_offset=args.identities - n_tail,
                                   num_identities=n_tail, **common)
    info = {"head_ids": [0, n_head], "head_images": [int(counts[n_head - 1]), int(counts[0])],
            "tail_ids": [args.identities - n_tail, args.identities],
            "tail_images": [int(counts[-1]), int(counts[args.identities - n_tail])],
            "train_images": int(counts.sum())}
    return {"head": head, "tail": tail}, info


class RenderedDataset(torch.utils.data.Dataset):
    """The training set rendered once into memory: the same items in the same order
    (so the same batches), without re-rendering every image every epoch (the
    procedural renderer costs ~0.7 ms per image, as much as a training step here)."""

    def __init__(self, dataset):
        items = [dataset[i] for i in range(len(dataset))]
        self.images = torch.stack([img for img, _ in items])
        self.targets = torch.tensor([lab for _, lab in items])
        self.num_classes = dataset.num_classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


class CachedStreams:
    """Wraps ``DataConfig.build``: the synthetic data set of the stream it builds is
    swapped for its in-memory rendering (built once per study)."""

    def __init__(self, build_stream):
        self.build_stream, self.cache = build_stream, None

    def __call__(self, data_cfg, ctx, seed):
        stream = self.build_stream(data_cfg, ctx, seed)
        if self.cache is None:
            self.cache = RenderedDataset(stream.dataset)
        if len(self.cache) != len(stream.dataset):
            raise RuntimeError("every run of the study must use the same training set")
        stream.dataset, stream.num_workers = self.cache, 0
        return stream


def run_one(args, name: str, seed: int, groups, out: Path) -> dict:
    cfg = load_config(None, overrides(args, METHODS[name], seed, out / name.replace("+", "_")))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, overwrite=True)  # a rerun of the study starts each run over
    try:
        final = trainer.fit()
    finally:
        trainer.logger.close()
    res = {"method": name, "seed": seed, "overall": final["synthetic/acc"],
           "overall_auc": final["synthetic/auc"]}
    for g, p in groups.items():
        r = evaluate_pairs(trainer.backbone, p.images_a, p.images_b, p.issame, folds=p.fold,
                           batch_size=256, device="cpu", flip=True, fars=(0.1,))
        res[g], res[f"{g}_auc"] = r.accuracy, r.auc
    res["seconds"] = time.perf_counter() - t0
    return res


def summarise(results: list[dict], methods: list[str]) -> str:
    keys = ["overall", "head", "tail", "overall_auc", "head_auc", "tail_auc"]
    lines = ["| method | " + " | ".join(keys) + " | tail − head |",
             "|---|" + "---:|" * (len(keys) + 1)]
    for m in methods:
        rows = [r for r in results if r["method"] == m]
        if not rows:
            continue

        def ms(vals, pct=True):
            f = 100.0 if pct else 1.0
            mean = statistics.fmean(vals) * f
            sd = statistics.stdev(vals) * f if len(vals) > 1 else float("nan")
            return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.3f} ± {sd:.3f}"

        cells = [ms([r[k] for r in rows], pct=not k.endswith("auc")) for k in keys]
        gap = ms([r["tail"] - r["head"] for r in rows])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/longtail")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--base-width", type=int, default=8)
    ap.add_argument("--embedding-size", type=int, default=64)
    ap.add_argument("--identities", type=int, default=400)
    ap.add_argument("--max-images", type=int, default=200)
    ap.add_argument("--min-images", type=int, default=4)
    ap.add_argument("--exponent", type=float, default=0.7)
    ap.add_argument("--difficulty", type=float, default=1.0)
    ap.add_argument("--eval-identities", type=int, default=100)
    ap.add_argument("--group-identities", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    # One thread: on a shared 2-core machine two OpenMP threads contend with the other
    # jobs and a step ran ~10× slower than with one (measured: 335 vs 36 ms).
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    groups, info = group_pairs(args)
    print(f"groups: {info} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # The trainer builds its stream through the data config; the study's wrapper only
    # changes where the (identical) images come from.
    cached = CachedStreams(DataConfig.build)
    DataConfig.build = lambda data_cfg, ctx, seed: cached(data_cfg, ctx, seed)
    results = []
    for seed in args.seeds:  # seed-major: an interrupted study still covers every method
        for name in args.methods:
            r = run_one(args, name, seed, groups, out)
            results.append(r)
            print(json.dumps(r), flush=True)
            (out / "results.json").write_text(json.dumps(
                {"args": vars(args), "groups": info, "methods": {m: METHODS[m] for m in args.methods},
                 "results": results, "torch_threads": torch.get_num_threads(),
                 "wall_s": time.perf_counter() - t0}, indent=1))
    table = summarise(results, args.methods)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
