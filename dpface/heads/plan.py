"""Back-of-the-envelope memory and traffic of the Partial-FC head, per rank.

Pure arithmetic over the shapes the head allocates (``dpface plan``), so a run at
10⁶–10⁷ classes can be sized before it is launched. Activations are fp32 (the head
computes its logits in fp32 even under autocast); traffic is counted for ring
collectives: an all-gather moves (W−1)/W of the result through each rank, an
all-reduce twice that. The memory total is the sum of the parts, not all of which
are alive at once (the logits are freed before W's gradient exists), so it errs high;
the optimizer's own temporaries (e.g. SGD's weight-decay term, one more shard-sized
tensor) are not counted.
"""
from __future__ import annotations

from dpface.distributed.partition import check_sample_rate, class_range, sample_count

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
# Optimizer state per weight element, in units of the parameter.
OPTIMIZER_STATE = {"sgd": 1, "adamw": 2}
F32 = 4
I64 = 8
# Scalars per sample exchanged by the distributed softmax: an all-reduce MAX of
# (max logit, max score) and an all-reduce SUM of (sum exp, target logit, target score).
SOFTMAX_SCALARS = 5
CHECK_CODE = 4  # int64 codes per rank in the input check (kind, position, value, batch)


# The fused op's column tile (kernels/csrc/cpu/margin_softmax.cpp): ~2^18 scores per tile.
TILE_ELEMS, MIN_TILE, MAX_TILE = 1 << 18, 64, 4096


def plan(classes: int, dim: int, world: int, batch: int, sample_rate: float = 1.0,
         param_dtype: str = "fp32", optimizer: str = "sgd", kernel: str = "fused",
         logits_budget_mb: int = 128, subcenters: int = 1) -> dict:
    """Per-rank bytes of the head on the busiest rank (the first, which holds
    ceil(C/W) classes). ``batch`` is the per-rank batch. ``kernel="fused"`` (the default
    head) keeps at most ``logits_budget_mb`` of logits and a column tile of workspace;
    "reference" materialises the logits and their workspaces. ``subcenters`` K: every
    class has K rows (sub-centre ArcFace, reference head only)."""
    for name, v in (("classes", classes), ("dim", dim), ("world", world), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    check_sample_rate(sample_rate)
    if param_dtype not in DTYPE_BYTES:
        raise ValueError(f"param_dtype {param_dtype!r} unknown; valid: {', '.join(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"optimizer {optimizer!r} unknown; valid: {', '.join(OPTIMIZER_STATE)}")
    if kernel not in ("fused", "reference"):
        raise ValueError(f"kernel {kernel!r} unknown; valid: fused, reference")
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or subcenters < 1:
        raise ValueError(f"subcenters must be an integer >= 1, got {subcenters!r}")
    if subcenters > 1 and kernel == "fused":
        raise ValueError("sub-centres run on the reference head: use kernel reference")
    lo, hi = class_range(classes, world, 0)
    c_local = (hi - lo) * subcenters  # rows of the shard
    k = sample_count(hi - lo, sample_rate) * subcenters  # sampled classes bring all their rows
    b_global = batch * world
    p = DTYPE_BYTES[param_dtype]
    shard = c_local * dim * p
    logits = b_global * k * F32
    memory = {
        "weight_shard": shard,
        "optimizer_state": OPTIMIZER_STATE[optimizer] * shard,
        "weight_grad": shard,  # dense over the shard: unsampled rows get zeros
        # fp32 copies of scored rows: the gathered rows when sampling, the upcast when the
        # params are not fp32 (the cosines need no normalised copy of W)
        "scored_weight": ((k < c_local) + (param_dtype != "fp32")) * k * dim * F32,
        "logits": logits,
        # scores before the margin, softmax kept for backward, gradient of the logits
        "logit_workspace": 3 * logits,
        "gathered_embeddings": 2 * b_global * dim * F32,  # values + gradient
    }
    if kernel == "fused":
        tile = min(max(TILE_ELEMS // b_global, MIN_TILE), MAX_TILE, k)
        memory["scored_weight"] = tile * dim * F32  # one gathered tile of rows
        memory["logits"] = min(logits, (logits_budget_mb << 20) // F32 * F32)  # kept for bwd
        memory["logit_workspace"] = b_global * tile * F32
    comm = {
        "embedding_gather_fwd": (world - 1) * batch * dim * F32,
        "embedding_grad_allreduce_bwd": 2 * (world - 1) * batch * dim * F32,
        "label_gather": (world - 1) * batch * I64,
        "softmax_scalars": 2 * (world - 1) * batch * SOFTMAX_SCALARS * F32,
        "input_check": (world - 1) * CHECK_CODE * I64,
    }
    return {
        "inputs": {"classes": classes, "dim": dim, "world": world, "batch": batch,
                   "sample_rate": sample_rate, "param_dtype": param_dtype,
                   "optimizer": optimizer, "kernel": kernel, "logits_budget_mb": logits_budget_mb,
                   "subcenters": subcenters},
        "classes_per_rank": hi - lo,
        "rows_per_rank": c_local,
        "sampled_per_rank": k,
        "global_batch": b_global,
        "memory": memory,
        "memory_total": sum(memory.values()),
        "communication": comm,
        "communication_total": sum(comm.values()),
        # what a single rank would hold without sharding: W + grad + optimizer state
        "unsharded_head": classes * subcenters * dim * p * (2 + OPTIMIZER_STATE[optimizer]),
    }


def _size(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n)} B"


_LABELS = {
    "weight_shard": "W shard", "optimizer_state": "optimizer state", "weight_grad": "W gradient",
    "scored_weight": "scored rows (fp32 copies)", "logits": "logits [B_global, K] fp32",
    "logit_workspace": "scores + softmax + logit grad", "gathered_embeddings":
    "gathered embeddings + grad", "embedding_gather_fwd": "embedding all-gather (fwd)",
    "embedding_grad_allreduce_bwd": "embedding grad all-reduce (bwd)",
    "label_gather": "label all-gather", "softmax_scalars": "softmax max/sum/target scalars",
    "input_check": "input check codes",
}


_FUSED_LABELS = {"scored_weight": "gathered row tile", "logits": "kept logits (budget)",
                 "logit_workspace": "column-tile workspace"}


def format_plan(d: dict) -> str:
    """A human-readable table of :func:`plan`'s result."""
    i = d["inputs"]
    w = 34
    lines = [
        f"Partial-FC head: {i['classes']:,} classes x {i['dim']}, world {i['world']}, "
        f"batch {i['batch']}/rank ({d['global_batch']:,} global), sample rate "
        f"{i['sample_rate']}, {i['param_dtype']} params, {i['optimizer']}",
        f"classes per rank {d['classes_per_rank']:,}"
        + (f" ({d['rows_per_rank']:,} rows: {i['subcenters']} sub-centres each)" if i["subcenters"] > 1 else "")
        + f"; rows scored per step >= {d['sampled_per_rank']:,}",
        "",
        "memory per rank (busiest rank)",
    ]
    labels = dict(_LABELS, **(_FUSED_LABELS if i["kernel"] == "fused" else {}))
    lines.insert(2, f"head kernel: {i['kernel']}" + (
        f" (logits kept for backward up to {i['logits_budget_mb']} MiB, the rest recomputed)"
        if i["kernel"] == "fused" else " (logits materialised)"))
    lines += [f"  {labels[k]:<{w}}{_size(v):>14}" for k, v in d["memory"].items()]
    lines += [f"  {'total':<{w}}{_size(d['memory_total']):>14}", "",
              "traffic per rank per step (ring collectives)"]
    lines += [f"  {_LABELS[k]:<{w}}{_size(v):>14}" for k, v in d["communication"].items()]
    lines += [f"  {'total':<{w}}{_size(d['communication_total']):>14}", "",
              f"unsharded head on one rank (W + grad + state): {_size(d['unsharded_head'])}"]
    return "\n".join(lines)


__all__ = ["plan", "format_plan"]
