"""Activation checkpointing of a backbone's blocks (``model: {..., checkpoint: blocks}``).

A checkpointed block keeps only its input for backward and runs its forward a second time
during backward to rebuild the activations it needs: less memory for about one extra
forward of the checkpointed blocks. Modes:

  none      nothing is checkpointed;
  blocks    every block is;
  every_n   block i is when i % checkpoint_every == 0 (i counts from 0 over all the
            backbone's blocks): a fraction 1/n of the saving for 1/n of the extra compute.
            ``checkpoint_every: 1`` is ``blocks``.

It applies only in training mode with grad enabled; eval and ``torch.no_grad()`` run the
plain forward (so export and evaluation never see it).

BatchNorm: the recomputation in backward is a second training-mode forward, which would
update ``running_mean``/``running_var`` (and ``num_batches_tracked``) a second time, so the
running statistics would drift from the unchecked model's (0.19·μ instead of 0.1·μ after
one step from zero). While a block is recomputed its BatchNorms run with ``momentum = 0``:
the update (1 − m)·running + m·batch then leaves the buffers exactly as they are (for finite
statistics), while the normalisation still uses the batch's statistics, so the rebuilt
activations are those of the first forward; ``num_batches_tracked`` is put back afterwards
(``momentum = None``, the cumulative average, is covered too: 0 overrides it). Switching the
buffers off instead (``track_running_stats = False``) is not possible: BN saves them for
backward, and checkpoint requires the recomputation to save the same tensors. Dropout /
drop-path masks are the same in the recomputation because torch's checkpoint restores the
RNG state (``preserve_rng_state``, on by default).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

MODES = ("none", "blocks", "every_n")


def check_checkpoint(checkpoint: str, checkpoint_every: int) -> tuple[str, int]:
    if not isinstance(checkpoint, str) or checkpoint not in MODES:
        raise ValueError(f"checkpoint must be one of {', '.join(MODES)}, got {checkpoint!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1 (checkpoint one block in that many), "
                         f"got {checkpoint_every!r}")
    return checkpoint, checkpoint_every


def checkpointed(index: int, checkpoint: str, checkpoint_every: int) -> bool:
    """Whether block ``index`` (0-based over the whole backbone) is checkpointed."""
    if checkpoint == "blocks":
        return True
    return checkpoint == "every_n" and index % checkpoint_every == 0


@contextlib.contextmanager
def _stats_frozen(norms: Sequence[nn.modules.batchnorm._BatchNorm]):
    momentum = [m.momentum for m in norms]
    counts = [None if m.num_batches_tracked is None else m.num_batches_tracked.clone() for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0
        yield
    finally:
        with torch.no_grad():
            for m, mom, n in zip(norms, momentum, counts):
                m.momentum = mom
                if n is not None:
                    m.num_batches_tracked.copy_(n)


def _contexts(norms):
    # (forward context, recomputation context): only the recomputation is changed.
    return contextlib.nullcontext(), _stats_frozen(norms)


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, checkpoint: str, checkpoint_every: int,
               training: bool) -> torch.Tensor:
    """``x`` through ``blocks`` in order, checkpointing those the mode selects."""
    active = checkpoint != "none" and training and torch.is_grad_enabled()
    for i, block in enumerate(blocks):
        if active and checkpointed(i, checkpoint, checkpoint_every):
            x = checkpoint_block(block, x)
        else:
            x = block(x)
    return x


def checkpoint_block(block: nn.Module | Callable, x: torch.Tensor) -> torch.Tensor:
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        if isinstance(block, nn.Module) else []
    # Looked up on the module each call so a test can count the calls.
    return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False,
                                             context_fn=lambda: _contexts(norms))
