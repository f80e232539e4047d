"""Starting from what exists (issue 21), measured through `dpface train`:

* **fine-tune vs scratch**: the demo's recipe trains a source network on one universe of
  synthetic identities (``data.synthetic.seed`` 0). New identities come from another
  universe (seed 1: different faces altogether). The same backbone trains on them for the
  same steps, once from random weights and once from the source (``train.init_from``, a
  new head, the backbone frozen for the first ``--freeze`` steps and then at
  ``backbone_lr_scale``); both are verified on held-out identities of the new universe.
* **distillation**: a small student (iresnet_tiny at base width 8) trained alone vs the
  same student with ``aux_losses: [{name: distill, teacher: T}]`` for the same steps, on
  the new universe, with two teachers: the source itself (trained on the other universe
  only) and the fine-tuned network of seed 0 (trained on the new universe too, the usual
  setting), three kinds and weights, and a 64-d student whose embedding reaches the
  teacher's 128 through the learned projection; each teacher's own figure beside them.

Seeds vary ``experiment.seed`` (initialisation, batch order); the data and the pairs are
fixed. Results: a JSON file and a Markdown table (mean ± sample std over seeds).

    python benchmarks/start_from_trained.py --out runs/start_from_trained
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "cpu_demo.yaml"
NEW = ["data.synthetic={num_identities: 100, max_images: 30, min_images: 6, exponent: 0.8, seed: 1}",
       "eval.num_identities=100", "eval.num_pairs=600"]


def train(out: Path, name: str, *overrides: str) -> dict:
    run = out / name
    if not (run / "final_metrics.json").is_file():
        cmd = [sys.executable, "-m", "dpface", "train", "--config", str(DEMO), f"experiment.output_dir={out}",
               f"experiment.name={name}", "wandb.enabled=false", *overrides]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((run / "final_metrics.json").read_text())


def evaluate(out: Path, run: str) -> dict:
    """The verification of ``run``'s checkpoint on the new universe's held-out pairs."""
    cmd = [sys.executable, "-m", "dpface", "eval", "--checkpoint", str(out / run), *NEW]
    res = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    return json.loads(res.stdout[res.stdout.index("{"):])


def stats(values: list[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/start_from_trained"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--freeze", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    out = args.out.resolve()
    t0 = time.time()
    train(out, "source")  # the demo recipe as it ships: 200 steps on universe 0
    source = out / "source"
    common = [*NEW, f"train.steps={args.steps}", "train.warmup_steps=10", "train.log_every=50"]
    rows: dict[str, list[float]] = {}
    for seed in args.seeds:
        s = f"experiment.seed={seed}"
        runs = {
            "scratch": train(out, f"scratch-{seed}", *common, s),
            "fine-tuned": train(out, f"finetune-{seed}", *common, s, f"train.init_from={source}",
                                f"train.freeze_backbone_steps={args.freeze}", "train.backbone_lr_scale=0.3"),
            "student alone": train(out, f"student-{seed}", *common, s, "model={name: iresnet_tiny, base_width: 8}"),
            "student distilled from the source": train(
                out, f"distilled-{seed}", *common, s, "model={name: iresnet_tiny, base_width: 8}",
                f"aux_losses=[{{name: distill, teacher: {source}, kind: cosine, weight: 4.0}}]"),
        }
        # the fine-tuned network of seed 0 as the teacher (trained on the new universe)
        train(out, "finetune-0", *common, "experiment.seed=0", f"train.init_from={source}",
              f"train.freeze_backbone_steps={args.freeze}", "train.backbone_lr_scale=0.3")
        teacher = out / "finetune-0"
        runs["student distilled from the fine-tuned net"] = train(
            out, f"distilled-ft-{seed}", *common, s, "model={name: iresnet_tiny, base_width: 8}",
            f"aux_losses=[{{name: distill, teacher: {teacher}, kind: cosine, weight: 4.0}}]")
        runs["… cosine, weight 1"] = train(
            out, f"kd-cos1-{seed}", *common, s, "model={name: iresnet_tiny, base_width: 8}",
            f"aux_losses=[{{name: distill, teacher: {teacher}, kind: cosine, weight: 1.0}}]")
        runs["… relation, weight 10"] = train(
            out, f"kd-rel10-{seed}", *common, s, "model={name: iresnet_tiny, base_width: 8}",
            f"aux_losses=[{{name: distill, teacher: {teacher}, kind: relation, weight: 10.0}}]")
        # a 64-d student: the teacher's 128-d embedding is reached through the learned projection
        small = [*common, s, "model={name: iresnet_tiny, base_width: 8}", "head.embedding_size=64"]
        runs["64-d student alone"] = train(out, f"kd-alone64-{seed}", *small)
        runs["64-d student distilled (l2 through the learned projection, weight 4)"] = train(
            out, f"kd-proj64-l2-{seed}", *small,
            f"aux_losses=[{{name: distill, teacher: {teacher}, kind: l2, weight: 4.0}}]")
        runs["128-d student distilled (l2, projection: always, weight 4)"] = train(
            out, f"kd-proj128-l2-{seed}", *common, s, "model={name: iresnet_tiny, base_width: 8}",
            f"aux_losses=[{{name: distill, teacher: {teacher}, kind: l2, projection: always, weight: 4.0}}]")
        for k, m in runs.items():
            rows.setdefault(k, []).append(m["synthetic/acc"])
    teacher = evaluate(out, "source")["synthetic/acc"]
    teacher_ft = json.loads((out / "finetune-0" / "final_metrics.json").read_text())["synthetic/acc"]
    result = {"steps": args.steps, "freeze": args.freeze, "seeds": args.seeds,
              "acc": rows, "teacher_acc": {"source": teacher, "fine-tuned seed 0": teacher_ft},
              "wall_s": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| run (held-out identities of a new universe) | accuracy % (mean ± std) |", "|---|---|"]
    lines += [f"| {k} | {stats(v)} |" for k, v in rows.items()]
    lines.append(f"| teacher: the source itself, no training on the new universe | {100 * teacher:.2f} |")
    lines.append(f"| teacher: the fine-tuned network of seed 0 | {100 * teacher_ft:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
