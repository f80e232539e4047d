"""DeepSpeed ZeRO (stage 1/2) for the backbone, with the model-parallel head left outside.

Why the head stays out: DeepSpeed averages every gradient it owns across the
data-parallel ranks, but each rank's head shard holds *different* classes; averaging
would mix unrelated rows. So only the backbone goes into ``deepspeed.initialize``; the
head keeps its plain torch optimizer and is stepped here, after DeepSpeed's step, with
the same skip decision.

:class:`ZeroBackbone` implements the backbone-parallel interface of engine/parallel.py
(the training step in engine/step.py drives it like the DDP one). DeepSpeed's
partitioned optimizer state is written by every rank into ``deepspeed/`` inside the
checkpoint's step directory (``save_to`` / ``load_from``), which is renamed into place
only when complete, as every other checkpoint file.

Differences from the DDP path, by design:
- gradient clipping: DeepSpeed clips the backbone by the backbone's norm; the head is
  clipped by the norm over all its shards (DDP clips both by their joint norm);
- bf16 is DeepSpeed's torch_autocast (fp32 weights, as dpface's own AMP); fp16 is
  DeepSpeed's fp16 (weights and BatchNorm statistics in fp16) with its dynamic loss
  scale (the trainer's scaler is idle); a step that overflows in the backbone is
  skipped for the head too.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from dpface import distributed as dist
from dpface.rundir import CheckpointError
from dpface.schema import ConfigError

SUBDIR = "deepspeed"  # inside the step directory
TAG = "zero"
# What trainer.pt stores in place of the backbone optimizer's state (it lives in SUBDIR).
OPT_MARKER = {"deepspeed": SUBDIR}


def _safe_types() -> list:
    """The non-tensor types DeepSpeed's ZeRO-1/2 state files hold (found with
    torch.serialization.get_unsafe_globals_in_checkpoint): plain data, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _safe_checkpoint_engine(config):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``: its own
    engine calls ``torch.load(weights_only=False)``, so a crafted ``*_states.pt`` in a
    checkpoint directory would run code on resume. Tensors, containers and the few
    DeepSpeed types above load; anything else is refused with a CheckpointError."""
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_safe_types()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                first = str(e).strip().splitlines()[-1][:200]
                raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and "
                                      f"DeepSpeed's optimizer state ({first})") from None

    return SafeTorchCheckpointEngine(config)


STALE_BUILD_LOCK_S = 600  # no op build takes this long; an older lock was left by a killed build


def check_extension_build_locks(root: Path | None = None, poll_s: float = 5.0) -> None:
    """DeepSpeed JIT-builds an op on first use under torch's extension root; a build killed
    half-way leaves its ``lock`` file, and every later run waited on it forever, silently.
    A lock is waited for (said once) until it goes or is STALE_BUILD_LOCK_S old; an old
    lock is an error naming the file."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(root or get_default_build_root())
    if not root.is_dir():
        return
    said = set()
    for lock in sorted(root.glob("*/*/lock")) + sorted(root.glob("*/lock")):
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break  # the build finished
            if age > STALE_BUILD_LOCK_S:
                raise ConfigError(f"{lock}: a torch extension build lock left {age / 60:.0f} min ago (a killed "
                                  "build?); DeepSpeed would wait on it forever. Delete it if no build is running")
            if lock not in said:
                print(f"dpface: waiting for a torch extension build to finish ({lock}, {age:.0f} s old; "
                      f"at most until it is {STALE_BUILD_LOCK_S // 60} min old)", flush=True)
                said.add(lock)
            time.sleep(poll_s)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg, world_size: int, amp_dtype: torch.dtype | None) -> dict:
    """The DeepSpeed JSON config generated from a dpface config."""
    ds, t = cfg.deepspeed, cfg.train
    bucket = int(ds.bucket_mb * 2**20 // 4)  # elements of fp32
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.batch_size * world_size,
        "gradient_clipping": float(t.grad_clip),
        # dpface passes torch SGD/AdamW: their state is element-wise per parameter, so
        # ZeRO's partitioning of it is exact (DeepSpeed only whitelists its own optimizers).
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "steps_per_print": 2**62,  # dpface logs; DeepSpeed's own prints stay quiet
        "wall_clock_breakdown": False,
    }
    if amp_dtype == torch.bfloat16:
        # torch.autocast inside DeepSpeed: fp32 weights and BatchNorm statistics, bf16
        # compute and bf16 gradient reduction of conv/linear weights. DeepSpeed's "bf16"
        # section would cast the weights but keep BatchNorm's running statistics in fp32,
        # which BatchNorm rejects ("expected scalar type BFloat16 but found Float").
        generated["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif amp_dtype == torch.float16:
        # DeepSpeed's own fp16 with its dynamic loss scale (loss_scale 0; min 1 like dpface's
        # scaler). Buffers go to fp16 with the weights so BatchNorm sees one dtype.
        generated["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                             "min_loss_scale": 1}
        generated["data_types"] = {"buffer_dtype": "fp16"}
    return _merge(generated, ds.extra)


def _cast_inputs_hook(dtype: torch.dtype):
    """Under fp16 DeepSpeed holds the module's weights in that dtype; evaluation feeds
    fp32 images, so floating inputs are cast on the way in."""
    def hook(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a
                     for a in args)
    return hook


class ZeroBackbone:
    def __init__(self, backbone: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg,
                 ctx: dist.ParallelContext, amp_dtype: torch.dtype | None):
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError("deepspeed.enabled=true needs DeepSpeed: pip install 'dpface[deepspeed]'") from e
        self.info = ctx
        self.amp_dtype = amp_dtype
        self.config = deepspeed_config(cfg, ctx.world_size, self.amp_dtype)
        # A torch optimizer instance (not a name) keeps DeepSpeed from JIT-building its
        # fused Adam; ZeRO wraps it and shards its state.
        check_extension_build_locks()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=backbone, optimizer=optimizer, config=self.config,
            dist_init_required=False)
        self.engine.checkpoint_engine = _safe_checkpoint_engine(self.engine._config)
        self.module = self.engine.module
        if self.amp_dtype == torch.float16:
            self.module.register_forward_pre_hook(_cast_inputs_hook(self.amp_dtype))

    def __call__(self, x: torch.Tensor, **kwargs):
        return self.engine(x, **kwargs)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.optimizer, "loss_scale", 1.0)) if self.amp_dtype == torch.float16 else 1.0

    # -- one update (engine/step.py) ---------------------------------------------------
    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # train.accumulate > 1 is refused with DeepSpeed

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed scales by its own loss scale

    def grad_sq_norm(self):
        return None  # reduced, checked and clipped inside DeepSpeed's step

    norm_includes_backbone = False

    def clip_(self, coef) -> None:
        pass  # DeepSpeed clips the backbone to its gradient_clipping itself

    def step(self, finite: bool) -> bool:
        """DeepSpeed's step (reduce, overflow check, clip, update, zero grads); True when
        the head may step too: its gradients were finite and the backbone's did not overflow."""
        self.engine.step()
        return finite and not bool(getattr(self.optimizer, "overflow", False))

    def backbone_grad_norm(self) -> float | None:
        n = self.engine.get_global_grad_norm()
        return None if n is None else float(n)

    # -- checkpoints: trainer.pt holds a marker; the ZeRO partitions are per rank -------
    def state_dict(self) -> dict:
        # the scaler entry keeps trainer.pt's layout; DeepSpeed's own scale is in SUBDIR
        return {"backbone_opt": dict(OPT_MARKER), "scaler": {"scale": 1.0, "good_steps": 0, "enabled": False}}

    def load_state_dict(self, state: dict, path: Path) -> None:
        if state["backbone_opt"] != OPT_MARKER:
            raise CheckpointError(f"{path}: saved without DeepSpeed (its backbone optimizer state is a "
                                  "torch optimizer's); resume it with deepspeed.enabled=false")

    # -- checkpoints (called on every rank, inside the step directory) ---------------
    def save_to(self, step_dir: Path) -> None:
        self.engine.save_checkpoint(str(Path(step_dir) / SUBDIR), tag=TAG, save_latest=False)

    def load_from(self, step_dir: Path, meta: dict) -> None:
        where = Path(step_dir) / SUBDIR
        if not (where / TAG).is_dir():
            raise CheckpointError(f"{step_dir}: no DeepSpeed state ({SUBDIR}/{TAG}/): it was saved "
                                  "without DeepSpeed; resume it with deepspeed.enabled=false")
        if meta["world_size"] != self.info.world_size:
            raise CheckpointError(
                f"{step_dir}: DeepSpeed ZeRO optimizer state was saved by {meta['world_size']} ranks, "
                f"this run has {self.info.world_size}; ZeRO partitions are per rank. Resume at "
                f"{meta['world_size']} ranks (or convert with DeepSpeed's ds_to_universal)")
        path, _ = self.engine.load_checkpoint(str(where), tag=TAG, load_module_strict=True,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{where}: DeepSpeed could not load tag '{TAG}'")
