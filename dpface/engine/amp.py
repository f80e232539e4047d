"""Mixed precision: autocast dtype choice and a dynamic fp16 loss scaler whose
skip decision is agreed by every rank.

torch's GradScaler decides per rank whether gradients overflowed. With a sharded
head, one rank can overflow in its W shard while the others do not; they would
step, it would skip, and the shards would drift apart. Here the decision comes from
the all-reduced global grad norm (engine/step.py), so every rank skips together. The scale also has a floor: a run
whose gradients stay non-finite fails with a clear error instead of quietly
collapsing the scale to 0 and training on nothing.
"""
from __future__ import annotations

import contextlib

import torch


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto' → bf16 on CUDA devices that support it, fp32 elsewhere (CPU bf16
    autocast is slower than fp32 on most CPUs without AMX)."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type == "cpu":
            import warnings

            warnings.warn("train.amp=fp16 on the CPU: CPU fp16 autocast is ~28x slower than fp32 "
                          "(no fast fp16 kernels); use train.amp=none or bf16", stacklevel=2)
        return torch.float16
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"unknown amp mode '{amp}'")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossScaler:
    """Dynamic loss scaling for fp16; inactive (scale 1) for bf16/fp32."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params) -> None:
        if self.enabled:
            inv = 1.0 / self.scale
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inv)

    def update(self, finite: bool) -> None:
        """Record one step's outcome (the same on every rank)."""
        if not self.enabled:
            return
        if finite:
            self._good_steps += 1
            if self._good_steps >= self.growth_interval:
                self.scale *= 2.0
                self._good_steps = 0
        else:
            self.scale = max(self.min_scale, self.scale / 2.0)
            self._good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self._good_steps, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        if state.get("enabled") == self.enabled:
            self.scale = float(state["scale"])
            self._good_steps = int(state["good_steps"])
