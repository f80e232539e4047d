"""Stop cleanly on SIGTERM (what SLURM, Kubernetes and Ray send before killing) and SIGINT.

The first signal only sets a flag. At each step boundary the ranks all-reduce it, so
every rank leaves the loop after the same step, writes the checkpoint together and
exits with ``EXIT_CODES[signal]`` (the shell's 128 + signal number). A second signal
exits at once, without a checkpoint; a copy arriving within ``DUPLICATE_S`` of the
first is not one: under SLURM both torchrun and its workers get the signal, and
torchrun forwards its copy to the workers milliseconds later.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as tdist

from dpface import distributed as dist

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
DUPLICATE_S = 1.0


class StopRequested(Exception):
    """Training stopped on a signal after writing a checkpoint (not an error)."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.exit_code = EXIT_CODES[signum]
        self.signame = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signame} at step {step}: checkpoint {checkpoint} written; "
                         f"continue with --resume auto (exit code {self.exit_code})")


class SignalStop:
    """Installs the handlers for the duration of ``with``; ``agreed()`` at step boundaries."""

    def __init__(self):
        self.signum, self._first, self._old = 0, 0.0, {}
        # While set (the final evaluation, after the last checkpoint): a signal raises this
        # at once instead of waiting for a step boundary that will not come.
        self.interrupt = None

    def __enter__(self) -> "SignalStop":
        # Only the main thread may set handlers; Ray Train runs the loop in a worker thread
        # and handles signals itself.
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_CODES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.signum and self.interrupt is not None:
            self.signum, self._first = signum, time.monotonic()
            os.write(2, f"dpface: {name} received during the final evaluation: the final checkpoint is "
                        "written; stopping now\n".encode())
            raise self.interrupt(signum)
        if not self.signum:
            self.signum, self._first = signum, time.monotonic()
            os.write(2, f"dpface: {name} received: stopping after this step to write a checkpoint "
                        f"(send it again to exit at once)\n".encode())
        elif time.monotonic() - self._first > DUPLICATE_S:
            os.write(2, f"dpface: second signal ({name}): exiting now without a checkpoint\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none). A collective: every rank calls it at
        the same step boundary."""
        if dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return int(flag.item())
