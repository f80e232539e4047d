"""Run a function on N real processes joined in a gloo group (for multi-rank tests).

``run_distributed(fn, world_size, tmp_path, *args)`` spawns ``world_size`` processes,
joins them through a FileStore in ``tmp_path``, calls ``fn(rank, world_size, *args)``
in each and returns the per-rank return values (which must be torch.save-able). An
exception in any rank is re-raised in the caller with that rank's traceback; a run
that outlives ``timeout_s`` (a deadlock) is killed and reported as a TimeoutError.
``fn`` must be a module-level function (the spawn start method pickles it by name).
"""
from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp


def _worker(rank, fn, world_size, tmp, args, timeout_s):
    torch.set_num_threads(1)  # the test machine's few cores are shared
    out = Path(tmp) / f"rank{rank}.pt"
    try:
        tdist.init_process_group(
            "gloo", init_method=f"file://{Path(tmp) / 'store'}", rank=rank,
            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = fn(rank, world_size, *args)
        finally:
            tdist.destroy_process_group()
        _write(out, {"ok": result})
    except BaseException:
        _write(out, {"error": traceback.format_exc()})
        raise


def _write(path: Path, obj) -> None:
    # Atomic: the parent polls for these files while the rank is still running.
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _failed(tmp: Path, rank: int) -> bool:
    f = tmp / f"rank{rank}.pt"
    return f.exists() and "error" in torch.load(f, weights_only=False)


def run_distributed(fn, world_size: int, tmp_path, *args, timeout_s: float = 60.0) -> list:
    tmp = Path(tmp_path) / f"mp-{fn.__name__}-{world_size}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    ctx = mp.start_processes(_worker, args=(fn, world_size, str(tmp), args, timeout_s),
                             nprocs=world_size, join=False, start_method="spawn")
    procs = ctx.processes
    deadline = time.monotonic() + timeout_s
    # Poll the processes ourselves rather than ctx.join(): join() kills every rank as soon
    # as one exits by a signal, and gloo ranks on this machine sometimes abort at
    # interpreter exit ("terminate called without an active exception") after writing
    # their result. A rank counts by its result file; a real error stops the wait early.
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) and _failed(tmp, r) for r, p in enumerate(procs)):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in "
                                   f"{timeout_s:.0f} s (deadlock?)")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()  # only the processes this call started
            p.join()
    results = []
    for r in range(world_size):
        f = tmp / f"rank{r}.pt"
        if not f.exists():
            raise RuntimeError(f"rank {r} of {fn.__name__} left no result (exit code "
                               f"{procs[r].exitcode})")
        res = torch.load(f, weights_only=False)
        if "error" in res:
            raise RuntimeError(f"rank {r} of {fn.__name__} failed:\n{res['error']}")
        results.append(res["ok"])
    return results


__all__ = ["run_distributed"]
