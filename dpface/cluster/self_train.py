"""Self-training on clustered unlabelled faces, through the real trainer.

1. The labelled set is copied into a shard set whose class count reserves ``reserve``
   classes past its own C (empty for now), so the head already has the rows the pseudo
   identities will take: a run can then continue (``train(cfg, resume=…)``) on a set with
   more identities, which a resume requires to have the same class count.
2. A teacher trains on it (``data.backend: webdataset``).
3. The teacher's backbone embeds the labelled set (to train the linkage GCN) and the
   unlabelled pool; the GCN clusters the pool; clusters of at least ``min_cluster_size``
   images (the largest ``reserve`` of them) become identities C, C+1, …
4. A merged set (labelled + pseudo-labelled images) is written with the same class count
   and shard count (a WebDataset position continues only on the same number of shards).
5. Two continuations of the teacher's checkpoint, equal in steps: on the merged set
   (self-training) and on the labelled set alone (the control: what the extra steps give
   without the pool). Verification on held-out identities: teacher, control, self-trained.

Only public entry points of the trainer are used: ``dpface.config.load_config`` and
``dpface.engine.trainer.train`` (with ``resume``); the checkpoint's backbone is read back
with the loader ``dpface eval`` uses.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .knn import ClusterError


def write_set(out_dir, samples: Iterable[tuple[bytes, int, dict | None]], total: int, num_classes: int,
              num_shards: int, image_size: int | None, source: str, params: dict) -> dict:
    """Write ``total`` samples (JPEG bytes, label, metadata) as exactly ``num_shards`` shards
    plus a manifest with ``num_classes`` classes (labels must lie below it)."""
    from dpface.data.formats import shards as sh

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ClusterError(f"{out}: output directory is not empty")
    if total < num_shards:
        raise ClusterError(f"{total} samples cannot fill {num_shards} shards")
    counts = np.zeros(num_classes, np.int64)
    infos, it, index = [], iter(samples), 0
    for n in np.array_split(np.arange(total), num_shards):
        w = sh.ShardWriter(str(out), start_shard=len(infos), max_shard_bytes=1 << 40)
        try:
            for jpeg, label, meta in itertools.islice(it, len(n)):
                if not 0 <= label < num_classes:
                    raise ClusterError(f"label {label} outside [0, {num_classes})")
                w.write(sh.sample_key(index), jpeg, label, meta)
                counts[label] += 1
                index += 1
        except BaseException:
            w.abort()
            raise
        infos += w.close()
    if index != total:
        raise ClusterError(f"expected {total} samples, got {index}")
    manifest = sh.build_manifest(infos, counts, image_size, params, source=source)
    sh.write_manifest(str(out), manifest)
    return manifest


def _synthetic_range(manifest: dict) -> tuple[int, int] | None:
    p = manifest.get("params", {})
    if p.get("source") != "synthetic":
        return None
    lo = int(p.get("identity_offset", 0))
    return lo, lo + int(p["num_identities"])


def _check_disjoint(ranges: dict) -> None:
    known = {k: r for k, r in ranges.items() if r is not None}
    for (a, ra), (b, rb) in itertools.combinations(known.items(), 2):
        if ra[0] < rb[1] and rb[0] < ra[1]:
            raise ClusterError(f"synthetic identities of the {a} set {list(ra)} and the {b} set {list(rb)} "
                               "overlap: self-training needs them disjoint")


def shards_override(manifest) -> str:
    """The override naming a shard set's manifest."""
    return f"data.shards.manifest={manifest}"


def verification(backbone, pairs, cfg) -> dict:
    from dpface.eval.verification import evaluate_pairs

    r = evaluate_pairs(backbone, pairs.images_a, pairs.images_b, pairs.issame, folds=pairs.fold,
                       batch_size=cfg.eval.batch_size, flip=cfg.eval.flip, num_folds=int(pairs.fold.max()) + 1,
                       fars=(0.1, 0.01))
    return {"acc": r.accuracy, "acc_std": r.accuracy_std, "auc": r.auc,
            **{f"tar@far={k:g}": v for k, v in r.tar_at_far.items()}}


def self_train(work_dir, labelled, pool, base_overrides: list[str], *, teacher_steps: int, extra_steps: int,
               eval_offset: int, eval_identities: int, eval_pairs: int = 200, eval_folds: int = 5,
               gcn_kwargs: dict | None = None, reserve: int | None = None, min_cluster_size: int = 2,
               threshold: float | None = None, control: bool = True, seed: int = 0,
               log: Callable[[str], None] = print) -> dict:
    """Run steps 1–5 of the module docstring under ``work_dir``; returns the report (also
    written to ``work_dir/report.json``). ``labelled``/``pool``: manifests of converted sets
    (the pool's labels are used only to score the clustering); ``base_overrides``: the
    trainer's config overrides (model, head, batch size, …), to which the data set, run
    directory, steps and seed are added here; held-out verification pairs come from the
    synthetic identities [eval_offset, eval_offset + eval_identities)."""
    from dpface.config import load_config
    from dpface.data.formats.shards import load_manifest
    from dpface.data.synthetic.pairs import make_verification_pairs
    from dpface.engine.trainer import train

    from . import metrics
    from .embed import embed_manifest, iter_samples, load_backbone
    from .gcn import cluster, train_gcn

    work = Path(work_dir)
    t_start = time.perf_counter()
    m_l, m_p = load_manifest(str(labelled)), load_manifest(str(pool))
    p_l = m_l.get("params", {})
    _check_disjoint({"labelled": _synthetic_range(m_l), "pool": _synthetic_range(m_p),
                     "held-out": (eval_offset, eval_offset + eval_identities)})
    if m_p["num_images"] < 1:
        raise ClusterError(f"{pool}: empty pool")
    c = int(m_l["num_classes"])
    r = int(reserve if reserve is not None else m_p["num_images"] // max(min_cluster_size, 1))
    if r < 1:
        raise ClusterError(f"reserve must be >= 1 (classes kept for pseudo identities), got {r}")
    n_shards, size = len(m_l["shards"]), m_l.get("image_size")
    items = [(jpeg, label, None) for _, _, jpeg, label in iter_samples(str(labelled))]
    padded = work / "labelled"
    write_set(padded, items, len(items), c + r, n_shards, size, "self-train: labelled",
              {"labelled": str(labelled), "reserved": r})
    runs = work / "runs"

    def run(name: str, shards: Path, steps: int, resume: str | None = None):
        cfg = load_config(None, [*base_overrides, "data.backend=webdataset", shards_override(shards),
                                 f"experiment.output_dir={runs}", f"experiment.name={name}",
                                 f"train.steps={steps}", f"experiment.seed={seed}"])
        t0 = time.perf_counter()
        train(cfg, resume=resume)
        log(f"self-train: {name}: {steps - (teacher_steps if resume else 0)} steps in {time.perf_counter() - t0:.1f} s")
        return load_backbone(runs / name)

    teacher, cfg, teacher_ckpt = run("teacher", padded / "manifest.json", teacher_steps)
    img = cfg.data.image_size
    t0 = time.perf_counter()
    x_l, y_l, _ = embed_manifest(teacher, padded / "manifest.json", img, batch_size=cfg.eval.batch_size,
                                 flip=cfg.eval.flip)
    x_u, y_u, _ = embed_manifest(teacher, pool, img, batch_size=cfg.eval.batch_size, flip=cfg.eval.flip)
    t_embed = time.perf_counter() - t0
    gcn, gcn_info = train_gcn(x_l, y_l, seed=seed, **(gcn_kwargs or {}))
    labels, times = cluster(gcn, x_u, threshold=threshold, name="pool embeddings")
    scores = metrics.all_metrics(labels, y_u)
    sizes = np.bincount(labels)  # canonical: cluster 0 is the largest
    kept = np.nonzero(sizes >= min_cluster_size)[0][:r]
    pseudo = np.full(labels.size, -1, np.int64)
    pseudo[np.isin(labels, kept)] = c + labels[np.isin(labels, kept)]
    used = pseudo >= 0
    log(f"self-train: pool of {labels.size} → {sizes.size} clusters, {kept.size} kept as identities "
        f"({int(used.sum())} images); pairwise F {scores['pairwise_f']:.3f}, BCubed F {scores['bcubed_f']:.3f}")
    pool_items = ((jpeg, int(pseudo[i]), None)
                  for i, (_, _, jpeg, _) in enumerate(iter_samples(str(pool))) if used[i])
    merged = work / "merged"
    write_set(merged, itertools.chain(items, pool_items), len(items) + int(used.sum()), c + r, n_shards, size,
              "self-train: labelled + pseudo-labelled pool", {"labelled": str(labelled), "pool": str(pool),
                                                             "pseudo_identities": int(kept.size)})
    arms = {"self_train": run("self_train", merged / "manifest.json", teacher_steps + extra_steps,
                              str(teacher_ckpt))[0]}
    if control:
        arms["control"] = run("control", padded / "manifest.json", teacher_steps + extra_steps,
                              str(teacher_ckpt))[0]
    s = cfg.data.synthetic
    pairs = make_verification_pairs(eval_pairs, eval_offset, eval_identities, seed=int(p_l.get("seed", s.seed)),
                                    image_size=img, difficulty=float(p_l.get("difficulty", s.difficulty)),
                                    num_folds=eval_folds)
    verif = {"teacher": verification(teacher, pairs, cfg)}
    verif.update({k: verification(b, pairs, cfg) for k, b in arms.items()})
    # Purity of the kept pseudo identities: how many of their images the majority identity holds.
    purity = float(sum(np.bincount(y_u[labels == k]).max() for k in kept) / max(int(used.sum()), 1))
    report = {"seed": seed, "teacher_steps": teacher_steps, "extra_steps": extra_steps,
              "labelled_classes": c, "reserved_classes": r, "pool_images": int(labels.size),
              "pool_identities": int(np.unique(y_u).size), "pseudo_identities": int(kept.size),
              "pseudo_images": int(used.sum()), "pseudo_purity": purity, "clustering": scores,
              "gcn": {k: v for k, v in gcn_info.items() if k != "losses"}, "cluster_times_s": times,
              "embed_s": t_embed, "verification": verif,
              "held_out": {"identity_offset": eval_offset, "identities": eval_identities, "pairs": eval_pairs,
                           "folds": eval_folds},
              "wall_s": time.perf_counter() - t_start}
    (work / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report
