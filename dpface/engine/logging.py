"""Metrics sink for rank 0: stdout lines, a JSONL file, and Weights & Biases.

W&B is optional: it is imported only when enabled, runs offline unless the config says
otherwise (WANDB_MODE in the environment wins), never reads a key from a config (it
uses its own login / WANDB_API_KEY), and any failure of it is reported once and then
ignored: monitoring never stops training.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or math.isnan(v) or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4f}"
        return f"{v:.3e}"
    return str(v)


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg=None, config: dict | None = None,
                 stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._file = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_cfg is not None and wandb_cfg.enabled and wandb_cfg.mode != "disabled":
            self._start_wandb(run_dir, wandb_cfg, config)

    def _start_wandb(self, run_dir: Path, cfg, config) -> None:
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE", cfg.mode)
            self._wandb = wandb.init(
                project=cfg.project, name=cfg.name or None, group=cfg.group or None,
                tags=list(cfg.tags) or None, config=config, dir=str(run_dir), mode=mode,
                resume="allow", reinit="finish_previous",
            )
        except Exception as e:  # an optional monitor must never stop training
            warnings.warn(f"W&B disabled: {type(e).__name__}: {e}")
            self._wandb = None

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        line = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        print(f"[{prefix}] step {step} {line}", file=self.stream, flush=True)
        self._file.write(json.dumps({"step": step, "kind": prefix, **metrics}) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
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
