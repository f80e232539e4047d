"""Checkpoints: one directory per step, written atomically by all ranks.

    checkpoints/step-00000200/
        meta.json           written last; its presence marks the checkpoint complete
        trainer.pt          rank 0: backbone, its optimizer, loss scaler, step
        head-rank00000-of-00002.pt  every rank: its head shard with its global class range
        rank00000.pt        every rank: RNG state and data-stream position

Ranks write into ``step-N.partial/``; after a barrier rank 0 writes meta.json and
renames the directory, so a crash mid-save never leaves a half checkpoint that
``--resume auto`` would pick. Each file is itself written to a temp name and renamed.
Multi-node runs need the run directory on a shared file system.

The head shards carry their class ranges, so a run saved at one world size resumes at
another: each rank reads only the rows of its new range (dpface.heads.sharding).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpface import distributed as dist
from dpface.heads.sharding import (apply_shard_state, atomic_save, head_shard_state, load_resharded,
                                   shard_filename)

STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


def load_file(path: Path, weights_only: bool = True):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"checkpoint file unreadable (corrupt or truncated?): {path}: {e}") from None


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir()
             if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """'auto' → latest complete checkpoint under ckpt_root (or None to start fresh);
    a path → that checkpoint directory, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(ckpt_root)
        return done[-1] if done else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume: no checkpoint directory at {path}")
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"--resume: {path} is incomplete (no meta.json): the save was interrupted")
    return path


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/meta.json unreadable: {e}") from None


@dataclass
class TrainState:
    """Everything a checkpoint restores, gathered by the trainer."""
    step: int
    backbone: torch.nn.Module
    head: torch.nn.Module
    backbone_opt: torch.optim.Optimizer
    head_opt: torch.optim.Optimizer
    scaler: object
    stream: object
    aux_losses: torch.nn.Module  # per-rank state (e.g. class centres) of embedding losses
    # Writes/reads its own per-rank files in the step directory, on every rank: the
    # DeepSpeed backbone engine, whose ZeRO optimizer state is partitioned over ranks.
    engine: object = None


def save_checkpoint(ckpt_root: Path, state: TrainState, info: dist.DistInfo, config: dict,
                    keep: int) -> Path:
    final = ckpt_root / f"step-{state.step:08d}"
    partial = ckpt_root / f"step-{state.step:08d}.partial"
    if info.is_main:
        partial.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    r = info.rank
    atomic_save(head_shard_state(state.head, state.head_opt),
                partial / shard_filename(r, info.world_size))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    atomic_save({"rng": rng, "data": state.stream.state_dict(), "world_size": info.world_size,
                 "aux_losses": state.aux_losses.state_dict()},
                partial / f"rank{r:05d}.pt")
    if state.engine is not None:
        state.engine.save_to(partial)
    if info.is_main:
        atomic_save({
            "step": state.step,
            "backbone": state.backbone.state_dict(),
            "backbone_opt": state.backbone_opt.state_dict(),
            "scaler": state.scaler.state_dict(),
        }, partial / "trainer.pt")
    dist.barrier()
    if info.is_main:
        meta = {"step": state.step, "world_size": info.world_size,
                "num_classes": state.head.num_classes, "time": time.time(), "config": config}
        (partial / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(partial / "meta.json.tmp", partial / "meta.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, state: TrainState, info: dist.DistInfo) -> int:
    """Restore ``state`` in place from checkpoint ``path``; returns the step."""
    meta = read_meta(path)
    if meta["num_classes"] != state.head.num_classes:
        raise CheckpointError(
            f"{path}: checkpoint head has {meta['num_classes']} classes, this run has "
            f"{state.head.num_classes}: a different data set?"
        )
    trainer = load_file(path / "trainer.pt")
    try:
        state.backbone.load_state_dict(trainer["backbone"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: backbone does not match this config's model: {e}") from None
    if state.engine is None and "deepspeed" in trainer["backbone_opt"]:
        raise CheckpointError(f"{path}: saved with deepspeed.enabled=true (the backbone optimizer "
                              "state is in its deepspeed/ folder); resume it with deepspeed.enabled=true")
    state.backbone_opt.load_state_dict(trainer["backbone_opt"])
    if state.engine is not None:
        state.engine.load_from(path, meta)
    state.scaler.load_state_dict(trainer["scaler"])

    shard_files = sorted(path.glob("head-rank*.pt"))
    if len(shard_files) != meta["world_size"]:
        raise CheckpointError(
            f"{path}: expected {meta['world_size']} head shards, found {len(shard_files)}"
        )
    head = state.head
    apply_shard_state(head, state.head_opt,
                      load_resharded(shard_files, head.class_start, head.class_end))

    if meta["world_size"] == info.world_size:
        own = load_file(path / f"rank{info.rank:05d}.pt")
        torch.set_rng_state(own["rng"]["torch"])
        if "cuda" in own["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["rng"]["cuda"])
        state.stream.load_state_dict(own["data"])
        state.aux_losses.load_state_dict(own["aux_losses"])
    else:
        # Another world size: the data position is global (one count of global batches)
        # and stays valid when the global batch is unchanged; per-rank RNG and per-rank
        # embedding-loss state start anew.
        own = load_file(path / "rank00000.pt")
        state.stream.load_state_dict(own["data"])
    return int(trainer["step"])
