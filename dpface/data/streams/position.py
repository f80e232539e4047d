"""Saved data positions: what a stream's ``state_dict`` holds and when it may continue.

A position continues only the stream it was saved from; anything else is a
:class:`PositionError` naming what differs. The WebDataset position is the position of
every virtual slot (round, raw samples consumed in the round, shards finished, counts),
gathered from all ranks, so one rank's copy can continue the stream at another world
size when the global batch is unchanged and the new world size divides the slot count.
"""
from __future__ import annotations

import copy

import torch.distributed as tdist

from dpface import distributed as dist
from dpface.data.formats.shards import ShardError
from dpface.data.streams.slots import rank_slots

WDS_FORMAT = "dpface-wds-stream/2"  # /1 (per-rank cursor) could not reshard


class PositionError(ShardError, ValueError):
    """A saved data position cannot be continued by this stream (what differs is named)."""


def check_format(state: dict, expected: str, what: str) -> None:
    if state.get("format") != expected:
        raise PositionError(f"not a {what} state of this version (format={state.get('format')!r}, "
                            f"expected {expected!r}): it cannot be continued")


def differences(state: dict, mine: dict) -> dict:
    """key → (saved, now) for every key of ``mine`` the saved state disagrees on."""
    return {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}


def require_same(state: dict, mine: dict) -> None:
    diff = differences(state, mine)
    if diff:
        raise PositionError(f"the saved data position belongs to a different stream (saved vs now: "
                            f"{diff}); the stream is a function of these, so it cannot continue "
                            "where it stopped")


def wds_state(positions: dict[int, dict], *, world_size: int, **fields) -> dict:
    """The WebDataset state: ``fields`` plus the positions of every rank's slots (one
    all-gather when a process group of ``world_size`` is up; every rank calls it)."""
    out = {str(v): copy.deepcopy(p) for v, p in positions.items()}
    if world_size > 1 and dist.get_world_size() == world_size:
        every = [None] * world_size
        tdist.all_gather_object(every, out)
        out = {k: p for part in every for k, p in part.items()}
    return {"format": WDS_FORMAT, **fields, "world_size": world_size, "positions": out}


def wds_resume(state: dict, *, seed: int, resampled: bool, num_shards: int, global_batch: int,
               world_size: int, rank: int) -> tuple[int, dict[int, dict]]:
    """(slot count, this rank's slot positions) from a WebDataset state, or PositionError."""
    check_format(state, WDS_FORMAT, "WebDatasetStream")
    require_same(state, {"seed": seed, "resampled": resampled, "num_shards": num_shards})
    g, slots = state["global_batch"], state["slots"]
    if g != global_batch:
        hint = (f"; at world {world_size} that is data.batch_size={g // world_size}"
                if g % world_size == 0 else "")
        raise PositionError(f"the saved data position belongs to a different stream: saved at global "
                            f"batch {g} (batch_size × world size), this run uses {global_batch}; keep "
                            f"the global batch constant across a resume{hint}")
    if slots % world_size:
        raise PositionError(f"the saved data position has {slots} virtual slots (world size × data "
                            f"workers when the run started), which {world_size} ranks cannot split "
                            f"evenly; resume on a world size that divides {slots}")
    need = rank_slots(slots, world_size, rank)
    have = sorted(int(k) for k in state["positions"])
    if any(v not in have for v in need):
        raise PositionError(f"the saved data position holds slot(s) {have} of {slots}, this rank "
                            f"needs {need}: it was saved without the other ranks' parts (state_dict "
                            "outside their process group)")
    return slots, {v: copy.deepcopy(state["positions"][str(v)]) for v in need}


def merge_states(states: list[dict]) -> dict:
    """One WebDataset state from the per-rank states of one save (what ``state_dict``
    builds itself under a process group)."""
    out = copy.deepcopy(states[0])
    for s in states[1:]:
        out["positions"].update(copy.deepcopy(s["positions"]))
    return out
