"""Process-group set-up and rank helpers.

Every helper works without a process group (a plain single-process run), so the
same code paths serve world size 1 and many ranks.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class ParallelContext:
    """Where this process runs and with whom it talks: its rank, the device, and the
    named process groups. Everything that communicates takes its group from here.

    ``data``: the backbone's data-parallel replicas (gradient averaging, the data split).
    ``head``: the ranks that shard the classifier between them; the global grad norm, the
    skip decision, centre-loss centres and checkpoint barriers use it because the head's
    row shards (and their squares in the norm) are only disjoint within it.
    None means the world. The trainer runs one head over the whole world (both None);
    tests build contexts with a head group smaller than the world.
    """
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    data_group: object = None
    head_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank(group=None) -> int:
    return tdist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return tdist.get_world_size(group) if is_initialized() else 1


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``experiment.device`` (auto | cpu | cuda) as a torch device: auto means this node's
    CUDA device ``local_rank`` where there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return torch.device(device)
    # Checked here: torch's own failure without CUDA is an AttributeError deep inside.
    from dpface.schema import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("experiment.device is 'cuda' but there is no CUDA device (torch "
                          f"{torch.__version__} sees none); use experiment.device=cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                          "CUDA device(s) are visible on this node")
    return torch.device("cuda", local_rank)


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> ParallelContext:
    """Join the process group described by the launcher's environment.

    torchrun and Ray Train both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. Without WORLD_SIZE (or with 1) no group is created. NCCL is used when
    the run is on CUDA, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        tdist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
    return ParallelContext(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=dev)


def barrier(group=None) -> None:
    if is_initialized():
        tdist.barrier(group)


def destroy() -> None:
    if is_initialized():
        tdist.destroy_process_group()
