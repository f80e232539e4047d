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
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank(group=None) -> int:
    return tdist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return tdist.get_world_size(group) if is_initialized() else 1


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the launcher's environment.

    torchrun and Ray Train both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. Without WORLD_SIZE (or with 1) no group is created. NCCL is used when
    the run is on CUDA, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        # Checked here: torch's own failure without CUDA is an AttributeError deep inside.
        from dpface.config import ConfigError

        if not torch.cuda.is_available():
            raise ConfigError("experiment.device is 'cuda' but there is no CUDA device (torch "
                              f"{torch.__version__} sees none); use experiment.device=cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                              "CUDA device(s) are visible on this node")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world > 1 and not is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        tdist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=dev)


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def destroy() -> None:
    if is_initialized():
        tdist.destroy_process_group()
