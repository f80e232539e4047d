"""Deliberate worker failure, to test recovery (torchrun --max-restarts, Ray FailureConfig).

Set in the environment of the training processes:

    DPFACE_FAULT_AT_STEP=N      after finishing step N ...
    DPFACE_FAULT_RANK=r         ... rank r (default 1) kills itself with SIGKILL ...
    DPFACE_FAULT_MARKER=path    ... once: it creates this file first, and never fails
                                while it exists, so the restarted attempt runs through.

SIGKILL, not an exception: the process vanishes as an OOM-killed or preempted worker
does, without cleanup, without a checkpoint, with its peers blocked in a collective.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FaultInjection:
    step: int
    rank: int
    marker: Path

    @classmethod
    def from_env(cls, environ=None) -> "FaultInjection | None":
        env = os.environ if environ is None else environ
        if not env.get("DPFACE_FAULT_AT_STEP"):
            return None
        marker = env.get("DPFACE_FAULT_MARKER")
        if not marker:
            raise ValueError("DPFACE_FAULT_AT_STEP is set but DPFACE_FAULT_MARKER is not: without the "
                             "marker file every restarted attempt would fail again")
        try:
            return cls(int(env["DPFACE_FAULT_AT_STEP"]), int(env.get("DPFACE_FAULT_RANK", "1")),
                       Path(marker))
        except ValueError:
            raise ValueError(f"DPFACE_FAULT_AT_STEP / DPFACE_FAULT_RANK must be integers, got "
                             f"{env['DPFACE_FAULT_AT_STEP']!r} / {env.get('DPFACE_FAULT_RANK')!r}") from None

    def after_step(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"rank {rank} killed itself after step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)
