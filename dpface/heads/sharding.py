"""Head checkpoints that survive a change of world size.

A shard file holds one rank's rows of W (and bias) with the optimizer's per-row state
(momentum, Adam moments) and its global class range. Loading at another world size
reads each old shard memory-mapped and copies only the rows the new rank owns, so no
rank ever holds the whole matrix; ``merge_shards`` (an offline export tool) is the one
place that does.

Shard state layout (a plain dict, loadable with ``weights_only=True``)::

    {'format': 'dpface.head_shard/1', 'num_classes', 'class_start', 'class_end',
     'world_size', 'rank', 'subcenters': K,        # absent in older files: 1
     'rows':    {'weight': [n·K, D], 'bias': [n·K], 'weight.momentum_buffer': [n·K, D],
                 'weight.exp_avg': ..., 'weight.exp_avg_sq': ...,
                 'weight.step': [n·K] (a per-row count: SampledRowAdamW), ...},
     'scalars': {'state': {'weight.step': tensor, ...},          # non-row optimizer state
                 'param_groups': [{'lr':..., 'param_names': [...], ...}, ...],
                 'params': {'transform.s': tensor, ...}}}        # replicated head params

n = class_end − class_start classes; with K sub-centres per class (sub-centre ArcFace) a
class's K rows are consecutive (class-major: row i·K + k is sub-centre k of class
class_start + i), so resharding by class moves blocks of K rows. Optimizer state whose
first dimension is the parameter's row count (buffers, a per-row step count) is row
state; anything else (a dense optimizer's scalar step) is non-row state.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch

# class_range/sample_count are re-exported: dpface.heads has always offered them.
from dpface.distributed.partition import class_range, gather_rows, sample_count
from dpface.io import atomic_save

FORMAT = "dpface.head_shard/1"
# The head's parameters split by class rows (one shard per rank); any other head
# parameter (a learned scale) is replicated on every rank.
ROW_PARAMS = ("weight", "bias")


def shard_filename(rank: int, world_size: int) -> str:
    return f"head-rank{rank:05d}-of-{world_size:05d}.pt"


# -- saving ----------------------------------------------------------------------
def _own(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its bytes (torch.save writes a view's whole storage)."""
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _param_names(head, optimizer) -> dict[int, str]:
    names = {id(p): n for n, p in head.named_parameters()}
    if optimizer is not None:
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in names:
                    raise ValueError("the head optimizer must hold only the head's parameters; "
                                     f"found a parameter of shape {list(p.shape)} that is not "
                                     "the head's")
    return names


def head_shard_state(head, optimizer=None) -> dict:
    """This rank's shard: rows of the head's parameters and of the optimizer's per-row
    state, plus the non-row optimizer state. Tensors are CPU views of the live ones
    where possible: save them before the next step."""
    names = _param_names(head, optimizer)
    rows: dict[str, torch.Tensor] = {}
    params: dict[str, torch.Tensor] = {}
    for n, p in head.named_parameters():
        (rows if n in ROW_PARAMS else params)[n] = _own(p)
    state: dict[str, Any] = {}
    groups = []
    if optimizer is not None:
        for g in optimizer.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            hyper["param_names"] = [names[id(p)] for p in g["params"]]
            groups.append(hyper)
            for p in g["params"]:
                n = names[id(p)]
                for k, v in optimizer.state.get(p, {}).items():
                    if v is None:
                        continue
                    if n in ROW_PARAMS and torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == p.shape[0]:
                        rows[f"{n}.{k}"] = _own(v)
                    else:
                        state[f"{n}.{k}"] = _own(v) if torch.is_tensor(v) else v
    return {
        "format": FORMAT, "num_classes": head.num_classes, "class_start": head.class_start,
        "class_end": head.class_end, "world_size": head.world_size, "rank": head.rank,
        "subcenters": _subcenters(head), "rows": rows,
        "scalars": {"state": state, "param_groups": groups, "params": params},
    }


def _subcenters(head_or_state) -> int:
    """Rows per class: a head's ``subcenters``, or a shard state's (absent = 1)."""
    if isinstance(head_or_state, dict):
        return int(head_or_state.get("subcenters", 1))
    return int(getattr(head_or_state, "subcenters", 1))


def save_head_shard(head, optimizer, path: str | os.PathLike) -> Path:
    """Write this rank's shard atomically (every rank writes its own file)."""
    return atomic_save(head_shard_state(head, optimizer), path)


# -- loading at any world size ---------------------------------------------------
def _equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


class HeadShardError(ValueError):
    """A head shard file is unreadable, or the set of shards does not fit together; the
    message names the file (the CLI reports it as bad input, exit 2)."""


def _open_shards(shard_files: Iterable[str | os.PathLike]) -> tuple[int, list[tuple[Path, dict]]]:
    """Open (memory-mapped) and cross-check a complete set of shard files."""
    opened = []
    for f in map(Path, shard_files):
        if not f.is_file():
            raise FileNotFoundError(f"head shard file {f} does not exist")
        try:
            st = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:  # a global weights_only does not allow: never run it
            raise HeadShardError(f"{f}: refused to load: it holds objects other than tensors and plain "
                                 "containers (a crafted or foreign file?)") from e
        except Exception as e:  # truncated, not a zip, unpicklable
            first = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch appends a paragraph of advice
            raise HeadShardError(f"cannot read head shard file {f} (truncated or corrupt?): {first}") from e
        if not isinstance(st, dict) or st.get("format") != FORMAT:
            raise HeadShardError(f"{f} is not a dpface head shard (format {FORMAT!r} expected)")
        opened.append((f, st))
    if not opened:
        raise HeadShardError("no head shard files given")
    f0, s0 = opened[0]
    num_classes, k0 = s0["num_classes"], _subcenters(s0)
    for f, st in opened[1:]:
        if st["num_classes"] != num_classes:
            raise HeadShardError(f"num_classes mismatch: {f0} has {num_classes}, {f} has "
                             f"{st['num_classes']}")
        if _subcenters(st) != k0:
            raise HeadShardError(f"sub-centres per class differ: {f0} has {k0}, {f} has {_subcenters(st)}")
        if st["rows"].keys() != s0["rows"].keys():
            raise HeadShardError(f"row tensors differ: {f0} has {sorted(s0['rows'])}, {f} has "
                             f"{sorted(st['rows'])} (optimizer state missing on one rank?)")
        for k, t in st["rows"].items():
            if t.shape[1:] != s0["rows"][k].shape[1:] or t.dtype != s0["rows"][k].dtype:
                raise HeadShardError(f"'{k}' of {f} is {t.dtype}{list(t.shape)}, of {f0} "
                                 f"{s0['rows'][k].dtype}{list(s0['rows'][k].shape)}")
        if not _equal(st["scalars"], s0["scalars"]):
            raise HeadShardError(f"non-row state (optimizer step, hyper-parameters, replicated "
                             f"params) differs between {f0} and {f}")
    for f, st in opened:
        lo, hi = st["class_start"], st["class_end"]
        if not 0 <= lo < hi <= num_classes:
            raise HeadShardError(f"{f} claims classes [{lo}, {hi}) outside [0, {num_classes})")
        for k, t in st["rows"].items():
            if t.dim() == 0 or t.shape[0] != (hi - lo) * k0:
                n = t.shape[0] if t.dim() else 0
                raise HeadShardError(f"'{k}' of {f} has {n} rows for classes [{lo}, {hi})"
                                     + (f" with {k0} sub-centres each" if k0 > 1 else ""))
    opened.sort(key=lambda fs: fs[1]["class_start"])
    covered = 0
    prev = None
    for f, st in opened:
        lo, hi = st["class_start"], st["class_end"]
        if lo < covered:
            raise HeadShardError(f"shards overlap: {prev} covers up to class {covered}, {f} starts "
                             f"at {lo}")
        if lo > covered:
            raise HeadShardError(f"classes [{covered}, {lo}) are in no shard (a shard file is "
                             f"missing before {f})")
        covered, prev = hi, f
    if covered != num_classes:
        raise HeadShardError(f"classes [{covered}, {num_classes}) are in no shard (a shard file is "
                         f"missing after {prev})")
    return num_classes, opened


def _assemble(num_classes: int, opened, class_start: int, class_end: int) -> dict:
    if not 0 <= class_start < class_end <= num_classes:
        raise HeadShardError(f"requested classes [{class_start}, {class_end}) are not a non-empty "
                         f"part of [0, {num_classes})")
    s0 = opened[0][1]
    k = _subcenters(s0)  # class c's rows are [c·K, (c+1)·K): reshard in row units
    # a shard with nothing of ours is never touched: its mapped pages are not read
    rows = {n: gather_rows(((st["class_start"] * k, st["class_end"] * k, st["rows"][n]) for _, st in opened),
                           class_start * k, class_end * k) for n in s0["rows"]}
    return {"format": FORMAT, "num_classes": num_classes, "class_start": class_start,
            "class_end": class_end, "world_size": None, "rank": None, "subcenters": k,
            "rows": rows, "scalars": s0["scalars"]}


def load_resharded(shard_files: Iterable[str | os.PathLike], class_start: int,
                   class_end: int) -> dict:
    """Rows [class_start, class_end) gathered from a complete set of shard files saved
    at any world size. The files are memory-mapped; only overlapping rows are copied.

    Errors (HeadShardError unless noted) name the file: missing file (FileNotFoundError),
    unreadable file, num_classes mismatch, overlapping shards, classes in no shard."""
    num_classes, opened = _open_shards(shard_files)
    return _assemble(num_classes, opened, class_start, class_end)


def apply_shard_state(head, optimizer, state: dict) -> None:
    """Restore a (possibly resharded) state into ``head`` and its optimizer.

    The optimizer is the plain torch optimizer over the head's parameters (or a sampled-row
    one), built the same way as at save time (same groups, same parameter order). Everything
    is checked, and the optimizer state loaded (its own checks may refuse it), before any
    head parameter is written: a refused state leaves head and optimizer as they were."""
    if (state["num_classes"], state["class_start"], state["class_end"]) != \
            (head.num_classes, head.class_start, head.class_end):
        raise ValueError(
            f"shard state is for classes [{state['class_start']}, {state['class_end']}) of "
            f"{state['num_classes']}, the head owns [{head.class_start}, {head.class_end}) of "
            f"{head.num_classes}; use load_resharded for the head's range")
    if _subcenters(state) != _subcenters(head):
        raise HeadShardError(f"the checkpoint head has {_subcenters(state)} sub-centre(s) per class, this "
                             f"head {_subcenters(head)} (head.subcenters must match the checkpoint's)")
    rows, scalars = state["rows"], state["scalars"]
    params = dict(head.named_parameters())
    names = _param_names(head, optimizer)
    expected = {n for n in params if n in ROW_PARAMS}
    given = {k for k in rows if "." not in k}
    if given != expected:
        raise ValueError(f"shard state holds rows for {sorted(given)}, the head has "
                         f"{sorted(expected)} (transform with/without bias?)")
    sources = {}
    for n, p in params.items():
        src = rows[n] if n in ROW_PARAMS else scalars["params"].get(n)
        if src is None:
            raise ValueError(f"shard state has no value for head parameter '{n}'")
        if src.shape != p.shape:
            raise ValueError(f"'{n}' in the shard state is {list(src.shape)}, the head's is "
                             f"{list(p.shape)}")
        sources[n] = src
    if optimizer is not None:
        _load_optimizer(optimizer, names, rows, scalars)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(sources[n])


def _load_optimizer(optimizer, names, rows, scalars) -> None:
    saved_groups = scalars["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"shard state has {len(saved_groups)} optimizer param groups, the "
                         f"optimizer {len(optimizer.param_groups)}")
    index: dict[str, int] = {}
    groups = []
    for saved, g in zip(saved_groups, optimizer.param_groups):
        here = [names[id(p)] for p in g["params"]]
        if saved.get("param_names") != here:
            raise ValueError(f"optimizer group holds {here}, the saved one "
                             f"{saved.get('param_names')}: build the optimizer as at save time")
        ids = []
        for n in here:
            index[n] = len(index)
            ids.append(index[n])
        groups.append({**{k: v for k, v in saved.items() if k != "param_names"}, "params": ids})
    per_row = [k for k in rows if k.endswith(".step")]
    # A dense torch Adam(W) would load them and fail at its first step ([n] is no scalar).
    if per_row and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise HeadShardError(
            f"the checkpoint's head optimizer state has per-row step counts ({per_row[0]}: saved "
            f"with head.update=sampled and AdamW); {type(optimizer).__name__} keeps one step count. "
            f"Resume with head.update=sampled")
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in list(scalars["state"].items()) + [(k, v) for k, v in rows.items() if "." in k]:
        n, k = key.rsplit(".", 1)
        if n not in index:
            raise ValueError(f"optimizer state '{key}' is for a parameter the optimizer lacks")
        opt_state.setdefault(index[n], {})[k] = v
    # load_state_dict moves and casts the state to each parameter's device and dtype.
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


def merge_shards(shard_files: Iterable[str | os.PathLike], out_path: str | os.PathLike) -> Path:
    """One file with the whole matrix (for ``dpface export-head``; offline only: it holds
    all C rows in memory). The result is itself a one-shard checkpoint."""
    num_classes, opened = _open_shards(shard_files)
    state = _assemble(num_classes, opened, 0, num_classes)
    state.update(world_size=1, rank=0)
    return atomic_save(state, out_path)


__all__ = ["HeadShardError", "class_range", "sample_count", "shard_filename", "atomic_save",
           "head_shard_state", "save_head_shard", "load_resharded", "apply_shard_state", "merge_shards"]
