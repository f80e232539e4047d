"""Model-parallel Partial-FC classifier (after An et al., "Partial FC", 2021).

Each rank holds a contiguous block of class centres W[lo:hi). A step gathers the
embeddings and labels of the global batch, scores them against this rank's rows (all
of them, or the positives plus a random sample of negatives), applies the logit
transform, and computes the softmax cross-entropy over all classes of all ranks with
O(B_global) scalars exchanged: a max, a sum of exponentials and the target logit per
sample. Nothing of size C ever crosses ranks.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpface import ops
from dpface.distributed import get_rank, get_world_size
from dpface.distributed.collectives import all_gather, all_gather_with_grad, all_reduce_sum
from dpface.distributed.partition import check_sample_rate, class_range, sample_count
from dpface.heads.dist_ce import CosineScores, DistSoftmaxCE, compute_dtype, fused_context, fused_softmax_ce
from dpface.heads.rows import init_rows
from dpface.heads.sampling import hardness, top_rows, uniform_keys
from dpface.heads.subcenters import check_subcenter_args, drop_weights
from dpface.losses.margin import HeadContext, LogitTransform
from dpface.ops.margin_softmax import rows_sink
from dpface.seeding import Stream, seed_int

NEGATIVES = ("uniform", "hard")
UPDATES = ("dense", "sampled")
KERNELS = ("auto", "fused", "chunked", "reference")
COMPILED = ("fused", "chunked")  # the kernels that need dpface._kernels
PRECISIONS = ("fp32", "bf16")


@dataclass
class SampledRows:
    """The last step's rows in ``update="sampled"`` mode: local row indices of W (None =
    all rows; with sub-centres, all K rows of each sampled class) and the leaves standing
    in for ``weight``/``bias`` rows, which receive the [K, D] (and [K]) gradients the row
    optimizer applies."""
    idx: torch.Tensor | None
    leaves: dict  # "weight"/"bias" -> leaf tensor


# Input-check codes exchanged between ranks (see PartialFC._check_inputs).
_OK, _BAD_EMBEDDINGS, _BAD_LABEL_SHAPE, _BAD_LABEL_DTYPE, _LABEL_OUT_OF_RANGE, _EMPTY_BATCH = range(6)


@dataclass
class HeadOutput:
    loss: torch.Tensor  # scalar, mean over the global batch, the same on every rank
    accuracy: torch.Tensor  # top-1 over the global batch (among the scored classes), no grad
    num_sampled: int  # rows of this rank's shard scored this step (classes × sub-centres)
    # Fraction of the global batch dropped from the loss (sub-centre drop), when active.
    dropped: torch.Tensor | None = None


class PartialFC(nn.Module):
    """Model-parallel margin-softmax classifier with optional class sampling.

    Rank r owns classes [class_start, class_end) = ``class_range(C, world, r)``; its
    parameter ``weight`` [C_local, D] (and ``bias`` [C_local] when the transform has
    one) holds only those rows. Do not wrap the head in DDP: its gradients are local
    and must not be averaged. Every rank must call ``forward`` and ``backward`` with
    the same ``step`` (both contain collectives), with equal per-rank batch sizes.

    The loss is the mean over the *global* batch and is identical on every rank; the
    embedding gradient is multiplied by the world size on its way back (see
    ``dpface.distributed.collectives``) so that DDP's averaging of backbone gradients gives
    the single-process gradient.

    Sampling (``sample_rate`` r < 1): each step scores the positives (classes of this
    shard present in the global batch) plus uniformly drawn negatives, up to
    max(#positives, ceil(r·C_local)) rows, drawn from a generator seeded by (seed,
    step, rank) — reproducible, different per step. ``weight.grad`` stays dense
    [C_local, D]; rows not sampled get exactly zero there, but an optimizer still
    moves them: SGD with momentum keeps applying the decaying momentum buffer, weight
    decay (SGD's L2 term or AdamW's decoupled decay) shrinks them every step, and
    AdamW's moments keep producing updates from past gradients for a while (m decays
    by β1 per step, v more slowly). This is a known trait of Partial FC with dense
    optimizers. Cosine logits ignore a row's norm, but the gradient of a normalised
    row scales as 1/‖W_j‖, so a row shrunk by decay takes larger steps when next
    sampled. The loss and accuracy only cover the scored classes.

    Hard negatives (``negatives="hard"``, after DP-Softmax's dominant prototypes):
    instead of uniform negatives, each rank keeps its positives plus the rows with the
    highest score against any sample of the global batch (the dominant negatives),
    same count as uniform sampling. The price: picking them scores *every* row of the
    shard each step — a [B_global × C_local × D] matmul under no_grad, the forward
    FLOPs of rate 1.0 (about a third of a rate-1.0 step, since nothing of it is
    backpropagated) — in row blocks of at most HARD_BLOCK_ELEMENTS scores, so memory
    stays that of the sampled step; and every row of W is read each step. What it
    saves is the backward, the logits kept for it and the gradient of unscored rows.
    The choice is deterministic given the embeddings (no RNG).

    Update mode (``update``): "dense" (default) leaves the gradient dense as above.
    "sampled" gives the step's rows to autograd as a separate leaf, so backward makes
    only a [K, D] gradient (``sampled_rows()``/``row_leaves()``; ``weight.grad`` stays
    None) and :class:`dpface.heads.row_optim.SampledRowSGD` (or ``SampledRowAdamW``)
    updates just those rows — the original Partial FC's lazy semantics: unsampled rows get
    no momentum/moment step and no weight decay. Equal to dense SGD/AdamW at sample rate 1.

    The transform gets a :class:`HeadContext` (step, group, norms if it asks for them)
    and may weight each sample's cross-entropy (``loss_weight``, Knot-Magnify).

    Kernel (``kernel``): "fused" runs the compiled margin-softmax op (``dpface.ops``), which
    tiles the columns, gathers the sampled rows itself and never materialises the [B, K]
    logits (it keeps up to ``logits_budget_mb`` of them for backward and recomputes the
    rest); "chunked" the same contract with the GEMMs on the vendor's library (cuBLAS /
    ATen) and only the epilogues compiled (``dpface.ops.chunked``); "reference" the PyTorch
    code below; "auto" the fused op where it is built and expresses the transform, or on
    CUDA whichever of fused / chunked :meth:`autotune` timed faster (:meth:`kernel_choice`
    says which, and why). ``precision="bf16"`` (compiled ops only) rounds the GEMM operands
    to bf16, accumulating in fp32.

    Sub-centre ArcFace (``subcenters`` K > 1, after Deng et al., "Sub-center ArcFace",
    ECCV 2020, for noisy labels): each class has K rows (sub-centres), all on the class's
    rank, class-major (row i·K + k of the shard is sub-centre k of class class_start + i;
    ``weight`` is [C_local·K, D]), initialised like rows of a C·K-row matrix (row r's value
    depends on (seed, r) only). The class cosine is the max over its sub-centres, before the
    margin; the max's gradient reaches the closest sub-centre only. Sampling draws classes
    (a sampled class brings all K rows). Needs a cosine transform; runs on the PyTorch
    reference path (the fused op scores one row per class). ``drop_after`` > 0: from step
    ``drop_after`` on, a sample whose angle to its class's closest sub-centre exceeds
    ``drop_angle`` degrees (likely a wrong label) is dropped: it adds nothing to the loss or
    any gradient, and the loss is the mean over the *kept* samples of the global batch
    (the same on every rank; 0, with zero gradients, if all are dropped).
    ``HeadOutput.dropped`` is the dropped fraction. Accuracy still counts every sample.

    ``rank``/``world_size`` overrides build a shard without a matching process group
    (checkpoint tools, tests); such a head refuses ``forward``.
    """

    def __init__(self, embedding_size: int, num_classes: int, transform: LogitTransform,
                 sample_rate: float = 1.0, seed: int = 0, group=None, *,
                 negatives: str = "uniform", update: str = "dense", kernel: str = "auto",
                 precision: str = "fp32", logits_budget_mb: int = 128,
                 subcenters: int = 1, drop_after: int = 0, drop_angle: float = 75.0,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if not isinstance(transform, LogitTransform):
            raise TypeError(f"transform must be a LogitTransform, got {type(transform).__name__}")
        if transform.normalize and transform.bias:
            raise ValueError("a bias makes no sense with normalised (cosine) scores")
        check_sample_rate(sample_rate)
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        self.negatives = negatives
        if update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(UPDATES)}, got {update!r}")
        self.update = update
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if logits_budget_mb < 0:
            raise ValueError(f"logits_budget_mb must be >= 0, got {logits_budget_mb}")
        self.subcenters, self.drop_after, self.drop_angle = check_subcenter_args(
            transform, subcenters, drop_after, drop_angle)
        if self._reference_only() and (kernel in COMPILED or precision == "bf16"):
            key = f"kernel='{kernel}'" if kernel in COMPILED else "precision='bf16' (compiled ops only)"
            raise ValueError(f"{key} cannot run {self._reference_only()}; use kernel='auto' or 'reference'")
        self.kernel, self.precision = kernel, precision
        self._auto_impl, self._auto_note = "fused", ""  # kernel=auto: autotune() may pick chunked
        self._forced_reference: str | None = None  # use_reference()
        self.logits_budget_mb = int(logits_budget_mb)
        self._sampled: SampledRows | None = None
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.transform = transform
        transform.bind_head(self.num_classes)
        self.sample_rate = check_sample_rate(sample_rate)
        self.seed = int(seed)
        self.group = group
        self.world_size = get_world_size(group) if world_size is None else int(world_size)
        self.rank = get_rank(group) if rank is None else int(rank)
        self.class_start, self.class_end = class_range(self.num_classes, self.world_size, self.rank)
        self.num_local = self.class_end - self.class_start
        k = self.subcenters
        self.weight = nn.Parameter(init_rows(self.class_start * k, self.class_end * k,
                                             self.embedding_size, self.seed))
        if transform.bias:
            self.bias = nn.Parameter(torch.zeros(self.num_local))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_end}), rank={self.rank}/"
                f"{self.world_size}, sample_rate={self.sample_rate}, negatives={self.negatives}, "
                f"update={self.update}, kernel={self.kernel}, precision={self.precision}"
                + (f", subcenters={self.subcenters}" if self.subcenters > 1 else "")
                + (f", drop_after={self.drop_after}, drop_angle={self.drop_angle}" if self.drop_after else ""))

    def _reference_only(self) -> str | None:
        """Why the fused op cannot run this head's configuration (None: it can)."""
        if self.subcenters > 1:
            return (f"subcenters={self.subcenters} (the fused op scores one row per class, not the "
                    f"max over a class's sub-centres)")
        if self.drop_after > 0:
            return f"drop_after={self.drop_after} (sample dropping is on the reference path only)"
        return None

    def _rows_of(self, idx: torch.Tensor | None) -> torch.Tensor | None:
        """Local row indices of W for local class indices (all K sub-centres of each)."""
        if idx is None or self.subcenters == 1:
            return idx
        k = self.subcenters
        return (idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1)

    # -- kernel choice --------------------------------------------------------------
    def kernel_choice(self, device_type: str) -> tuple[str | None, str]:
        """(the compiled implementation to run — "fused" or "chunked" — or None for the
        PyTorch reference, why) for tensors on ``device_type``; raises where the config asks
        for something that cannot run (kernel=fused/chunked or precision=bf16 without the
        compiled ops). ``auto`` runs the fused op, or what :meth:`autotune` measured faster."""
        why = None
        if self._forced_reference:
            why = self._forced_reference
        elif self.kernel == "reference":
            why = "head.kernel=reference"
        elif self._reference_only():
            why = self._reference_only()
        elif self.transform.fused_margin() is None:
            why = f"{type(self.transform).__name__} is not expressible by the fused op"
        elif not ops.available(device_type):
            why = f"the compiled kernels are not built for {device_type}"
        if why is None:
            impl = self.kernel if self.kernel in COMPILED else self._auto_impl
            name = "fused margin-softmax op" if impl == "fused" else "chunked margin softmax (library GEMMs)"
            return impl, f"{name} ({device_type}, {self.precision}{self._auto_note})"
        if self.kernel in COMPILED or self.precision == "bf16":
            key = f"head.kernel={self.kernel}" if self.kernel in COMPILED else "head.precision=bf16"
            op = "chunked" if self.kernel == "chunked" else "fused"
            raise ValueError(f"{key} needs the {op} op, but {why}")
        if self.kernel == "auto" and self.transform.fused_margin() is not None \
                and not self._reference_only() and not self._forced_reference:
            ops.warn_missing("PartialFC")
        return None, f"PyTorch reference ({why})"

    def autotune(self, batch: int, device: torch.device, iters: int = 3) -> dict[str, float] | None:
        """kernel=auto where both compiled implementations run: time forward + backward of
        each on this run's shapes (``batch`` = the global batch the head sees, the sampled
        row count, D) for ``iters`` steps after a warm-up — nobody can say in advance
        whether our WMMA GEMMs or cuBLAS win on a given GPU — and keep the faster. The
        times are summed over the head group, so every rank picks the same. Returns
        {impl: ms per step}, or None where there is no choice to make."""
        if self.kernel != "auto" or self.kernel_choice(device.type)[0] is None:
            return None
        k = self.num_local if self.sample_rate >= 1.0 else \
            min(self.num_local, sample_count(self.num_local, self.sample_rate, 0))
        g = torch.Generator().manual_seed(0)
        x = F.normalize(torch.randn(batch, self.embedding_size, generator=g), dim=1).to(device)
        idx = None if k == self.num_local else torch.randperm(self.num_local, generator=g)[:k].sort().values.to(device)
        target = torch.randint(-1, k, (batch,), generator=g).to(device)
        w = self.weight.detach()
        b = None if self.bias is None else self.bias.detach()
        margin = self.transform.fused_margin()
        sink = rows_sink(k, self.embedding_size, w.dtype, device)
        times = torch.zeros(2, dtype=torch.float64)

        def step(impl):
            xx = x.clone().requires_grad_(True)
            out = ops.margin_softmax(xx, w, idx, target, margin, bias=b, w_rows_sink=sink, impl=impl,
                                     bf16=self.precision == "bf16")
            (out.lse.sum() - out.target_logit.sum()).backward()

        for i, impl in enumerate(("fused", "chunked")):
            step(impl)  # warm-up: workspaces, cuBLAS handles, caching allocator
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                step(impl)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[i] = (time.perf_counter() - t0) * 1e3 / iters
        times = all_reduce_sum(times.to(device), self.group).cpu() / max(1, self.world_size)
        ms = {"fused": times[0].item(), "chunked": times[1].item()}
        self._auto_impl = min(ms, key=ms.get)
        self._auto_note = f"; auto: fused {ms['fused']:.1f} ms vs chunked {ms['chunked']:.1f} ms per step"
        return ms

    def use_reference(self, why: str) -> None:
        """From now on the PyTorch reference (the trainer's self-check found a compiled op
        wrong on this device, with kernel=auto)."""
        self._forced_reference = why

    # -- input checks -------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Diagnose locally, then share one small code per rank, so a bad input on any
        rank raises the same error on all ranks instead of hanging the others in the
        next collective. The exchanged batch size also checks equal per-rank batches."""
        kind, pos, val = _OK, None, None
        if x.dim() != 2 or x.shape[1] != self.embedding_size:
            kind = _BAD_EMBEDDINGS
        elif labels.dim() != 1 or labels.shape[0] != x.shape[0]:
            kind = _BAD_LABEL_SHAPE
        elif labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            kind = _BAD_LABEL_DTYPE
        elif labels.numel() == 0:
            kind = _EMPTY_BATCH
        else:
            bad = (labels < 0) | (labels >= self.num_classes)
            pos = bad.long().argmax()  # first offending position (0 if none)
            val = labels[pos].long()
            kind = bad.any().long() * _LABEL_OUT_OF_RANGE  # stays on device: no sync here

        def t(v):
            return torch.as_tensor(0 if v is None else v, dtype=torch.long, device=x.device)

        code = torch.stack([t(kind), t(pos), t(val), t(x.shape[0] if x.dim() else -1)])
        codes = all_gather(code[None], self.group, check_sizes=False).tolist()

        for r, (k, p, v, _) in enumerate(codes):
            if k == _OK:
                continue
            mine = f" (here: {tuple(x.shape)} / {tuple(labels.shape)} {labels.dtype})" \
                if r == self.rank else ""
            if k == _BAD_EMBEDDINGS:
                raise ValueError(f"embeddings on rank {r} must be [batch, {self.embedding_size}]"
                                 f"{mine}")
            if k == _BAD_LABEL_SHAPE:
                raise ValueError(f"labels on rank {r} must be 1-D with one label per embedding"
                                 f"{mine}")
            if k == _BAD_LABEL_DTYPE:
                raise TypeError(f"labels on rank {r} must be an integer tensor (torch.long), not "
                                f"floating-point or bool{mine}; float labels are a classic "
                                f"cause of a constant loss")
            if k == _EMPTY_BATCH:
                raise ValueError(f"rank {r} passed an empty batch")
            raise ValueError(f"label {v} at position {p} of rank {r}'s batch is outside "
                             f"[0, {self.num_classes})")
        sizes = [c[3] for c in codes]
        if any(s != sizes[0] for s in sizes):
            listed = ", ".join(f"rank {r}: {s}" for r, s in enumerate(sizes))
            raise ValueError(f"PartialFC needs the same batch size on every rank; got {listed}. "
                             f"Use drop_last=True in the data loader.")

    def _check_group(self) -> None:
        actual = (get_rank(self.group), get_world_size(self.group))
        if actual != (self.rank, self.world_size):
            raise RuntimeError(
                f"this head was built as rank {self.rank} of {self.world_size} but the process "
                f"group says rank {actual[0]} of {actual[1]}; heads built with rank/world_size "
                f"overrides are for checkpoint tools only")

    # -- sampled-update leaves -------------------------------------------------------
    def sampled_rows(self) -> SampledRows | None:
        """The last forward's rows and leaves (``update="sampled"``), until cleared."""
        return self._sampled

    def row_leaves(self) -> list[torch.Tensor]:
        """The last forward's row leaves that hold a gradient: what the trainer must
        unscale, check, count in the grad norm and clip alongside the parameters."""
        if self._sampled is None:
            return []
        return [t for t in self._sampled.leaves.values() if t.grad is not None]

    def clear_sampled(self) -> None:
        # Drop the grads explicitly: a caller's live loss keeps the graph, and through it
        # the leaves, alive until its next step (a [C_local, D] grad at r = 1).
        if self._sampled is not None:
            for t in self._sampled.leaves.values():
                t.grad = None
        self._sampled = None

    # -- sampling -----------------------------------------------------------------
    def sample(self, labels: torch.Tensor, step: int,
               embeddings: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sorted local row indices to score this step, or None for all rows.

        ``labels`` are the global batch's labels (``embeddings`` its embeddings, needed
        for hard negatives). Positives are always kept; uniform negatives come from a
        generator seeded by (seed, step, rank) alone, hard ones are the rows scoring
        highest against the batch.
        """
        if self.sample_rate >= 1.0:
            return None
        local = labels - self.class_start
        pos = torch.unique(local[(local >= 0) & (local < self.num_local)])
        n = sample_count(self.num_local, self.sample_rate, pos.numel())
        if n >= self.num_local:
            return None
        if self.negatives == "hard":
            if embeddings is None:
                raise ValueError("hard negatives need the global batch's embeddings")
            keys = self.hardness(embeddings)
        else:
            keys = uniform_keys(self.num_local, seed_int(self.seed, Stream.NEGATIVES, step, self.rank),
                                self.weight.device)
        return top_rows(keys, pos, n)

    @torch.no_grad()
    def hardness(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[C_local]: each class's highest score (cosine, or raw logit for unnormalised
        transforms; with sub-centres, the max over them) against any sample of the batch,
        computed in blocks of classes."""
        return hardness(embeddings, self.weight, self.bias, normalize=self.transform.normalize,
                        subcenters=self.subcenters)

    def _sampled_leaves(self, rows, sinks: bool):
        """The sampled-update contract (``update: sampled``), for both paths: the step's
        rows of weight/bias get fresh leaves whose gradients the row optimizer applies to
        W[rows]; autograd stops there, so no dense [C_local, D] gradient is ever made.
        Returns ((weight, bias) to score with, (weight, bias) sinks for the fused op).

        Reference path (``sinks=False``): the leaves are detached copies of the rows and
        are what the forward scores (at rows None an alias of W: the optimizer writes W
        only after backward). Fused path: the op gathers the rows itself, so the leaves
        are zero-stride sinks its backward writes the [K, D] (and [K]) gradients into."""
        grad = torch.is_grad_enabled()
        k = self.num_local * self.subcenters if rows is None else rows.numel()
        values, sink_of, leaves = [], [], {}
        for name, d in (("weight", self.embedding_size), ("bias", None)):
            p = getattr(self, name)
            if p is None:
                values.append(None)
                sink_of.append(None)
            elif sinks:
                values.append(p.detach())
                sink = rows_sink(k, d, p.dtype, p.device) if grad and p.requires_grad else None
                if sink is not None:
                    leaves[name] = sink
                sink_of.append(sink)
            else:
                t = p.detach() if rows is None else p.detach().index_select(0, rows)
                leaves[name] = t.requires_grad_(p.requires_grad and grad)
                values.append(t)
                sink_of.append(None)
        self._sampled = SampledRows(rows, leaves) if grad else None
        return tuple(values), tuple(sink_of)

    # -- forward ------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> HeadOutput:
        step = operator.index(step)
        self._check_group()
        self._check_inputs(embeddings, labels)
        x = all_gather_with_grad(embeddings, self.group, check_sizes=False)
        y = all_gather(labels.to(x.device, torch.long), self.group, check_sizes=False)
        idx = self.sample(y, step, x if self.negatives == "hard" else None)

        local = y - self.class_start
        mine = (local >= 0) & (local < self.num_local)
        if idx is None:
            target = torch.where(mine, local, -1)
        else:
            # Positives are in idx (sorted), so searchsorted finds their exact column.
            col = torch.searchsorted(idx, local.clamp(0, self.num_local - 1))
            target = torch.where(mine, col, -1)
        impl = self.kernel_choice(x.device.type)[0]
        if impl:
            return self._forward_fused(x, idx, target, step, impl)

        rows = self._rows_of(idx)
        if self.update == "sampled":
            (w, b), _ = self._sampled_leaves(rows, sinks=False)
        elif rows is None:
            w, b = self.weight, self.bias
        else:
            w = self.weight.index_select(0, rows)
            b = None if self.bias is None else self.bias.index_select(0, rows)
        dtype = compute_dtype(self.weight.dtype)
        # Logits in full precision even under autocast: the margin on s·cos θ and the
        # exp-sum of a million columns do not survive fp16/bf16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, wf = x.to(dtype), w.to(dtype)
            if self.transform.normalize:
                scores = CosineScores.apply(F.normalize(xf, dim=1), wf)
            else:
                scores = xf @ wf.T
                if b is not None:
                    scores = scores + b.to(dtype)
            if self.subcenters > 1:  # class cosine: the closest sub-centre's
                scores = scores.view(scores.shape[0], -1, self.subcenters).max(2).values
            ctx = HeadContext(step=step, group=self.group, world_size=self.world_size)
            if self.transform.needs_norms:
                # Per scored row; with sub-centres a column is no single row (and the only
                # transform reading ‖W‖, L-Softmax, is not a cosine one: refused).
                ctx.x_norm = xf.norm(dim=1)
                ctx.w_norm = wf.norm(dim=1) if self.subcenters == 1 else None
            sample_weight = dropped = None
            if self.drop_after and step >= self.drop_after:
                has = target >= 0
                t_cos = torch.where(has, scores.detach()[torch.arange(target.numel(), device=target.device),
                                                         target.clamp(min=0)], 0.0)
                t_cos = all_reduce_sum(t_cos, self.group)  # each sample's class is on one rank
                sample_weight, dropped = drop_weights(t_cos, self.drop_angle)
            logits = self.transform(scores, target, ctx)
            weight_fn = self.transform.loss_weight if self.transform.weighted else None
            loss, accuracy = DistSoftmaxCE.apply(logits, target,
                                                  scores.detach().to(logits.dtype), self.group,
                                                  weight_fn,
                                                  None if sample_weight is None else sample_weight.to(logits.dtype))
            loss = self._add_regularizer(loss, ctx)
        n = self.num_local * self.subcenters if rows is None else rows.numel()
        return HeadOutput(loss=loss, accuracy=accuracy, num_sampled=n, dropped=dropped)

    def _add_regularizer(self, loss: torch.Tensor, ctx: HeadContext) -> torch.Tensor:
        reg = self.transform.regularizer(ctx)
        if reg is None:
            return loss
        # The same term on every rank over the whole global batch, whose gradient the
        # gather's backward sums over the ranks (then × world, for DDP's average): each
        # rank contributes 1/world of it, so value and gradient are FullFC's.
        part = reg / self.world_size
        return loss + part + (reg - part).detach()

    def _forward_fused(self, x: torch.Tensor, idx, target: torch.Tensor, step: int, impl: str = "fused") -> HeadOutput:
        w, b = self.weight, self.bias
        k = self.num_local if idx is None else idx.numel()
        w_sink = b_sink = None
        if self.update == "sampled":  # the fused path has no sub-centres: rows are idx
            (w, b), (w_sink, b_sink) = self._sampled_leaves(idx, sinks=True)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(w.dtype)
            ctx = fused_context(self.transform, xf, w, idx, target, step=step, group=self.group,
                                world_size=self.world_size)
            margin = self.transform.fused_step(ctx, compute_dtype(w.dtype))
            if margin.normalize:
                xf = F.normalize(xf, dim=1)
            elem = torch.finfo(compute_dtype(w.dtype)).bits // 8
            keep = (self.logits_budget_mb << 20) // (elem * max(1, xf.shape[0]))
            out = ops.margin_softmax(xf.contiguous(), w, idx, target, margin, bias=b,
                                     w_rows_sink=w_sink, bias_rows_sink=b_sink,
                                     bf16=self.precision == "bf16", keep_cols=keep, impl=impl)
            weight_fn = self.transform.loss_weight if self.transform.weighted else None
            loss, accuracy = fused_softmax_ce(out, self.group, weight_fn)
            loss = self._add_regularizer(loss, ctx)
        return HeadOutput(loss=loss, accuracy=accuracy, num_sampled=k)


__all__ = ["PartialFC", "HeadOutput", "SampledRows"]
