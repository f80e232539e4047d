"""The training step, written once for every backbone-parallel implementation.

Per update: N micro-batches (``train.accumulate``), each a full head step over its
global batch (the head gathers its embeddings, its loss is the mean over them) whose
loss is divided by N, so the accumulated gradient is the mean of the N micro-batch
gradients — the gradient of their union where the loss is a per-sample mean over a
fixed W (dense update, no BatchNorm, no batch-dependent scale). Then one unscale,
one global grad norm over backbone and head (the head's shards summed over the head
group), one shared skip decision, one clip, one step.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as tdist

from dpface import distributed as dist
from dpface.data.transforms import normalize
from dpface.engine.amp import autocast
from dpface.heads.sharding import ROW_PARAMS


def head_grad_params(head) -> tuple[list, list]:
    """(row-gradient holders, replicated parameters) of a head after backward. Rows are
    the weight/bias shard, or with ``update="sampled"`` the step's sampled-row leaves."""
    rows = [p for n, p in head.named_parameters() if n in ROW_PARAMS and p.grad is not None]
    rows += head.row_leaves()
    ids = {id(p) for p in rows}
    return rows, [p for p in head.parameters() if p.grad is not None and id(p) not in ids]


def _sq(params, device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.nn.utils.get_total_norm(grads).float().pow(2)  # foreach kernels


def head_grad_sq_norm(rows, replicated, device, group=None) -> torch.Tensor:
    """Squared L2 norm of the head's gradient, the same on every rank of ``group``: the
    row shards are disjoint (squares summed over the group, one all-reduce), replicated
    parameters (a learned scale) are counted once."""
    shard = _sq(rows, device)
    if dist.is_initialized():
        tdist.all_reduce(shard, group=group)
    return shard + _sq(replicated, device)


class TrainStep:
    """One optimizer update from ``accumulate`` micro-batches; see the module docstring.

    ``aux``: (name, module, weight) of the embedding losses; a module with
    ``needs_quality`` receives the backbone's quality scores (``forward(x,
    with_quality=True)``, the QAN backbone)."""

    def __init__(self, parallel, head, head_opt, aux, ctx, *, grad_clip: float,
                 amp_dtype: torch.dtype | None, accumulate: int = 1, with_quality: bool = False,
                 freeze_backbone_steps: int = 0, backbone: torch.nn.Module | None = None,
                 aux_opt: torch.optim.Optimizer | None = None):
        self.parallel, self.head, self.head_opt = parallel, head, head_opt
        self.aux, self.ctx = aux, ctx
        self.grad_clip, self.amp_dtype = grad_clip, amp_dtype
        self.accumulate, self.with_quality = accumulate, with_quality
        # Fine-tuning: before this step the backbone runs without gradient (its optimizer
        # skips it: no momentum, no decay) and with BatchNorm in eval mode (its statistics
        # stay the trained ones); ``backbone`` is the module whose mode is set.
        self.freeze_steps, self.backbone = freeze_backbone_steps, backbone
        # Aux losses' own parameters (a distillation projection): replicated like the
        # backbone, so their gradient is averaged over the data group, then stepped by aux_opt.
        self.aux_params = [p for _, m, _ in aux for p in m.parameters() if p.requires_grad]
        self.aux_opt = aux_opt
        if self.aux_params and aux_opt is None:
            raise ValueError("aux losses with parameters need their optimizer (aux_opt)")
        if freeze_backbone_steps and backbone is None:
            raise ValueError("freeze_backbone_steps needs the backbone module (to set its mode)")
        if head.update == "sampled" and accumulate > 1:
            raise ValueError("gradient accumulation needs head.update: dense (the sampled-row "
                             "optimizer steps the rows of one micro-batch)")

    def _forward(self, images, labels, step: int):
        """(loss with its graph, the micro-batch's metrics as detached 0-dim tensors)."""
        dev = self.ctx.device
        x = normalize(images.to(dev, non_blocking=True))
        labels = labels.to(dev, non_blocking=True)
        quality = None
        frozen = torch.no_grad() if step < self.freeze_steps else contextlib.nullcontext()
        with autocast(dev, self.amp_dtype), frozen:
            if self.with_quality:
                emb, quality = self.parallel(x, with_quality=True)
            else:
                emb = self.parallel(x)
        if emb.dtype in (torch.float16, torch.bfloat16):  # AMP's output; a float64 model stays float64
            emb = emb.float()
        out = self.head(emb, labels, step)
        loss, values = out.loss, {"acc": torch.as_tensor(out.accuracy)}
        if getattr(out, "dropped", None) is not None:  # sub-centre drop: share of the global batch left out
            values["head/dropped"] = out.dropped
        for name, fn, w in self.aux:
            if getattr(fn, "needs_quality", False):
                v = fn(emb, labels, step, quality.float())
            elif getattr(fn, "needs_images", False):
                v = fn(emb, labels, step, images=x)
            else:
                v = fn(emb, labels, step)
            values[f"aux/{name}"] = v.detach()
            loss = loss + w * v
        values["loss"] = loss.detach()
        return loss, values

    def __call__(self, micro_batches, step: int) -> dict:
        """Train on ``micro_batches`` (``accumulate`` (images, labels) pairs); returns
        the step's metrics (loss, acc and aux values averaged over micro-batches)."""
        bp, n = self.parallel, len(micro_batches)
        if n != self.accumulate:
            raise ValueError(f"expected {self.accumulate} micro-batches, got {n}")
        scale = bp.loss_scale  # this step's scale (the backbone's step may change it)
        if self.freeze_steps:
            self.backbone.train(step >= self.freeze_steps)
        sums: dict = {}
        for i, (images, labels) in enumerate(micro_batches):
            with bp.accumulating(last=i == n - 1):
                loss, values = self._forward(images, labels, step)
                bp.backward(loss / n if n > 1 else loss)
            for k, v in values.items():
                sums[k] = sums[k] + v if k in sums else v
        # one host copy of every metric, not one per value and micro-batch
        keys = list(sums)
        means = dict(zip(keys, (torch.stack([sums[k].float().to(self.ctx.device) for k in keys]) / n).tolist()))

        rows, replicated = head_grad_params(self.head)
        aux = [p for p in self.aux_params if p.grad is not None]
        if aux and dist.is_initialized() and tdist.get_world_size(self.ctx.data_group) > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in aux])
            tdist.all_reduce(flat, group=self.ctx.data_group)
            flat /= tdist.get_world_size(self.ctx.data_group)
            chunks = flat.split([p.numel() for p in aux])
            torch._foreach_copy_([p.grad for p in aux], [c.view_as(p.grad) for c, p in zip(chunks, aux)])
        replicated = replicated + aux
        hparams = rows + replicated
        if scale != 1.0:
            torch._foreach_mul_([p.grad for p in hparams], 1.0 / scale)
        sq = head_grad_sq_norm(rows, replicated, self.ctx.device, self.ctx.head_group)
        bb = bp.grad_sq_norm()
        if bb is not None:
            sq = sq + bb
        norm_t = sq.sqrt()
        norm = norm_t.item()
        finite = math.isfinite(norm)  # the same on every rank: the norm is all-reduced
        if finite and 0 < self.grad_clip < norm:
            # torch.nn.utils.clip_grads_with_norm_'s coefficient, a float32 tensor
            coef = (self.grad_clip / (norm_t + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([p.grad for p in hparams], coef)
            if bp.norm_includes_backbone:
                bp.clip_(coef)
        stepped = bp.step(finite)
        if stepped:
            self.head_opt.step()
            if self.aux_opt is not None:
                self.aux_opt.step()
        self.head_opt.zero_grad(set_to_none=True)
        if self.aux_opt is not None:
            self.aux_opt.zero_grad(set_to_none=True)
        if not bp.norm_includes_backbone:  # ZeRO: the backbone's norm comes from its step
            other = bp.backbone_grad_norm() if stepped else None
            norm = math.sqrt(norm ** 2 + other ** 2) if other is not None else float("nan")
        return {**means, "grad_norm": norm if stepped else float("nan"), "skipped": 0 if stepped else 1}
