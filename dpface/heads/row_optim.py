"""Optimizers that update only the class rows a PartialFC step sampled (``update="sampled"``).

With ``PartialFC(update="sampled")`` the step's rows of W (and bias) enter the graph as
a separate leaf, so backward yields a [K, D] gradient instead of a dense [C_local, D]
one; the optimizers here apply their math to those K rows only.

:class:`SampledRowSGD` is torch SGD's math (momentum, dampening 0, L2 weight decay):

    d = g + wd·W[idx];  buf[idx] = μ·buf[idx] + d;  W[idx] -= lr·buf[idx]

:class:`SampledRowAdamW` is torch AdamW's math (decoupled weight decay), row by row, with
a step count per row (``state[weight]['step']``, int64 [rows]) so the bias correction of a
row is that of the number of times *it* was updated: a row sampled 3 times in 1000 steps
gets 1 − β^3, not 1 − β^1000 (the global count would leave its first moments almost
uncorrected, i.e. its first updates ~10× too small):

    W[idx] *= 1 − lr·wd;  t[idx] += 1
    m[idx] = β1·m[idx] + (1 − β1)·g;  v[idx] = β2·v[idx] + (1 − β2)·g²
    W[idx] -= lr/(1 − β1^t) · m[idx] / (sqrt(v[idx])/sqrt(1 − β2^t) + eps)

Lazy semantics (the original Partial FC's): a row not sampled this step is left exactly
as it is — no momentum/moment step, no weight decay, its buffers and step count are not
touched. A dense optimizer instead keeps moving unsampled rows (by μ·buf, or by Adam's
decaying moments) and shrinks them by the decay every step. So with AdamW the decay a row
receives is lr·wd per *sampled* step: over a run, rows of rare classes are decayed less
than with dense AdamW. At sample rate 1 (every row scored every step) both are the same
update (SGD bit for bit, AdamW too on the CPU: see tests/integration/test_subcenter_adamw.py).

State is kept full size ([C_local, D] buffers, the [rows] step count, zero-initialised), so
the sharded checkpoint and resharding code treat it like a dense optimizer's (the step
count reshards as a per-row tensor). Head parameters that are not rows (e.g. a learned
logit scale) get the ordinary dense update (AdamW: torch's own functional AdamW).
"""
from __future__ import annotations

import torch
from torch.optim.adam import adam as _adam_functional

from dpface.heads.sharding import ROW_PARAMS, HeadShardError
from dpface.ops.row_sgd import sgd_rows_


class OptimizerStateError(HeadShardError):
    """An optimizer state that does not fit the optimizer it is loaded into (e.g. an SGD
    checkpoint resumed under AdamW). A HeadShardError, so the CLI reports it as bad input
    (exit 2); raised before anything is changed."""


class _SampledRowOptimizer(torch.optim.Optimizer):
    """The head's parameters; rows updated from the head's sampled leaves (``_rows``, or
    ``_full_rows`` when every row was scored), other parameters densely (``_dense``)."""

    STATE_KEYS: frozenset = frozenset()  # the per-parameter state this optimizer keeps
    GROUP_KEYS: tuple = ()  # hyper-parameters its step reads from each param group

    def __init__(self, head, defaults: dict):
        name = type(self).__name__
        if getattr(head, "update", None) != "sampled":
            raise ValueError(f"{name} needs a PartialFC built with update='sampled' (a dense "
                             f"head's rows get dense gradients: use the torch optimizer)")
        super().__init__(list(head.parameters()), defaults)
        # A plain attribute, not in state_dict: the head is rebuilt, not saved, on resume.
        self._head = head
        self._row_names = {id(p): n for n, p in head.named_parameters() if n in ROW_PARAMS}

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._head.clear_sampled()  # drop the step's leaves (and their [K, D] grads)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__} does not take a closure")
        sampled = self._head.sampled_rows()
        self._begin_step()
        for group in self.param_groups:
            for p in group["params"]:
                name = self._row_names.get(id(p))
                if name is None:
                    if p.grad is not None:
                        self._dense(p, p.grad, group)
                    continue
                if p.grad is not None:
                    raise RuntimeError(
                        f"head.{name} has a dense gradient in update='sampled' mode; its rows "
                        "must be used only through the head's forward (the sampled leaf)")
                if sampled is None:
                    continue  # no forward/backward since the last zero_grad
                leaf = sampled.leaves.get(name)
                if leaf is None or leaf.grad is None:
                    continue
                if sampled.idx is None:  # every row was scored
                    self._full_rows(p, leaf.grad, group)
                else:
                    self._rows(p, sampled.idx, leaf.grad, group)

    def _begin_step(self) -> None:
        pass

    def _full_rows(self, p, g, group):
        self._dense(p, g, group)

    # -- resume ------------------------------------------------------------------------
    def _check_state_dict(self, state_dict: dict) -> None:
        """Refuse another optimizer's state with a message naming the mismatch, before
        torch's load_state_dict changes anything."""
        me = type(self).__name__
        saved = state_dict.get("param_groups", [])
        if len(saved) != len(self.param_groups):
            raise OptimizerStateError(f"the saved head optimizer state has {len(saved)} param groups, "
                                      f"{me} {len(self.param_groups)}")
        params = {}
        for sg, g in zip(saved, self.param_groups):
            missing = [k for k in self.GROUP_KEYS if k not in sg]
            if missing:
                raise OptimizerStateError(
                    f"the saved head optimizer state is not {me}'s: its param groups lack "
                    f"{', '.join(missing)} (they hold {', '.join(sorted(k for k in sg if k != 'params'))})"
                    f"{_guess(set(sg))}; it cannot continue under {me}")
            if len(sg["params"]) != len(g["params"]):
                raise OptimizerStateError(f"a saved head optimizer group holds {len(sg['params'])} "
                                          f"parameters, {me}'s {len(g['params'])}")
            params.update(zip(sg["params"], g["params"]))
        names = {id(p): n for n, p in self._head.named_parameters()}
        for i, st in state_dict.get("state", {}).items():
            p = params.get(i)
            if p is None:
                raise OptimizerStateError(f"the saved head optimizer state has an entry for parameter "
                                          f"#{i}, which {me} does not hold")
            name = names[id(p)]
            keys = {k for k, v in st.items() if v is not None}
            if not keys <= self.STATE_KEYS:
                raise OptimizerStateError(
                    f"the saved head optimizer state of head.{name} holds {', '.join(sorted(keys))}"
                    f"{_guess(keys)}, {me} keeps {', '.join(sorted(self.STATE_KEYS))}: an optimizer's "
                    f"state cannot continue under another optimizer")
            for k in keys - {"step"}:
                if tuple(st[k].shape) != tuple(p.shape):
                    raise OptimizerStateError(f"saved head optimizer state '{name}.{k}' is "
                                              f"{list(st[k].shape)}, head.{name} is {list(p.shape)}")


def _guess(keys: set) -> str:
    if keys & {"momentum_buffer", "momentum", "dampening", "nesterov"}:
        return " — an SGD state"
    if keys & {"exp_avg", "exp_avg_sq", "betas", "amsgrad"}:
        return " — an Adam/AdamW state"
    return ""


class SampledRowSGD(_SampledRowOptimizer):
    """SGD over a ``PartialFC(update="sampled")`` head: all of the head's parameters, rows
    updated lazily from the head's sampled leaves (see the module docstring)."""

    STATE_KEYS = frozenset({"momentum_buffer"})
    GROUP_KEYS = ("lr", "momentum", "weight_decay")

    def __init__(self, head, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, "
                             f"{momentum}, {weight_decay}")
        super().__init__(head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)

    def _buffer(self, p, mu):
        if mu == 0:
            return None
        st = self.state[p]
        if st.get("momentum_buffer") is None:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st["momentum_buffer"]

    def _dense(self, p, g, group):
        # torch.optim.SGD's arithmetic, op for op, so r = 1 matches it bit for bit.
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        d = g.add(p, alpha=wd) if wd != 0 else g
        buf = self._buffer(p, mu)
        if buf is not None:
            buf.mul_(mu).add_(d)
            d = buf
        p.add_(d, alpha=-lr)

    def _rows(self, p, idx, g, group):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        buf = self._buffer(p, mu)
        if buf is not None:
            sgd_rows_(p, buf, idx, g, lr, mu, wd)  # one pass per row (compiled on CPU)
            return
        d = g.to(p.dtype)
        if wd != 0:
            d = d.add(p.index_select(0, idx), alpha=wd)
        # idx holds distinct rows, so index_add_ is an exact in-place row update.
        p.index_add_(0, idx, d, alpha=-lr)


class SampledRowAdamW(_SampledRowOptimizer):
    """AdamW over a ``PartialFC(update="sampled")`` head: moments, a per-row step count and
    the decoupled weight decay touch only the step's sampled rows (module docstring);
    non-row parameters take torch's AdamW step. No amsgrad/maximize."""

    STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
    GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, head, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        b1, b2 = betas
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(head, dict(lr=lr, betas=(float(b1), float(b2)), eps=eps,
                                    weight_decay=weight_decay))
        # No row has been updated more than this many times (bounds the table below).
        self._max_step = 0
        self._tables: dict = {}

    def _begin_step(self) -> None:
        self._max_step += 1

    def _bias_corrections(self, b1: float, b2: float, steps: torch.Tensor):
        """(1 − β1^t, sqrt(1 − β2^t)) per row, looked up in a float64 table computed with
        Python's pow, as torch's AdamW computes its scalars: the same numbers bit for bit
        (torch's vectorised pow differs in the last bit), with no device sync."""
        key = (b1, b2, steps.device)
        t = self._tables.get(key)
        if t is None or t.shape[1] <= self._max_step:
            n = max(self._max_step + 1, 2 * (0 if t is None else t.shape[1]), 256)
            t = torch.tensor([[1 - b1 ** s for s in range(n)], [(1 - b2 ** s) ** 0.5 for s in range(n)]],
                             dtype=torch.float64, device=steps.device)
            self._tables[key] = t
        return t[0, steps], t[1, steps]

    def _row_state(self, p):
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _adamw_rows(self, w, m, v, steps, g, group):
        """torch AdamW's single-tensor arithmetic, in place on rows w/m/v (step counts
        ``steps`` already incremented), with the scalars per row."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        g = g.to(w.dtype)
        if wd != 0:
            w.mul_(1 - lr * wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2_sqrt = self._bias_corrections(b1, b2, steps)
        shape = (-1,) + (1,) * (w.dim() - 1)
        denom = (v.sqrt() / bc2_sqrt.to(w.dtype).view(shape)).add_(eps)
        # torch's addcdiv_(m, denom, value=-step_size) is w + (value·m)/denom; the same
        # with a per-row value.
        # lr / bc1 as a true division (python-scalar / tensor is lr·(1/bc1): another rounding)
        step_size = torch.full_like(bc1, lr).div_(bc1).neg_().to(w.dtype).view(shape)
        w.add_(m.mul(step_size).div_(denom))

    def _full_rows(self, p, g, group):
        st = self._row_state(p)
        self._adamw_rows(p, st["exp_avg"], st["exp_avg_sq"], st["step"].add_(1), g, group)

    def _rows(self, p, idx, g, group):
        st = self._row_state(p)
        steps = st["step"].index_select(0, idx).add_(1)
        w, m, v = (t.index_select(0, idx) for t in (p, st["exp_avg"], st["exp_avg_sq"]))
        self._adamw_rows(w, m, v, steps, g, group)
        # idx holds distinct rows: index_copy_ writes each row once.
        for dst, src in ((st["step"], steps), (p, w), (st["exp_avg"], m), (st["exp_avg_sq"], v)):
            dst.index_copy_(0, idx, src)

    def _dense(self, p, g, group):
        st = self.state[p]
        if not st:  # torch AdamW's own state layout for a non-row parameter
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        b1, b2 = group["betas"]
        _adam_functional([p], [g], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]],
                         foreach=False, decoupled_weight_decay=True, amsgrad=False,
                         beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"],
                         eps=group["eps"], maximize=False)

    def load_state_dict(self, state_dict: dict) -> None:
        """Also takes a dense AdamW's state (head.update=dense → sampled): its scalar step
        becomes every row's count, which is what it was."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        top = 0
        for p in self._row_params():
            st = self.state.get(p)
            if not st or "step" not in st:
                continue
            s = torch.as_tensor(st["step"])
            if s.dim() == 0:
                s = s.expand(p.shape[0])
            st["step"] = s.to(device=p.device, dtype=torch.int64).clone()
            top = max(top, int(st["step"].max()) if st["step"].numel() else 0)
        self._max_step = top

    def _check_state_dict(self, state_dict: dict) -> None:
        super()._check_state_dict(state_dict)
        rows = {id(p) for p in self._row_params()}
        params = [p for g in self.param_groups for p in g["params"]]
        names = {id(p): n for n, p in self._head.named_parameters()}
        for i, st in state_dict.get("state", {}).items():
            p = params[i]
            if set(st) != self.STATE_KEYS:
                raise OptimizerStateError(f"the saved head optimizer state of head.{names[id(p)]} holds "
                                          f"{', '.join(sorted(st))}, AdamW needs {', '.join(sorted(self.STATE_KEYS))}")
            shape = tuple(torch.as_tensor(st["step"]).shape)
            ok = [()] + ([(p.shape[0],)] if id(p) in rows else [])
            if shape not in ok:
                raise OptimizerStateError(f"saved step count of head.{names[id(p)]} is {list(shape)}, expected "
                                          f"{' or '.join(str(list(o)) for o in ok)}")

    def _row_params(self):
        return [p for g in self.param_groups for p in g["params"] if id(p) in self._row_names]


def make_head_optimizer(head, optimizer: str, lr: float, momentum: float,
                        weight_decay: float) -> torch.optim.Optimizer:
    """The head's optimizer for ``update='sampled'``: SampledRowSGD or SampledRowAdamW (with
    torch.optim.AdamW's default betas and eps, as the trainer's dense AdamW)."""
    if optimizer == "sgd":
        return SampledRowSGD(head, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adamw":
        return SampledRowAdamW(head, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"head.update=sampled supports train.optimizer=sgd or adamw, got '{optimizer}'")


__all__ = ["OptimizerStateError", "SampledRowAdamW", "SampledRowSGD", "make_head_optimizer"]
