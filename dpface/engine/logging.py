"""Metrics sink for rank 0: stdout lines, a JSONL file, and Weights & Biases.

W&B is optional: it is imported only when enabled, runs offline unless the config says
otherwise (WANDB_MODE in the environment wins), never reads a key from a config (it
uses its own login / WANDB_API_KEY), and any failure of it is reported once and then
ignored: monitoring never stops training.

Besides scalars: per-rank peak memory reduced to rank 0 (``memory_stats``, a collective
every rank calls at a log step) and ROC curves of the evaluation sets (``log_roc``: a
W&B line chart of (FAR, TAR) points — no matplotlib needed — plus ROC and DET PNGs in the
run directory, also logged to W&B as images, when matplotlib is installed).
"""
from __future__ import annotations

import json
import math
import os
import resource
import secrets
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from dpface import distributed as dist
from dpface.rundir import RunDir

# A ROC of 6000 pairs has thousands of points; charts and tables need far fewer.
ROC_POINTS = 200


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or math.isnan(v) or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4f}"
        return f"{v:.3e}"
    return str(v)


def _console(key: str, v) -> str:
    if key == "eta_s" and isinstance(v, (int, float)) and math.isfinite(v):
        return f"eta={int(v) // 3600}:{int(v) % 3600 // 60:02d}:{int(v) % 60:02d}"
    return f"{key}={_fmt(v)}"


def _on_console(key: str) -> bool:
    """Keep the progress line short: the per-rank memory breakdown and the per-cause
    data counters go to the JSONL file and W&B only (their totals stay on the line)."""
    if key.startswith("mem/"):
        return key.endswith("_max")
    if key.startswith("data/"):  # totals of skipped samples, lost shards and their samples
        return key in ("data/bad_samples", "data/bad_shards", "data/lost_samples")
    return True


def memory_stats(device: torch.device) -> dict:
    """Peak memory of every rank, reduced for rank 0 (all ranks must call it together):
    the max over ranks (the one that will run out first), the mean, and rank 0's.
    Host: max RSS of the process; CUDA: max allocated by torch on its device."""
    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0]  # KiB on Linux → MiB
    names = ["rss_peak_mb"]
    if device.type == "cuda":
        values.append(torch.cuda.max_memory_allocated(device) / 2**20)
        names.append("cuda_peak_mb")
    local = torch.tensor(values, dtype=torch.float64, device=device)
    world = dist.get_world_size()
    if world > 1:
        every = [torch.empty_like(local) for _ in range(world)]
        tdist.all_gather(every, local)
        table = torch.stack(every).cpu()
    else:
        table = local.cpu()[None]
    out = {}
    for i, name in enumerate(names):
        col = table[:, i]
        out[f"mem/{name}_max"] = float(col.max())
        out[f"mem/{name}_mean"] = float(col.mean())
        out[f"mem/{name}_rank0"] = float(col[0])
    return out


def roc_points(fpr, tpr, n: int = ROC_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` points of a ROC curve, FAR log-spaced (the operating points of face
    verification sit at small FAR), TAR interpolated; FAR 0 and 1 kept."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if len(fpr) <= n:
        return fpr, tpr
    positive = fpr[fpr > 0]
    lo = positive.min() if len(positive) else 1e-6
    grid = np.unique(np.concatenate([[0.0], np.geomspace(lo, 1.0, n - 1)]))
    return grid, np.interp(grid, fpr, tpr)


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg=None, config: dict | None = None,
                 stream=None, resume: bool = False):
        self.enabled, self.resume = enabled, resume
        self.stream = stream or sys.stdout
        self._file = None
        self._wandb = None
        self.run_dir = run_dir
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(RunDir(run_dir).metrics_file, "a", buffering=1)
        if wandb_cfg is not None and wandb_cfg.enabled and wandb_cfg.mode != "disabled":
            self._start_wandb(run_dir, wandb_cfg, config)

    def _start_wandb(self, run_dir: Path, cfg, config) -> None:
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE", cfg.mode)
            # A resumed run continues its W&B run (one curve), whose id the run directory keeps.
            id_file = RunDir(run_dir).wandb_id_file  # the W&B run a resume continues
            run_id = id_file.read_text().strip() if self.resume and id_file.is_file() else ""
            if not run_id:
                run_id = secrets.token_hex(4)  # W&B ids are lowercase letters and digits
                id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(
                project=cfg.project, name=cfg.name or None, group=cfg.group or None,
                tags=list(cfg.tags) or None, config=config, dir=str(run_dir), mode=mode,
                id=run_id, resume="allow", reinit="finish_previous",
            )
        except Exception as e:  # an optional monitor must never stop training
            warnings.warn(f"W&B disabled: {type(e).__name__}: {e}")
            self._wandb = None

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        line = " ".join(_console(k, v) for k, v in metrics.items() if _on_console(k))
        print(f"[{prefix}] step {step} {line}", file=self.stream, flush=True)
        self._file.write(json.dumps({"step": step, "kind": prefix, **metrics}) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
            except Exception as e:
                warnings.warn(f"W&B logging failed, disabling it: {e}")
                self._wandb = None

    def log_roc(self, step: int, rocs: dict) -> None:
        """``rocs``: set name → (fpr, tpr). W&B: a line chart per set under ``roc/<name>``;
        run directory: ``plots/roc-<name>-step<N>.png`` and ``plots/det-…`` (W&B images too) when
        matplotlib is installed."""
        if not self.enabled or not rocs:
            return
        for name, (fpr, tpr) in rocs.items():
            far, tar = roc_points(fpr, tpr)
            if self._wandb is not None:
                try:
                    import wandb

                    table = wandb.Table(data=[[float(a), float(b)] for a, b in zip(far, tar)],
                                        columns=["far", "tar"])
                    self._wandb.log({f"roc/{name}": wandb.plot.line(
                        table, "far", "tar", title=f"ROC {name} (step {step})")}, step=step)
                except Exception as e:
                    warnings.warn(f"W&B logging failed, disabling it: {e}")
                    self._wandb = None
            try:
                from dpface.eval.plots import det_plots, roc_plots

                plots = RunDir(self.run_dir).plots
                title = f"{name}, step {step}"
                done = [roc_plots({name: (fpr, tpr)}, plots / f"roc-{name}-step{step:08d}.png", title=title),
                        det_plots({name: (fpr, tpr)}, plots / f"det-{name}-step{step:08d}.png", title=title)]
                self.log_images(step, {f"plots/{p.stem.rsplit('-step', 1)[0]}": p for p in done})
            except ImportError:
                pass  # matplotlib is optional; the W&B chart and the metrics stand alone
            except Exception as e:  # a plot must never stop training
                warnings.warn(f"ROC plot of {name} failed: {type(e).__name__}: {e}")

    def log_images(self, step: int, images: dict) -> None:
        """``images``: W&B key → PNG path, logged as ``wandb.Image`` when W&B is on."""
        if not self.enabled or self._wandb is None or not images:
            return
        try:
            import wandb

            self._wandb.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)
        except Exception as e:
            warnings.warn(f"W&B logging failed, disabling it: {e}")
            self._wandb = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:
                warnings.warn(f"W&B finish failed: {e}")
            self._wandb = None
