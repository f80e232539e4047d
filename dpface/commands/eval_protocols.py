"""The protocols of `dpface eval --protocol ijb|identification|sets` (their options are in
commands/eval.py): each runner returns its metrics and the plots it wrote; the protocol's
results join the run's model card and, when enabled, its W&B run."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dpface.commands.errors import InputError, err
from dpface.eval.identification import cmc, search, tpir_at_fpir
from dpface.eval.ijb import IJB_FARS, ProtocolError, evaluate_ijb_features, face_features, load_ijb
from dpface.eval.verification import auc, tar_key
from dpface.rundir import RunDir

FPIRS = (0.01, 0.1)
CMC_RANKS = (1, 5, 10)


def _counts(text: str) -> list[int]:
    if not text:
        return []
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--distractors: expected counts like 10,100,1000, got {text!r}") from None
    if out and out[0] < 0:
        raise InputError(f"--distractors: counts must be >= 0, got {text!r}")
    return out


# ----------------------------------------------------------------------------- verification


def verification_plots(rocs: dict, plots_dir: Path, step: int) -> list[Path]:
    """ROC (log FAR) and DET of every verification set; [] without matplotlib (said once,
    as the IJB and 1:N paths say it)."""
    from dpface.eval.plots import det_plots, roc_plots

    out = []
    for name, (fpr, tpr) in rocs.items():
        try:
            out.append(roc_plots({name: (fpr, tpr)}, plots_dir / f"roc-{name}-step{step:08d}.png",
                                 title=f"{name}, step {step}"))
            out.append(det_plots({name: (fpr, tpr)}, plots_dir / f"det-{name}-step{step:08d}.png",
                                 title=f"{name}, step {step}"))
        except ImportError:
            err("dpface eval: matplotlib not installed, no plots (pip install matplotlib, or dpface[eval])")
            return out
    return out


# ----------------------------------------------------------------------------- IJB


def _ijb_modes(args) -> list[tuple[bool, bool, bool]]:
    if args.all_modes:
        return [(f, n, d) for f in (True, False) for n in (True, False) for d in (True, False)]
    return [(not args.no_flip, not args.no_norm_score, not args.no_detector_score)]


def run_ijb(args, backbone, cfg, device, plots_dir: Path, step: int) -> tuple[dict, list]:
    if not args.ijb_dir:
        raise InputError("--protocol ijb needs --ijb-dir DIR (an IJB-format set; "
                            "`dpface convert synthetic-ijb DIR` writes a synthetic one)")
    modes = _ijb_modes(args)
    need_flip = any(m[0] for m in modes)
    metrics, plots = {}, []
    for d in args.ijb_dir:
        s = load_ijb(d)
        err(f"dpface eval: ijb {s.name}: {len(s)} faces, {np.unique(s.templates).size} templates, "
             f"{len(s.pairs)} pairs ({int(s.issame.sum())} genuine)")
        feats, flipped = face_features(backbone, s, batch_size=cfg.eval.batch_size, device=device,
                                       size=cfg.data.image_size, flip=need_flip)
        rocs = {}
        for flip, norm, det in modes:
            r = evaluate_ijb_features(s, feats, flipped, flip=flip, norm_score=norm,
                                      detector_score=det, fars=IJB_FARS, tar_convention=cfg.eval.tar_convention)
            key = f"ijb/{s.name}" + (f"/{r['mode']}" if len(modes) > 1 else "")
            for far, tar in r["tar_at_far"].items():
                metrics[f"{key}/{tar_key(far, cfg.eval.tar_convention)}"] = tar
            metrics[f"{key}/auc"] = auc(*r["roc"][:2])
            rocs[r["mode"]] = r["roc"][:2]
        try:
            from dpface.eval.plots import det_plots, roc_plots

            plots.append(roc_plots(rocs, plots_dir / f"ijb-{s.name}-roc-step{step:08d}.png",
                                   title=f"IJB {s.name}, step {step}"))
            plots.append(det_plots(rocs, plots_dir / f"ijb-{s.name}-det-step{step:08d}.png",
                                   title=f"IJB {s.name}, step {step}"))
        except ImportError:
            err("dpface eval: matplotlib not installed, no plots")
    return metrics, plots


def run_ijb_1n(args, backbone, cfg, device, plots_dir: Path, step: int) -> tuple[dict, list]:
    from dpface.eval.ijb_1n import evaluate_ijb_1n_features, load_ijb_1n

    if not args.ijb_dir:
        raise InputError("--protocol ijb-1n needs --ijb-dir DIR (an IJB-format set with its 1:N lists; "
                         "`dpface convert synthetic-ijb DIR` writes a synthetic one)")
    modes = _ijb_modes(args)
    metrics, plots = {}, []
    for d in args.ijb_dir:
        s = load_ijb_1n(d)
        err(f"dpface eval: ijb-1n {s.name}: {len(s.faces)} faces; galleries "
            + ", ".join(f"{k} ({v[0].size} templates)" for k, v in s.galleries.items())
            + f"; {s.probes[0].size} probe templates")
        feats, flipped = face_features(backbone, s.faces, batch_size=cfg.eval.batch_size, device=device,
                                       size=cfg.data.image_size, flip=any(m[0] for m in modes))
        for flip, norm, det in modes:
            r = evaluate_ijb_1n_features(s, feats, flipped, flip=flip, norm_score=norm, detector_score=det)
            key = f"ijb-1n/{s.name}" + (f"/{r['mode']}" if len(modes) > 1 else "")
            for gallery in (*s.galleries, "mean"):
                for k, v in r[gallery].items():
                    metrics[f"{key}/{gallery}/{k}"] = v
        try:
            from dpface.eval.plots import cmc_plot

            plots.append(cmc_plot(r["cmc"], plots_dir / f"ijb-1n-{s.name}-cmc-step{step:08d}.png",
                                  title=f"IJB 1:N {s.name} ({r['mode']}), step {step}"))
        except ImportError:
            err("dpface eval: matplotlib not installed, no plots")
    return metrics, plots


# ----------------------------------------------------------------------------- identification


def _read_images(paths, size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), np.uint8)
    for k, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out[k] = np.asarray(im)
        except Exception as e:
            raise ProtocolError(f"{p}: image does not decode: {type(e).__name__}: {e}") from None
    return out


_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in _EXTS and p.is_file())


def _folder_identification(id_dir, distractor_dir, size: int, nonmated: float, n_distract: int):
    root = Path(id_dir)
    if not root.is_dir():
        raise ProtocolError(f"--id-dir {root}: no such directory")
    people = [(d.name, _images_in(d)) for d in sorted(root.iterdir()) if d.is_dir()]
    people = [(n, imgs) for n, imgs in people if len(imgs) >= 2]
    if len(people) < 2:
        raise ProtocolError(f"--id-dir {root}: need >= 2 sub-folders with >= 2 images each")
    n_mated = len(people) - int(round(nonmated * len(people)))
    g_paths = [imgs[0] for _, imgs in people[:n_mated]]
    g_lab = np.array([n for n, _ in people[:n_mated]])
    p_paths = [p for _, imgs in people for p in imgs[1:]]
    p_lab = np.array([n for n, imgs in people for _ in imgs[1:]])
    dis = None
    if n_distract:
        if distractor_dir is None:
            raise ProtocolError("--distractors with --id-dir needs --distractor-dir")
        d_paths = _images_in(Path(distractor_dir))
        if len(d_paths) < n_distract:
            raise ProtocolError(f"--distractor-dir {distractor_dir}: {len(d_paths)} images, "
                                f"--distractors asks for {n_distract}")
        dis = _read_images(d_paths[:n_distract], size)
    return _read_images(g_paths, size), g_lab, _read_images(p_paths, size), p_lab, dis


def identification_metrics(g, gl, p, pl, d, counts) -> tuple[dict, dict]:
    """Metrics at each distractor count (0 always) and the curves for the plots."""
    metrics, curves = {}, {"cmc": {}, "distractors": ([], [])}
    for n in [0] + [c for c in counts if c]:
        r = search(g, gl, p, pl, d[:n] if n else None)
        if not r["mated"].any():
            raise ProtocolError("no probe identity is in the gallery: nothing to identify")
        tag = "ident" if n == 0 else f"ident/d={n}"
        for k, v in cmc(r, CMC_RANKS).items():
            metrics[f"{tag}/rank{k}"] = v
        if (~r["mated"]).any():
            for f, v in tpir_at_fpir(r, FPIRS).items():
                metrics[f"{tag}/tpir@fpir={f:g}"] = v
        ks = np.unique(np.geomspace(1, max(2, g.shape[0] + n), 30).astype(int))
        curves["cmc"][f"{n} distractors"] = (ks, [cmc(r, (int(k),))[int(k)] for k in ks])
        curves["distractors"][0].append(n)
        curves["distractors"][1].append(metrics[f"{tag}/rank1"])
    return metrics, curves


def run_identification(args, backbone, cfg, device, plots_dir: Path, step: int) -> tuple[dict, list]:
    from dpface.eval.embeddings import extract_embeddings

    counts = _counts(args.distractors)
    n_d = max(counts, default=0)
    if not 0 <= args.nonmated_fraction < 1:
        raise ProtocolError(f"--nonmated-fraction must be in [0, 1), got {args.nonmated_fraction}")
    if args.id_dir:
        g_img, gl, p_img, pl, d_img = _folder_identification(
            args.id_dir, args.distractor_dir, cfg.data.image_size, args.nonmated_fraction, n_d)
        source = str(args.id_dir)
    else:
        if cfg.data.backend != "synthetic":
            raise ProtocolError("--protocol identification needs --id-dir DIR, or a synthetic-data config")
        n_id = args.identities or cfg.eval.num_identities
        if n_id < 2 or args.probes_per_identity < 1:
            raise ProtocolError("--identities must be >= 2 and --probes-per-identity >= 1")
        from dpface.data.synthetic.identification import make_identification

        s = cfg.data.synthetic
        try:  # held-out identities start after the training ones
            g_img, gl, p_img, pl, d_img = make_identification(
                s.num_identities, n_id, args.probes_per_identity, args.nonmated_fraction, n_d,
                seed=s.seed, image_size=cfg.data.image_size, difficulty=s.difficulty)
        except ValueError as e:
            raise InputError(str(e)) from None
        source = "synthetic"
    err(f"dpface eval: identification ({source}): gallery {len(gl)}, probes {len(pl)} "
         f"({int(np.isin(pl, gl).sum())} mated), distractors up to {n_d}")

    def emb(x):
        return extract_embeddings(backbone, x, batch_size=cfg.eval.batch_size, device=device,
                                  flip=cfg.eval.flip)

    g, p = emb(g_img), emb(p_img)
    d = emb(d_img) if d_img is not None else None
    metrics, curves = identification_metrics(g, gl, p, pl, d, counts)
    plots = []
    try:
        from dpface.eval.plots import cmc_plot, distractor_plot

        plots.append(cmc_plot(curves["cmc"], plots_dir / f"ident-cmc-step{step:08d}.png",
                              title=f"CMC ({source}), step {step}"))
        if counts:
            plots.append(distractor_plot(*curves["distractors"],
                                         plots_dir / f"ident-rank1-vs-distractors-step{step:08d}.png",
                                         title=f"rank-1 vs distractors ({source}), step {step}"))
    except ImportError:
        err("dpface eval: matplotlib not installed, no plots")
    return metrics, plots


def run_sets(args, backbone, cfg, device, plots_dir: Path, step: int) -> tuple[dict, list]:
    """Mixed-quality synthetic templates of held-out identities (data/synthetic/templates.py), pooled
    by mean, embedding norm and (a qan backbone's) quality: template TAR@FAR and rank-1."""
    from dpface.data.synthetic.templates import make_templates
    from dpface.eval.sets import evaluate_set_poolings

    s = cfg.data.synthetic
    try:
        templates = make_templates(args.identities or cfg.eval.num_identities, s.num_identities,
                                   templates_per_identity=args.templates_per_identity,
                                   poor_fraction=args.poor_fraction, seed=s.seed,
                                   image_size=cfg.data.image_size, difficulty=s.difficulty)
    except ValueError as e:
        raise ProtocolError(f"--protocol sets: {e}") from None
    r = evaluate_set_poolings(backbone, templates, fars=tuple(cfg.eval.fars), batch_size=cfg.eval.batch_size,
                              device=device, tar_convention=cfg.eval.tar_convention)
    metrics = {}
    for how, v in r.items():
        if how == "quality":
            metrics["sets/quality/spearman_vs_degradation"] = v["spearman_vs_degradation"]
            continue
        for far, tar in v["tar_at_far"].items():
            metrics[f"sets/{how}/{tar_key(far, cfg.eval.tar_convention)}"] = tar
        metrics[f"sets/{how}/rank1"] = v["rank1"]
    return metrics, []


def run_protocol(args, backbone, cfg, device, ckpt: Path, step: int) -> dict:
    """`dpface eval --protocol ijb|ijb-1n|identification|sets`: metrics (plots written, W&B when enabled)."""
    plots_dir = RunDir.of_checkpoint(ckpt).plots
    fn = {"ijb": run_ijb, "ijb-1n": run_ijb_1n, "identification": run_identification, "sets": run_sets}[args.protocol]
    metrics, plots = fn(args, backbone, cfg, device, plots_dir, step)
    for p in plots:
        err(f"dpface eval: wrote {p}")
    log_to_wandb(cfg, RunDir.of_checkpoint(ckpt).root, step, metrics, plots, f"eval-{args.protocol}")
    return metrics


def log_to_wandb(cfg, run_dir: Path, step: int, metrics: dict, plots: list, kind: str) -> None:
    """Continue the run's W&B run (when ``wandb.enabled``) with the metrics and the plots."""
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return
    from dpface.engine.logging import MetricsLogger

    logger = MetricsLogger(run_dir, True, cfg.wandb, cfg.to_dict(), stream=sys.stderr, resume=True)
    try:
        logger.log(step, metrics, prefix=kind)
        logger.log_images(step, {f"{kind}/{Path(p).stem}": p for p in plots})
    finally:
        logger.close()
