"""How the backbone is replicated across ranks: one interface, two implementations.

The training step (engine/step.py) drives either through the same calls:

    with bp.accumulating(last):   # no gradient all-reduce until the last micro-batch
        bp.backward(loss)         # the loss scaled by bp.loss_scale
    sq = bp.grad_sq_norm()        # unscaled backbone grads' squared norm, or None
    bp.clip_(coef)                # scale the backbone's grads (a no-op where it clips itself)
    stepped = bp.step(finite)     # update (or skip) and zero the backbone grads

:class:`DDPBackbone` (torch DDP, or the plain module on one rank) keeps its own fp16
loss scale and lets the step clip backbone and head by their joint norm.
:class:`~dpface.engine.deepspeed_backbone.ZeroBackbone` (DeepSpeed ZeRO-1/2) reduces,
checks for overflow and clips inside DeepSpeed's step, so ``grad_sq_norm`` is None there
and the head is clipped by its own norm (documented in that module).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from dpface.engine.amp import LossScaler

COMM_HOOKS = ("none", "fp16", "bf16")


class DDPBackbone:
    def __init__(self, backbone: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx,
                 amp_dtype: torch.dtype | None, comm_hook: str = "none", find_unused: bool = False):
        self.module = backbone
        self.optimizer = optimizer
        dev = ctx.device
        if ctx.world_size > 1:
            self.model = DistributedDataParallel(backbone, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                 process_group=ctx.data_group,
                                                 find_unused_parameters=find_unused)
            register_comm_hook(self.model, comm_hook, ctx.data_group)
        else:
            self.model = backbone
        self.scaler = LossScaler(enabled=amp_dtype == torch.float16)

    def __call__(self, x, **kwargs):
        return self.model(x, **kwargs)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler.enabled else 1.0

    def accumulating(self, last: bool):
        """Within: a backward that only accumulates (DDP skips its all-reduce) unless
        ``last``."""
        if last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale_loss(loss).backward()

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def grad_sq_norm(self) -> torch.Tensor | None:
        grads = self._grads()
        if self.scaler.enabled:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        if not grads:
            return None
        return torch.nn.utils.get_total_norm(grads).float().pow(2)  # replicated: counted once

    def clip_(self, coef: torch.Tensor) -> None:
        grads = self._grads()
        if grads:
            torch._foreach_mul_(grads, coef)

    def step(self, finite: bool) -> bool:
        self.scaler.update(finite)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    @property
    def norm_includes_backbone(self) -> bool:
        return True

    # -- checkpoints: trainer.pt holds these two; nothing per rank -----------------------
    def state_dict(self) -> dict:
        return {"backbone_opt": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, path: Path) -> None:
        from dpface.rundir import CheckpointError

        if "deepspeed" in state["backbone_opt"]:
            raise CheckpointError(f"{path}: saved with deepspeed.enabled=true (the backbone optimizer "
                                  "state is in its deepspeed/ folder); resume it with deepspeed.enabled=true")
        self.optimizer.load_state_dict(state["backbone_opt"])
        self.scaler.load_state_dict(state["scaler"])

    def save_to(self, step_dir: Path) -> None:
        pass

    def load_from(self, step_dir: Path, meta: dict) -> None:
        pass


def _cast_allreduce_hook(dtype: torch.dtype):
    """A DDP comm hook: the bucket averaged in ``dtype`` and written back. torch's own bf16
    hook refuses to run without NCCL; gloo reduces bf16 fine, so CPU runs use this one."""
    def hook(group, bucket):
        buf = bucket.buffer()
        low = buf.to(dtype).div_(tdist.get_world_size(group))
        fut = tdist.all_reduce(low, group=group, async_op=True).get_future()

        def back(f):
            buf.copy_(f.value()[0])
            return buf
        return fut.then(back)
    return hook


def register_comm_hook(ddp: DistributedDataParallel, kind: str, group=None) -> None:
    """Gradient compression for the all-reduce: each bucket is cast to fp16/bf16, averaged,
    and cast back, halving the bytes on the wire (torch's hooks under NCCL)."""
    if kind == "none":
        return
    if kind not in COMM_HOOKS:
        raise ValueError(f"comm_hook must be one of {', '.join(COMM_HOOKS)}, got {kind!r}")
    dtype = torch.float16 if kind == "fp16" else torch.bfloat16
    if tdist.get_backend(group) == "nccl":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.fp16_compress_hook if kind == "fp16" else default_hooks.bf16_compress_hook
    else:
        hook = _cast_allreduce_hook(dtype)
    ddp.register_comm_hook(group, hook)
