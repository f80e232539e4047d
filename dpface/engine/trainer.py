"""The training loop: one code path for 1 process, torchrun ranks and Ray Train workers.

Per step: per-rank batch → backbone (DDP when world > 1) → model-parallel head (not in
DDP; it gathers embeddings itself) → loss → backward → fp16 unscale + a cross-rank
finite check (every rank skips together) → global grad-norm clip over backbone and
all head shards → SGD/AdamW step → metrics on rank 0.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from dpface import distributed as dist
from dpface import ops
from dpface.config import Config, save_config
from dpface.data.transforms import normalize
from dpface.engine.amp import LossScaler, autocast, global_grad_norm, resolve_amp
from dpface.engine.checkpoint import (
    CheckpointError,
    TrainState,
    complete_checkpoints,
    load_checkpoint,
    recover_interrupted_saves,
    resolve_resume,
    save_checkpoint,
)
from dpface.engine.faults import FaultInjection
from dpface.engine.logging import WANDB_ID_FILE, MetricsLogger, memory_stats
from dpface.engine.preempt import SignalStop, StopRequested
from dpface.engine.schedule import lr_at
from dpface.eval import evaluate_pairs
from dpface.heads import PartialFC
from dpface.heads.row_optim import make_head_optimizer
from dpface.heads.sharding import head_grad_params
from dpface.losses import build_aux_loss, build_loss
from dpface.models import build_backbone


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.experiment.output_dir) / cfg.experiment.name


def build_stream(cfg: Config, info: dist.DistInfo):
    d = cfg.data
    _check_shards_set(cfg)
    if d.backend == "synthetic":
        from dpface.data.loader import MapStream
        from dpface.data.synthetic import SyntheticFaceDataset

        s = d.synthetic
        ds = SyntheticFaceDataset(num_identities=s.num_identities, seed=s.seed,
                                  image_size=d.image_size, difficulty=s.difficulty,
                                  max_images=s.max_images, min_images=s.min_images,
                                  exponent=s.exponent)
        if d.sampler == "pk":
            from dpface.data.pk_sampler import PKMapStream

            return PKMapStream(ds, d.batch_size // d.pk_images, d.pk_images, info.rank,
                               info.world_size, seed=cfg.experiment.seed, num_workers=d.num_workers)
        return MapStream(ds, d.batch_size, info.rank, info.world_size, seed=cfg.experiment.seed,
                         num_workers=d.num_workers)
    if d.backend == "webdataset":
        from dpface.data.webdataset_stream import WebDatasetStream

        w = d.webdataset
        return WebDatasetStream(w.shards, batch_size=d.batch_size, rank=info.rank,
                                world_size=info.world_size, num_workers=d.num_workers,
                                seed=cfg.experiment.seed, shuffle_buffer=w.shuffle_buffer,
                                augment=tuple(w.augment), image_size=d.image_size,
                                max_bad_fraction=w.max_bad_fraction)
    if d.backend == "dali":
        from dpface.data.dali_stream import DaliStream

        w = d.webdataset
        on_gpu = info.device.type == "cuda"
        return DaliStream(w.shards, batch_size=d.batch_size, rank=info.rank,
                          world_size=info.world_size, num_workers=d.num_workers,
                          seed=cfg.experiment.seed, shuffle_buffer=w.shuffle_buffer,
                          augment=tuple(w.augment), image_size=d.image_size,
                          max_bad_fraction=w.max_bad_fraction, device="gpu" if on_gpu else "cpu",
                          device_id=info.local_rank if on_gpu else None)
    raise ValueError(f"unknown data.backend '{d.backend}'")


def _check_shards_set(cfg: Config) -> None:
    # Here, not at config load: `dpface eval` uses a shard backend without shards to
    # mean "no synthetic set, only --bin sets".
    if cfg.data.backend == "synthetic":
        return
    from dpface.config import ConfigError
    from dpface.data.shards import is_manifest

    shards = cfg.data.webdataset.shards
    if not shards:
        raise ConfigError(f"'data.webdataset.shards' must name the manifest.json of a converted "
                          f"data set with data.backend: {cfg.data.backend} (see `dpface convert`)")
    if not is_manifest(shards):  # the head's size, the class count, is only in the manifest
        raise ConfigError(f"'data.webdataset.shards' is {shards!r}, tar files without a manifest: "
                          "name the manifest.json (or its directory) that `dpface convert` writes "
                          "next to the shards")


def has_eval_sets(cfg: Config) -> bool:
    """The same answer on every rank (only rank 0 builds the sets): evaluation is a
    collective moment, all ranks must agree to enter it."""
    return cfg.data.backend == "synthetic" or bool(cfg.eval.bin_sets)


def build_eval_sets(cfg: Config) -> dict:
    """name → (images_a, images_b, issame, folds); held-out synthetic identities start
    after the training identities, so they never overlap."""
    sets = {}
    if cfg.data.backend == "synthetic":
        from dpface.data.synthetic import make_verification_pairs

        s = cfg.data.synthetic
        p = make_verification_pairs(num_pairs=cfg.eval.num_pairs, identity_offset=s.num_identities,
                                    num_identities=cfg.eval.num_identities, seed=s.seed,
                                    image_size=cfg.data.image_size, difficulty=s.difficulty,
                                    num_folds=cfg.eval.folds)
        sets["synthetic"] = (p.images_a, p.images_b, p.issame, p.fold)
    for path in cfg.eval.bin_sets:
        from dpface.eval.bin_sets import load_bin

        a, b, same = load_bin(path, image_size=cfg.data.image_size)
        sets[Path(path).stem] = (a, b, same, None)
    return sets


def evaluate(backbone: torch.nn.Module, eval_sets: dict, cfg: Config, device,
             rocs: dict | None = None) -> dict:
    """Scalar metrics per set; ``rocs``, when given, receives name → (fpr, tpr)."""
    metrics = {}
    for name, (a, b, same, folds) in eval_sets.items():
        # num_folds: sets without fold ids (.bin) are split into eval.folds consecutive parts
        r = evaluate_pairs(backbone, a, b, same, folds=folds, batch_size=cfg.eval.batch_size,
                           device=device, flip=cfg.eval.flip, num_folds=cfg.eval.folds,
                           fars=tuple(cfg.eval.fars))
        if rocs is not None:
            rocs[name] = r.roc[:2]
        metrics[f"{name}/acc"] = r.accuracy
        metrics[f"{name}/acc_std"] = r.accuracy_std
        metrics[f"{name}/auc"] = r.auc
        for far, tar in r.tar_at_far.items():
            metrics[f"{name}/tar@far={far:g}"] = tar
    return metrics


def make_optimizer(params, cfg: Config, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, info: dist.DistInfo | None = None,
                 overwrite: bool = False):
        self.cfg = cfg
        self.info = info or dist.init_from_env(cfg.experiment.device)
        self.run_dir = run_dir_of(cfg)
        self.ckpt_root = self.run_dir / "checkpoints"
        # Resolve (and so validate) the checkpoint before anything is written.
        self.resume_from = self._prepare_run_dir(resume, overwrite)
        self._saved: tuple[int, Path] | None = None  # (step, path) of this process's last save
        dev = self.info.device

        torch.manual_seed(cfg.experiment.seed)  # same initial weights on every rank
        self.stream = build_stream(cfg, self.info)
        self.backbone = build_backbone(cfg.model, embedding_size=cfg.head.embedding_size).to(dev)
        # channels-last: 2.4× faster for iresnets on GPU. Not on CPU: torch 2.13's CPU
        # convolutions crash in backward with channels-last at 8 channels, and gloo DDP
        # with channels-last parameters segfaults.
        if dev.type == "cuda":
            self.backbone.to(memory_format=torch.channels_last)
        self.head = PartialFC(cfg.head.embedding_size, self.stream.num_classes,
                              build_loss(cfg.head.loss), sample_rate=cfg.head.sample_rate,
                              negatives=cfg.head.negatives, update=cfg.head.update,
                              kernel=cfg.head.kernel, precision=cfg.head.precision,
                              logits_budget_mb=cfg.head.logits_budget_mb,
                              seed=cfg.experiment.seed).to(dev)
        # Resolved now, so kernel=fused / precision=bf16 that cannot run fail before training.
        self.head_kernel = self.head.kernel_choice(dev.type)[1]
        built = [build_aux_loss(spec, self.stream.num_classes, cfg.head.embedding_size)
                 for spec in cfg.aux_losses]
        self.aux_losses = torch.nn.ModuleList([m for m, _ in built]).to(dev)
        self.aux_weights = [w for _, w in built]
        self.aux_names = [spec["name"] for spec in cfg.aux_losses]
        self.ds = None  # DeepSpeed backbone engine (deepspeed.enabled), in place of DDP
        if cfg.deepspeed.enabled:
            from dpface.engine.deepspeed_backbone import DeepSpeedBackbone

            self.ds = DeepSpeedBackbone(self.backbone, make_optimizer(self.backbone.parameters(), cfg, cfg.train.lr),
                                        cfg, self.info)
            self.model = self.backbone_opt = self.ds  # its forward; its optimizer's face
        else:
            self.model = (DistributedDataParallel(self.backbone, device_ids=[dev.index] if dev.type == "cuda" else None)
                          if self.info.world_size > 1 else self.backbone)
            self.backbone_opt = make_optimizer(self.backbone.parameters(), cfg, cfg.train.lr)
        head_lr = cfg.train.head_lr or cfg.train.lr
        if cfg.head.update == "sampled":  # lazy row updates; raises for adamw
            self.head_opt = make_head_optimizer(self.head, cfg.train.optimizer, head_lr,
                                                cfg.train.momentum, cfg.train.weight_decay)
        else:
            self.head_opt = make_optimizer(self.head.parameters(), cfg, head_lr)
        self.amp_dtype = resolve_amp(cfg.train.amp, dev)
        # Under DeepSpeed fp16 its own dynamic loss scale is used; this one stays idle.
        self.scaler = LossScaler(enabled=self.amp_dtype == torch.float16 and self.ds is None)
        self.state = TrainState(0, self.backbone, self.head, self.backbone_opt, self.head_opt,
                                self.scaler, self.stream, self.aux_losses, engine=self.ds)
        self.logger = MetricsLogger(self.run_dir, self.info.is_main, cfg.wandb, cfg.to_dict(),
                                    resume=self.resume_from is not None)
        self.do_eval = has_eval_sets(cfg)
        self.eval_sets = build_eval_sets(cfg) if self.info.is_main and self.do_eval else {}
        if self.resume_from is not None:
            self.state.step = load_checkpoint(self.resume_from, self.state, self.info, cfg.to_dict())
        self.untrained: dict | None = None  # verification before training, for the report
        self.fault = FaultInjection.from_env()  # recovery tests: DPFACE_FAULT_* (faults.py)
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

    def _prepare_run_dir(self, resume: str | None, overwrite: bool) -> Path | None:
        """Leftovers of interrupted saves are cleaned; a fresh start where another run's
        checkpoints are is refused (its saves would mix with them, and --resume auto would
        continue the old run) unless ``overwrite``, which deletes that run's files first.
        Returns the checkpoint to resume from."""
        dist.barrier()  # every rank of this group is here: none is saving
        if self.info.is_main:
            recover_interrupted_saves(self.ckpt_root)
        dist.barrier()
        done = complete_checkpoints(self.ckpt_root)
        if resume is None and done and not overwrite:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints of a run (latest {done[-1].name}): continue "
                "it with --resume auto, delete them and start over with --overwrite, or choose "
                "another experiment.name")
        if resume is None and overwrite and self.info.is_main:
            for d in (self.ckpt_root, self.run_dir / "plots"):
                shutil.rmtree(d, ignore_errors=True)
            for f in ("metrics.jsonl", "final_metrics.json", WANDB_ID_FILE):
                (self.run_dir / f).unlink(missing_ok=True)
        found = resolve_resume(resume, self.ckpt_root)
        if resume == "auto" and found is None and self.info.is_main:
            print(f"dpface: --resume auto: no checkpoint found, starting fresh (in {self.ckpt_root})", flush=True)
        return found

    # -- pieces -----------------------------------------------------------------
    def evaluate(self) -> dict:
        rocs = {}
        metrics = evaluate(self.backbone, self.eval_sets, self.cfg, self.info.device, rocs) if self.info.is_main else {}
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
        kw = dict(total_steps=t.steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
                  poly_power=t.poly_power, min_lr=t.min_lr)
        lr = lr_at(step, base_lr=t.lr, **kw)
        for g in self.backbone_opt.param_groups:
            g["lr"] = lr
        head_lr = lr_at(step, base_lr=t.head_lr or t.lr, **kw)
        for g in self.head_opt.param_groups:
            g["lr"] = head_lr
        return lr

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """One update; returns metrics (loss, acc, grad_norm, skipped)."""
        dev, step = self.info.device, self.state.step
        lr = self._set_lr(step)
        x = normalize(images.to(dev, non_blocking=True))
        labels = labels.to(dev, non_blocking=True)
        with autocast(dev, self.amp_dtype):
            emb = self.model(x)
        emb = emb.float()
        out = self.head(emb, labels, step)
        loss, aux_values = out.loss, {}
        for name, fn, w in zip(self.aux_names, self.aux_losses, self.aux_weights):
            value = fn(emb, labels, step)
            aux_values[f"aux/{name}"] = value.item()
            loss = loss + w * value
        if self.ds is not None:  # DeepSpeed: its own backward, loss scale, clipping and step
            finite, grad_norm = self.ds.backward_and_step(loss, self.head, self.head_opt,
                                                          self.cfg.train.grad_clip)
        else:
            self.scaler.scale_loss(loss).backward()

            rows, head_replicated = head_grad_params(self.head)
            replicated = [p for p in self.backbone.parameters() if p.grad is not None]
            replicated += head_replicated
            self.scaler.unscale_(replicated + rows)
            # One pass, one all-reduce: the norm, and the skip decision all ranks share.
            norm = global_grad_norm(replicated, rows, dev)
            grad_norm = norm.item()
            finite = math.isfinite(grad_norm)
            self.scaler.update(finite)
            if finite:
                clip = self.cfg.train.grad_clip
                if 0 < clip < grad_norm:
                    torch.nn.utils.clip_grads_with_norm_(replicated + rows, clip, norm)
                self.backbone_opt.step()
                self.head_opt.step()
            else:
                grad_norm = float("nan")
            self.backbone_opt.zero_grad(set_to_none=True)
            self.head_opt.zero_grad(set_to_none=True)
        self.state.step += 1
        return {"loss": loss.item(), "acc": float(out.accuracy), "lr": lr,
                "grad_norm": grad_norm, "skipped": 0 if finite else 1, **aux_values}

    # -- loop ---------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict:
        """Train to ``train.steps`` (or stop early at step ``until``, checkpointed, as an
        interrupted run would), then evaluate. On SIGTERM/SIGINT: checkpoint at the next
        step boundary, then raise StopRequested (preempt.py)."""
        self._fit_started = time.perf_counter()  # wall time of this session, for the model card
        self._batches = None  # the data stream's iterator, once _fit has one
        with SignalStop() as self._signals:
            try:
                return self._fit(until)
            finally:
                # Data workers ignore SIGINT/SIGTERM (data/loader.py), so multiprocessing's
                # terminate() at exit could not end them and its join would hang: however
                # the loop ends (a stop, divergence, a bug), closing the stream's generator
                # shuts its DataLoader down now.
                if hasattr(self._batches, "close"):
                    self._batches.close()

    def _fit(self, until: int | None) -> dict:
        cfg, info, t = self.cfg, self.info, self.cfg.train
        stop = min(until, t.steps) if until is not None else t.steps
        global_batch = cfg.data.batch_size * info.world_size
        if info.is_main:
            n_params = sum(p.numel() for p in self.backbone.parameters())
            print(f"dpface: {cfg.model['name']} ({n_params / 1e6:.2f}M params), "
                  f"{self.head.num_classes} classes, world {info.world_size}, "
                  f"global batch {global_batch}, device {info.device}, "
                  f"amp {self.amp_dtype or 'fp32'}, steps {self.state.step}->{t.steps}", flush=True)
            print(f"{ops.report()}; head: {self.head_kernel}", flush=True)
        if self.state.step == 0 and self.do_eval:
            m = self.evaluate()
            self.logger.log(0, m, prefix="eval-untrained")
            self.untrained = m
        bar = None
        if info.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=self.state.step, desc="train", dynamic_ncols=True)

        consecutive_skips, window, stop_signal = 0, [], 0
        t_last, steps_last = time.perf_counter(), self.state.step
        it = self._batches = iter(self.stream)
        while self.state.step < stop:
            images, labels = next(it)
            m = self.train_step(images, labels)
            if self.fault is not None:
                self.fault.after_step(self.state.step, info.rank)
            consecutive_skips = consecutive_skips + 1 if m["skipped"] else 0
            if consecutive_skips >= t.max_skipped_steps:
                raise FloatingPointError(
                    f"{consecutive_skips} consecutive steps had non-finite gradients "
                    f"(loss {m['loss']}, loss scale {self.scaler.scale}); stopping instead of "
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
                means = ["loss", "acc", *(k for k in m if k.startswith("aux/"))]
                agg = {k: sum(w[k] for w in window) / len(window) for k in means}
                agg.update(lr=m["lr"], grad_norm=m["grad_norm"], img_s=rate,
                           skipped=sum(w["skipped"] for w in window), epoch=self.stream.epoch,
                           **{f"data/{k}": v for k, v in self.stream.stats().items()})
                if self.scaler.enabled:
                    agg["loss_scale"] = self.scaler.scale
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
        if self.state.step < t.steps:  # stopped early on purpose: leave evaluation to the end
            return {}
        final = self.evaluate() if self.do_eval else {}
        if info.is_main:
            if final:
                self.logger.log(self.state.step, final, prefix="eval")
            summary = {"step": self.state.step, "checkpoint": str(path), **final}
            if self.untrained:
                summary.update({f"untrained/{k}": v for k, v in self.untrained.items()})
            (self.run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=1))
            from dpface.eval.model_card import write_training_card

            wall = time.perf_counter() - getattr(self, "_fit_started", time.perf_counter())
            write_training_card(self, path, wall)
        self.logger.close()
        return final


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> dict:
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    try:
        return trainer.fit()
    finally:
        trainer.logger.close()
