"""Checkpoints: one directory per step, written atomically by all ranks.

    checkpoints/step-00000200/
        meta.json           written last; its presence marks the checkpoint complete
        trainer.pt          rank 0: backbone, its optimizer, loss scaler, step
        head-rank00000-of-00002.pt  every rank: its head shard with its global class range
        rank00000.pt        every rank: RNG state and data-stream position

Ranks write into ``step-N.partial/`` (emptied first: files of an older interrupted
save, perhaps at another world size, must not join this one); after a barrier rank 0
writes meta.json and renames the directory, so a crash mid-save never leaves a half
checkpoint that ``--resume auto`` would pick. Each file is itself written to a temp name
and renamed. Re-saving an existing step moves the old directory aside until the new one
is in place (``recover_interrupted_saves`` finishes or undoes a crash in between).
Nothing is written from non-finite state: every rank checks what it would write, and
one all-reduce makes all ranks refuse together. Multi-node runs need the run directory
on a shared file system.

The head shards carry their class ranges, so a run saved at one world size resumes at
another: each rank reads only the rows of its new range (dpface.heads.sharding).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from dpface import distributed as dist
from dpface.heads.sharding import apply_shard_state, head_shard_state, load_resharded, shard_filename
from dpface.io import atomic_save, atomic_write_json, fsync_dir
from dpface.restore import check_backbone_fits, load_file
from dpface.rundir import META, CheckpointError, RunDir, partial_name, read_meta, replaced_name, step_name


class NonFiniteStateError(CheckpointError, FloatingPointError):
    """A save refused because weights or optimizer state hold NaN/inf (the run diverged);
    a FloatingPointError too, so the CLI reports it as divergence."""


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories under a run's ``checkpoints/``, oldest first."""
    return RunDir(Path(ckpt_root).parent).complete()


@dataclass
class TrainState:
    """Everything a checkpoint restores, gathered by the trainer."""
    step: int
    backbone: torch.nn.Module
    head: torch.nn.Module
    head_opt: torch.optim.Optimizer
    stream: object
    aux_losses: torch.nn.Module  # per-rank state (e.g. class centres) of embedding losses
    # The backbone-parallel object (engine/parallel.py): its optimizer and loss-scale
    # state go into trainer.pt; per-rank files of its own (ZeRO partitions) into the
    # step directory, on every rank.
    parallel: object
    # Where the run's weights came from (train.init_from): recorded in every meta.json.
    init_from: dict | None = None
    # The optimizer of aux losses' own parameters (a distillation projection), if any.
    aux_opt: torch.optim.Optimizer | None = None


def _first_non_finite(obj, name: str = "") -> str | None:
    """Name of the first floating tensor holding NaN/inf in a nested state, or None."""
    if isinstance(obj, torch.Tensor):
        return name if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _first_non_finite(v, f"{name}/{k}" if name else str(k))
        if found is not None:
            return found
    return None


def _ranks_with(flag: bool, info: dist.ParallelContext) -> list[int]:
    """The ranks where ``flag`` holds (one all-reduce; every rank gets the same list)."""
    if info.world_size == 1:
        return [0] if flag else []
    flags = torch.zeros(info.world_size, dtype=torch.int32, device=info.device)
    flags[info.rank] = int(flag)
    tdist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def save_checkpoint(ckpt_root: Path, state: TrainState, info: dist.ParallelContext, config: dict,
                    keep: int) -> Path:
    final = ckpt_root / step_name(state.step)
    partial = ckpt_root / partial_name(state.step)
    r = info.rank
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    files = {shard_filename(r, info.world_size): head_shard_state(state.head, state.head_opt),
             f"rank{r:05d}.pt": {"rng": rng, "data": state.stream.state_dict(),
                                 "world_size": info.world_size, "aux_losses": state.aux_losses.state_dict()}}
    if info.is_main:
        files["trainer.pt"] = {"step": state.step, "backbone": state.backbone.state_dict(),
                               **state.parallel.state_dict()}
        if state.aux_opt is not None:
            files["trainer.pt"]["aux_opt"] = state.aux_opt.state_dict()
    # Checked before anything is written, agreed by all ranks: a diverged run must not
    # rotate its last good checkpoints away with NaN ones. (DeepSpeed's partitioned
    # optimizer state is its own; its backbone weights are checked here.)
    bad = _first_non_finite(files)
    bad_ranks = _ranks_with(bad is not None, info)
    if bad_ranks:
        done = complete_checkpoints(ckpt_root)
        raise NonFiniteStateError(
            f"refusing to save step {state.step}: non-finite values (NaN/inf) in the weights or "
            f"optimizer state on rank(s) {bad_ranks}" + (f" (rank {r}: first in {bad})" if bad else "")
            + f"; nothing was written, the latest checkpoint is {done[-1] if done else 'none'}. The "
            "run diverged: lower train.lr (or head.loss.s, or use bf16) and continue with --resume auto")
    if info.is_main:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()  # the empty .partial exists before any rank writes into it
    for fname, obj in files.items():
        atomic_save(obj, partial / fname)
    state.parallel.save_to(partial)
    dist.barrier()
    if info.is_main:
        meta = {"step": state.step, "world_size": info.world_size,
                "num_classes": state.head.num_classes, "time": time.time(), "config": config}
        if state.init_from is not None:
            meta["init_from"] = state.init_from
        atomic_write_json(partial / META, meta, indent=1)  # the commit marker
        if final.exists():  # a re-save of this step: the old one stays until the new is in place
            old = ckpt_root / replaced_name(state.step)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old)
        else:
            os.replace(partial, final)
        fsync_dir(ckpt_root)  # the rename that publishes the checkpoint survives a power loss
        for old in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


_NEW_RUN = "to start a new run instead, choose another experiment.name (or replace --resume with --overwrite)"


def check_compatible(path: Path, meta: dict, config: dict, world_size: int) -> None:
    """What a resume cannot carry over, named with what to do, before anything is loaded."""
    saved = meta["config"]
    opt, mine = saved["train"]["optimizer"], config["train"]["optimizer"]
    if opt != mine:
        raise CheckpointError(
            f"{path} was trained with train.optimizer={opt}, this run uses {mine}: its optimizer "
            f"state cannot continue under another optimizer. Resume with train.optimizer={opt}; {_NEW_RUN}")
    bs, ws = saved["data"]["batch_size"], meta["world_size"]
    b = config["data"]["batch_size"]
    if bs * ws != b * world_size:
        fix = (f"data.batch_size={bs * ws // world_size} on {world_size} rank(s)"
               if bs * ws % world_size == 0 else f"data.batch_size × ranks = {bs * ws}")
        raise CheckpointError(
            f"{path} was saved with global batch {bs * ws} ({ws} rank(s) × data.batch_size {bs}); this "
            f"run's is {b * world_size} ({world_size} × {b}), so the data position cannot continue. "
            f"To continue that run use {fix}; {_NEW_RUN}")


def load_checkpoint(path: Path, state: TrainState, info: dist.ParallelContext, config: dict | None = None) -> int:
    """Restore ``state`` in place from checkpoint ``path``; returns the step. ``config``
    (this run's, as a dict) is checked against the checkpoint's first."""
    meta = read_meta(path)
    if config is not None:
        check_compatible(path, meta, config, info.world_size)
    if meta["num_classes"] != state.head.num_classes:
        raise CheckpointError(
            f"{path}: checkpoint head has {meta['num_classes']} classes, this run has "
            f"{state.head.num_classes}: a different data set?"
        )
    trainer = load_file(path / "trainer.pt")
    check_backbone_fits(path, meta, trainer["backbone"], state.backbone, config)
    state.backbone.load_state_dict(trainer["backbone"])
    state.parallel.load_state_dict(trainer, path)
    if state.aux_opt is not None and "aux_opt" in trainer:
        state.aux_opt.load_state_dict(trainer["aux_opt"])
    state.parallel.load_from(path, meta)

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
        # and stays valid when the global batch is unchanged; class-sharded loss state
        # (centres) is resharded like the head; per-rank RNG starts anew.
        olds = [load_file(path / f"rank{r:05d}.pt", mmap=True) for r in range(meta["world_size"])]
        state.stream.load_state_dict(olds[0]["data"])
        reshard_aux_losses(state.aux_losses, [o["aux_losses"] for o in olds])
    return int(trainer["step"])


def reshard_aux_losses(aux: torch.nn.Module, states: list[dict]) -> None:
    """Load into ``aux`` its class-sharded sub-modules' state from the aux-loss state
    dicts of every rank of a run saved at another world size; the replicated state of the
    others (a distillation projection) from rank 0's."""
    for name, m in aux.named_children():
        if not any(hasattr(s, "load_sharded") for s in m.modules()):
            pre = f"{name}."
            m.load_state_dict({k[len(pre):]: v for k, v in states[0].items() if k.startswith(pre)})
    for name, m in aux.named_modules():
        if hasattr(m, "load_sharded"):
            pre = f"{name}." if name else ""
            m.load_sharded([{k[len(pre):]: v for k, v in st.items() if k.startswith(pre)}
                            for st in states])
