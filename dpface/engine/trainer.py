"""The training loop: one code path for 1 process, torchrun ranks and Ray Train workers.

The config's sections build the components (data stream, backbone, head, optimizers,
the backbone-parallel wrapper); the trainer owns the run directory and the loop:
batches → the training step (engine/step.py) → logging, checkpoints, evaluation,
signals. Per step: per-rank batch → backbone (DDP or ZeRO, engine/parallel.py) →
model-parallel head (not wrapped; it gathers embeddings itself) → loss → backward →
unscale, global grad norm and one skip decision shared by every rank → clip → step.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dpface import distributed as dist
from dpface import ops
from dpface.engine.amp import resolve_amp
from dpface.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
from dpface.engine.faults import FaultInjection
from dpface.engine.logging import MetricsLogger, memory_stats
from dpface.engine.parallel import DDPBackbone
from dpface.engine.preempt import SignalStop, StopRequested
from dpface.engine.schedule import lr_at
from dpface.engine.step import TrainStep
from dpface.io import atomic_write_text
from dpface.losses import build_aux_loss
from dpface.losses.range_loss import RangeLoss
from dpface.models import build_backbone
from dpface.rundir import CheckpointError, RunDir, read_meta
from dpface.schema import ConfigError

if TYPE_CHECKING:
    from dpface.config import Config


def build_parallel(cfg: Config, backbone: torch.nn.Module, ctx: dist.ParallelContext,
                   amp_dtype: torch.dtype | None, find_unused: bool = False):
    """The backbone-parallel implementation the config asks for (engine/parallel.py).
    ``find_unused``: some parameters get no gradient (a quality branch no loss uses)."""
    opt = cfg.train.optimizer_for(backbone.parameters())
    if cfg.deepspeed.enabled:
        if not dist.is_initialized():
            raise ConfigError("deepspeed.enabled=true needs a distributed launch (DeepSpeed shards the "
                              "optimizer over a process group): launchers/torchrun.sh --nproc-per-node N -- "
                              "--config …, also for one process")
        from dpface.engine.deepspeed_backbone import ZeroBackbone

        return ZeroBackbone(backbone, opt, cfg, ctx, amp_dtype)
    return DDPBackbone(backbone, opt, ctx, amp_dtype, comm_hook=cfg.train.comm_hook, find_unused=find_unused)


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, info: dist.ParallelContext | None = None,
                 overwrite: bool = False):
        self.info = ctx = info or dist.init_from_env(cfg.experiment.device)
        batch = cfg.per_rank_batch(ctx.world_size)
        if batch != cfg.data.batch_size:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))
        self.cfg = cfg
        self.dirs = RunDir.of(cfg.experiment.output_dir, cfg.experiment.name)
        self.run_dir, self.ckpt_root = self.dirs.root, self.dirs.checkpoints
        self._lock = None  # rank 0's exclusive lock on the run directory (RunDir.lock)
        created = not self.run_dir.exists()
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.release()
            if created and ctx.is_main:  # a start that failed writes nothing, not even the directory
                self.dirs.remove_if_unused()
            raise

    def release(self) -> None:
        """Give up the run directory (the end of fit(), or a failed start)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup(self, resume: str | None, overwrite: bool) -> None:
        ctx, cfg = self.info, self.cfg
        batch = cfg.data.batch_size
        # Resolve (and so validate) the checkpoint before anything is written.
        self.resume_from = self._prepare_run_dir(resume, overwrite)
        self._saved: tuple[int, Path] | None = None  # (step, path) of this process's last save
        dev = ctx.device

        torch.manual_seed(cfg.experiment.seed)  # same initial weights on every rank
        self.stream = cfg.data.build(ctx, seed=cfg.experiment.seed)
        # The run's length in steps (train.epochs over the data's images, when set that way).
        self.num_images = getattr(self.stream, "num_images", None)
        self.steps, self.warmup_steps = cfg.train.length(self.num_images,
                                                         batch * ctx.world_size * cfg.train.accumulate)
        self.backbone = build_backbone(cfg.model, embedding_size=cfg.head.embedding_size).to(dev)
        # channels-last: 2.4× faster for iresnets on GPU. Not on CPU: torch 2.13's CPU
        # convolutions crash in backward with channels-last at 8 channels, and gloo DDP
        # with channels-last parameters segfaults.
        if dev.type == "cuda":
            self.backbone.to(memory_format=torch.channels_last)
        self.head = cfg.head.build(self.stream.num_classes, group=ctx.head_group,
                                   seed=cfg.experiment.seed).to(dev)
        # Resolved now, so kernel=fused / precision=bf16 that cannot run fail before training.
        try:
            self.head.kernel_choice(dev.type)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        # Where the weights came from: a resumed run keeps its record (its weights are its own);
        # a new one with train.init_from loads them now.
        if self.resume_from is not None:
            self.init_from = read_meta(self.resume_from).get("init_from")
        else:
            self.init_from = self._init_from_weights() if cfg.train.init_from else None
        if dev.type == "cuda":  # kernel=auto: our GEMMs or cuBLAS, timed on this run's shapes
            self.head.autotune(batch * ctx.world_size, dev)
        self.amp_dtype = resolve_amp(cfg.train.amp, dev)
        built = [build_aux_loss(spec, self.stream.num_classes, cfg.head.embedding_size, group=ctx.head_group,
                                amp_dtype=self.amp_dtype, **self._teacher(spec, dev, batch))
                 for spec in cfg.aux_losses]
        self._self_check(dev, [m for m, _ in built])
        self.head_kernel = self.head.kernel_choice(dev.type)[1]
        self.aux_losses = torch.nn.ModuleList([m for m, _ in built]).to(dev)
        aux = [(spec["name"], m, w) for spec, (m, w) in zip(cfg.aux_losses, built)]
        aux_params = [p for p in self.aux_losses.parameters() if p.requires_grad]
        self.aux_opt = cfg.train.optimizer_for(aux_params, cfg.train.head_lr or cfg.train.lr) if aux_params else None
        with_quality = any(getattr(m, "needs_quality", False) for m, _ in built)
        if with_quality and not hasattr(self.backbone, "quality"):
            raise ConfigError(f"an aux loss needs image quality scores (qan_set) but model '{cfg.model['name']}' "
                              "has no quality branch: use model={name: qan, base: {...}}")
        unused = hasattr(self.backbone, "quality") and not with_quality  # no loss trains the branch
        self.parallel = build_parallel(cfg, self.backbone, ctx, self.amp_dtype, find_unused=unused)
        self.head_opt = cfg.train.head_optimizer_for(self.head)
        self.step_fn = TrainStep(self.parallel, self.head, self.head_opt, aux, ctx,
                                 grad_clip=cfg.train.grad_clip, amp_dtype=self.amp_dtype,
                                 accumulate=cfg.train.accumulate, with_quality=with_quality,
                                 freeze_backbone_steps=cfg.train.freeze_backbone_steps, backbone=self.backbone,
                                 aux_opt=self.aux_opt)
        self.state = TrainState(0, self.backbone, self.head, self.head_opt, self.stream,
                                self.aux_losses, self.parallel, init_from=self.init_from, aux_opt=self.aux_opt)
        self.logger = MetricsLogger(self.run_dir, ctx.is_main, cfg.wandb, cfg.to_dict(),
                                    resume=self.resume_from is not None)
        self.do_eval = cfg.eval.has_sets(cfg.data)
        self.eval_sets = cfg.eval.build_sets(cfg.data) if ctx.is_main and self.do_eval else {}
        if self.resume_from is not None:
            self.state.step = load_checkpoint(self.resume_from, self.state, ctx, cfg.to_dict())
        self.untrained: dict | None = None  # verification before training, for the report
        self.fault = FaultInjection.from_env()  # recovery tests: DPFACE_FAULT_* (faults.py)
        if ctx.is_main:
            from dpface.config import save_config

            save_config(cfg, self.dirs.config_file)

    def _teacher(self, spec: dict, dev: torch.device, batch: int) -> dict:
        """For a distill aux loss: its teacher network loaded from ``teacher`` (restore.read_weights;
        a dpface checkpoint carries its model spec, an arcface_torch file is read for it), on
        ``dev``, with its size and its cost on this run's batch said once. Other losses: {}."""
        if spec.get("name") != "distill":
            return {}
        from dpface.models.pretrained import WeightsError, load_into
        from dpface.restore import read_weights

        key = f"aux_losses[{self.cfg.aux_losses.index(spec)}].teacher"
        w = read_weights(spec["teacher"], option=key)
        if w.model is None:
            raise ConfigError(f"{key}: {spec['teacher']}: the teacher's architecture cannot be read from "
                              f"this {w.record['kind']} (a dpface checkpoint, or an arcface_torch iresnet / "
                              "MobileFaceNet file, is needed)")
        net = build_backbone(w.model["model"], embedding_size=w.model["embedding_size"])
        try:
            load_into(net, w.state, f"{key}: {spec['teacher']}")
        except WeightsError as e:
            raise ConfigError(str(e)) from None
        net = net.to(dev).eval().requires_grad_(False)
        if self.info.is_main:
            size = self.cfg.data.image_size
            x = torch.zeros(batch, 3, size, size, device=dev)
            with torch.no_grad():
                net(x)  # warm-up
                t0 = time.perf_counter()
                net(x)
                ms = 1e3 * (time.perf_counter() - t0)
            n = sum(p.numel() for p in net.parameters())
            mb = sum(t.numel() * t.element_size() for t in net.state_dict().values()) / 2**20
            print(f"dpface: distill teacher {w.record['path']} ({w.model['model']['name']}, "
                  f"{w.model['embedding_size']}-d, {n / 1e6:.2f}M params, {mb:.1f} MB): {ms:.0f} ms per batch "
                  f"of {batch} on {dev.type}, kind {spec.get('kind', 'cosine')}", flush=True)
        return {"teacher_module": net, "teacher_embedding_size": w.model["embedding_size"]}

    def _init_from_weights(self) -> dict:
        """train.init_from: the trained backbone (and with init_head the head) loaded into this
        new run's modules; says what was loaded, new and dropped. Returns the source's record
        (path, kind, step, data hash) for the checkpoints and the model card."""
        from dpface.heads.sharding import apply_shard_state, load_resharded
        from dpface.models.pretrained import WeightsError, load_into
        from dpface.restore import read_weights

        t, cfg = self.cfg.train, self.cfg
        w = read_weights(t.init_from, t.init_key_map)
        src = f"train.init_from: {t.init_from}"
        if w.model is not None and w.model["model"]["name"] != cfg.model["name"]:
            raise ConfigError(f"{src} holds a {w.model['model']['name']} backbone ({w.record['kind']}) but "
                              f"model is {cfg.model['name']}: set model={w.model['model']}")
        try:
            report = load_into(self.backbone, w.state, src)
        except WeightsError as e:
            raise ConfigError(str(e)) from None
        head = "new"
        if t.init_head:
            if not w.head_files:
                raise ConfigError(f"{src}: train.init_head needs a dpface checkpoint (its head); this is a "
                                  f"{w.record['kind']}")
            if w.num_classes != self.head.num_classes or w.model["embedding_size"] != cfg.head.embedding_size:
                raise ConfigError(f"{src}: train.init_head: the checkpoint's head has {w.num_classes} classes of "
                                  f"dimension {w.model['embedding_size']}, this run's {self.head.num_classes} of "
                                  f"{cfg.head.embedding_size}: the head must start new (init_head: false)")
            apply_shard_state(self.head, None, load_resharded(w.head_files, self.head.class_start,
                                                               self.head.class_end))
            head = f"from the checkpoint ({w.num_classes} classes)"
        if self.info.is_main:
            def names(keys):
                return f"{len(keys)}" + (f" ({', '.join(keys[:4])}{', …' if len(keys) > 4 else ''})" if keys else "")

            step = f", step {w.record['step']}" if w.record["step"] is not None else ""
            print(f"dpface: init_from {w.record['path']} ({w.record['kind']}{step}): backbone tensors loaded "
                  f"{len(report['loaded'])}, new {names(report['new'])}, dropped {names(report['dropped'])}; "
                  f"head: {head if t.init_head else f'new ({self.head.num_classes} classes)'}", flush=True)
        return {**w.record, "head": "loaded" if t.init_head else "new",
                "loaded": len(report["loaded"]), "new": report["new"], "dropped": report["dropped"]}

    def _prepare_run_dir(self, resume: str | None, overwrite: bool) -> Path | None:
        """Leftovers of interrupted saves are cleaned; a fresh start where another run's
        checkpoints are is refused (its saves would mix with them, and --resume auto would
        continue the old run) unless ``overwrite``, which deletes that run's files first.
        Returns the checkpoint to resume from."""
        if self.info.is_main:
            self._lock = self.dirs.lock()
        dist.barrier()  # every rank of this group is here: none is saving
        if self.info.is_main:
            self.dirs.recover_interrupted()
        dist.barrier()
        done = self.dirs.complete()
        if resume is None and done and not overwrite:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints of a run (latest {done[-1].name}): continue "
                "it with --resume auto, delete them and start over with --overwrite, or choose "
                "another experiment.name")
        if resume is None and overwrite and self.info.is_main:
            self.dirs.clear()
        found = self.dirs.resolve_resume(resume)
        if resume == "auto" and found is None and self.info.is_main:
            print(f"dpface: --resume auto: no checkpoint found, starting fresh (in {self.ckpt_root})", flush=True)
        if found is not None and self.info.is_main:
            aside = self.dirs.set_aside_newer(read_meta(found)["step"])
            if aside is not None:
                print(f"dpface: resuming from {found.name}: the later checkpoints of this run were moved, "
                      f"intact, to {aside} (this run continues from step {read_meta(found)['step']})", flush=True)
        dist.barrier()
        return found

    # -- pieces -----------------------------------------------------------------
    def evaluate(self) -> dict:
        rocs = {}
        if self.info.is_main and self.eval_sets:  # evaluation can take minutes: say so first
            pairs = sum(len(v[2]) for v in self.eval_sets.values())
            print(f"dpface: evaluating step {self.state.step} on {', '.join(self.eval_sets)} ({pairs} pairs)…",
                  flush=True)
        metrics = self.cfg.eval.run(self.backbone, self.eval_sets, self.info.device, rocs) if self.info.is_main else {}
        self.logger.log_roc(self.state.step, rocs)
        dist.barrier()
        return metrics

    def save(self) -> Path:
        if self._saved is not None and self._saved[0] == self.state.step:
            return self._saved[1]  # e.g. a signal right after a ckpt_every save
        path = save_checkpoint(self.ckpt_root, self.state, self.info, self.cfg.to_dict(),
                               keep=self.cfg.train.keep_checkpoints)
        self._saved = (self.state.step, path)
        return path

    def _set_lr(self, step: int) -> float:
        t = self.cfg.train
        kw = dict(total_steps=self.steps, warmup_steps=self.warmup_steps, schedule=t.schedule,
                  poly_power=t.poly_power, min_lr=t.min_lr)
        lr = lr_at(step, base_lr=t.lr, **kw)
        for g in self.parallel.param_groups:  # the backbone: lr × backbone_lr_scale
            g["lr"] = lr * t.backbone_lr_scale
        head_lr = lr_at(step, base_lr=t.head_lr or t.lr, **kw)
        for g in self.head_opt.param_groups + (self.aux_opt.param_groups if self.aux_opt else []):
            g["lr"] = head_lr
        return lr

    def train_step(self, *micro_batches) -> dict:
        """One update from ``train.accumulate`` (images, labels) micro-batches; returns
        metrics (loss, acc, grad_norm, skipped)."""
        lr = self._set_lr(self.state.step)
        m = self.step_fn(list(micro_batches), self.state.step)
        self.state.step += 1
        return {**m, "lr": lr}

    # -- loop ---------------------------------------------------------------------
    def _self_check(self, dev: torch.device, aux_modules) -> None:
        """Each compiled op this run will use, on a small random problem on ``dev``, against
        the PyTorch reference (dpface.ops.selfcheck). A mismatch: with kernel=auto one loud
        warning and the reference from here on; with the kernel named explicitly an error."""
        from dpface.ops import selfcheck

        impl = self.head.kernel_choice(dev.type)[0]
        if impl:
            c = selfcheck.check_margin_softmax(impl, dev, self.cfg.head.precision)
            if not c.ok:
                if self.head.kernel != "auto":
                    raise ConfigError(f"head.kernel={self.head.kernel}: the compiled op failed its self-check on "
                                      f"this device: {c.line()}; use head.kernel=reference")
                warnings.warn(f"dpface: the compiled head op failed its self-check on this device ({c.line()}): "
                              "training with the PyTorch reference instead. Please report this.",
                              RuntimeWarning, stacklevel=2)
                self.head.use_reference(f"the compiled op failed its self-check: {c.error:.1e} > {c.tol:.0e}")
        for m in aux_modules:
            if isinstance(m, RangeLoss) and m.kernel in ("auto", "fused") and ops.available(dev.type):
                c = selfcheck.check_range_loss(dev)
                if c.ok:
                    continue
                if m.kernel == "fused":
                    raise ConfigError(f"range loss kernel=fused: the compiled op failed its self-check on this "
                                      f"device: {c.line()}; use kernel: reference")
                warnings.warn(f"dpface: the compiled range loss failed its self-check ({c.line()}): using the "
                              "PyTorch reference instead.", RuntimeWarning, stacklevel=2)
                m.kernel = "reference"

    def fit(self, until: int | None = None) -> dict:
        """Train to ``train.steps`` (or stop early at step ``until``, checkpointed, as an
        interrupted run would), then evaluate. On SIGTERM/SIGINT: checkpoint at the next
        step boundary, then raise StopRequested (preempt.py)."""
        if self.info.is_main and self._lock is None:  # a second fit() on the same trainer
            self._lock = self.dirs.lock()
        self._fit_started = time.perf_counter()  # wall time of this session, for the model card
        self._batches = None  # the data stream's iterator, once _fit has one
        with SignalStop() as self._signals:
            try:
                return self._fit(until)
            finally:
                # Data workers ignore SIGINT/SIGTERM (data/streams/map_stream.py), so multiprocessing's
                # terminate() at exit could not end them and its join would hang: however
                # the loop ends (a stop, divergence, a bug), closing the stream's generator
                # shuts its DataLoader down now.
                if hasattr(self._batches, "close"):
                    self._batches.close()
                self.release()

    def _finished(self) -> dict | None:
        """A resumed run that already ended at train.steps: its final metrics (evaluating
        again would append duplicate rows to metrics.jsonl and the model card)."""
        if self.resume_from is None or self.state.step < self.steps:
            return None
        try:
            final = json.loads(self.dirs.final_metrics_file.read_text())
        except (OSError, ValueError):
            return None
        return final if final.get("step") == self.state.step else None

    def _fit(self, until: int | None) -> dict:
        cfg, info, t = self.cfg, self.info, self.cfg.train
        done = self._finished()
        if done is not None:
            if info.is_main:
                print(f"dpface: the run already finished at step {self.state.step} (final metrics in "
                      f"{self.dirs.final_metrics_file}); nothing to do. Raise train.steps to train on.", flush=True)
            self.logger.close()
            return {k: v for k, v in done.items() if k not in ("step", "checkpoint") and not k.startswith("untrained/")}
        stop = min(until, self.steps) if until is not None else self.steps
        global_batch = cfg.data.batch_size * info.world_size * t.accumulate
        if info.is_main:
            n_params = sum(p.numel() for p in self.backbone.parameters())
            print(f"dpface: {cfg.model['name']} ({n_params / 1e6:.2f}M params), "
                  f"{self.head.num_classes} classes, world {info.world_size}, "
                  f"global batch {global_batch}, device {info.device}, "
                  f"amp {self.amp_dtype or 'fp32'}, steps {self.state.step}->{self.steps}"
                  + (f" ({t.epochs:g} epochs of {self.num_images} images)" if t.epochs else ""), flush=True)
            print(f"{ops.report()}; head: {self.head_kernel}", flush=True)
        if self.state.step == 0 and self.do_eval:
            m = self.evaluate()
            self.logger.log(0, m, prefix="eval-untrained")
            self.untrained = m
        bar = None
        if info.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=self.steps, initial=self.state.step, desc="train", dynamic_ncols=True)

        consecutive_skips, window, stop_signal = 0, [], 0
        t_last, steps_last = time.perf_counter(), self.state.step
        it = self._batches = iter(self.stream)
        while self.state.step < stop:
            m = self.train_step(*(next(it) for _ in range(t.accumulate)))
            if self.fault is not None:
                self.fault.after_step(self.state.step, info.rank)
            consecutive_skips = consecutive_skips + 1 if m["skipped"] else 0
            if consecutive_skips >= t.max_skipped_steps:
                raise FloatingPointError(
                    f"{consecutive_skips} consecutive steps had non-finite gradients "
                    f"(loss {m['loss']}, loss scale {self.parallel.loss_scale}); stopping instead of "
                    "training on nothing. Lower the learning rate or the loss scale s, or use bf16."
                )
            window.append(m)
            step = self.state.step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.3f}")
            if step % t.log_every == 0 or step == stop:
                now = time.perf_counter()
                rate = global_batch * (step - steps_last) / max(now - t_last, 1e-9)
                means = ["loss", "acc", *(k for k in m if k.startswith(("aux/", "head/")))]
                agg = {k: sum(w[k] for w in window) / len(window) for k in means}
                # time left at this window's rate (the schedule's remaining steps)
                agg.update(lr=m["lr"], grad_norm=m["grad_norm"], img_s=rate,
                           eta_s=(stop - step) * global_batch / max(rate, 1e-9),
                           skipped=sum(w["skipped"] for w in window), epoch=self.stream.epoch,
                           **{f"data/{k}": v for k, v in self.stream.stats().items()})
                if self.amp_dtype == torch.float16:
                    agg["loss_scale"] = self.parallel.loss_scale
                agg.update(memory_stats(info.device))  # a collective: every rank is here
                self.logger.log(step, agg)
                window, t_last, steps_last = [], now, step
            if t.ckpt_every and step % t.ckpt_every == 0 and step < stop:
                self.save()
            if t.eval_every and step % t.eval_every == 0 and step < stop and self.do_eval:
                self.logger.log(step, self.evaluate(), prefix="eval")
            stop_signal = self._signals.agreed(info.device)  # all ranks stop after the same step
            if stop_signal:
                break
        if bar is not None:
            bar.close()
        path = self.save()
        if stop_signal:
            self.logger.close()
            raise StopRequested(stop_signal, self.state.step, path)
        if self.state.step < self.steps:  # stopped early on purpose: leave evaluation to the end
            return {}
        if self._signals.signum:  # a signal during the final save: no evaluation to wait for
            self.logger.close()
            raise StopRequested(self._signals.signum, self.state.step, path)
        self._signals.interrupt = lambda signum: StopRequested(signum, self.state.step, path)
        try:
            final = self.evaluate() if self.do_eval else {}
        finally:
            self._signals.interrupt = None
        if info.is_main:
            if final:
                self.logger.log(self.state.step, final, prefix="eval")
            summary = {"step": self.state.step, "checkpoint": str(path), **final}
            if self.untrained:
                summary.update({f"untrained/{k}": v for k, v in self.untrained.items()})
            atomic_write_text(self.dirs.final_metrics_file, json.dumps(summary, indent=1))
            from dpface.eval.model_card import write_training_card

            wall = time.perf_counter() - getattr(self, "_fit_started", time.perf_counter())
            card = write_training_card(self, path, wall)
            print(f"dpface: done: step {self.state.step} in {time.strftime('%H:%M:%S', time.gmtime(wall))}; "
                  f"run {self.run_dir}, checkpoint {path}" + (f", model card {card}" if card else ""), flush=True)
        self.logger.close()
        return final


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> dict:
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    try:
        return trainer.fit()
    finally:
        trainer.logger.close()
