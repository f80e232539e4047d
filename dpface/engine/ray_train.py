"""`dpface train` as a Ray Train job: the same Trainer on every Ray worker.

Ray Train starts one worker per rank, forms the torch process group (gloo on CPU
workers, NCCL on GPU workers) and exports RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, so ``dpface.distributed.init_from_env`` finds the group already
initialised and only reads it. From there each worker runs ``Trainer.fit`` as a torchrun
rank does; the validated config (file + overrides, resolved on the driver) is the only
input.

Checkpoints: dpface writes its step directories (atomic, sharded head) into the run
directory as always; after each one rank 0 also reports it to Ray, which copies it to
``RunConfig.storage_path`` and keeps ``CheckpointConfig.num_to_keep`` of them. When a
worker dies, ``FailureConfig(max_failures)`` restarts the whole group, and every worker
resumes from the newest complete checkpoint: the run directory's latest or Ray's
latest, whichever is further along (Ray's copy serves when the run directory is not
shared between nodes).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from dpface import distributed as dist
from dpface.config import Config, config_from_dict, load_config
from dpface.engine.trainer import Trainer
from dpface.rundir import RunDir, read_meta

# Environment variables forwarded from the driver to the workers (W&B settings, NCCL
# tuning, dpface's fault injection for recovery tests).
FORWARD_ENV_PREFIXES = ("DPFACE_", "WANDB_", "NCCL_", "TORCH_NCCL_", "OMP_NUM_THREADS")


def absolute_paths(cfg: Config, base: Path) -> Config:
    """Workers may run in another working directory: make the run directory and data
    paths absolute against the driver's (multi-node: put them on shared storage)."""
    data = cfg.to_dict()

    def fix(p: str) -> str:
        return p if not p or os.path.isabs(p) or "://" in p else str((base / p).resolve())

    data["experiment"]["output_dir"] = fix(data["experiment"]["output_dir"])
    data["data"]["shards"]["manifest"] = fix(data["data"]["shards"]["manifest"])
    data["eval"]["bin_sets"] = [fix(p) for p in data["eval"]["bin_sets"]]
    return config_from_dict(data, "<ray driver>")


def _step_of(path: Path | None) -> int:
    return -1 if path is None else int(read_meta(path)["step"])


class _RayTrainer(Trainer):
    """The Trainer, plus: every checkpoint is reported to Ray (a barrier for all
    workers: save() is collective, so every rank reports the same number of times)."""

    def save(self) -> Path:
        import ray.train

        path = super().save()
        ckpt = ray.train.Checkpoint.from_directory(str(path)) if self.info.is_main else None
        ray.train.report({"step": self.state.step}, checkpoint=ckpt, checkpoint_dir_name=path.name,
                         delete_local_checkpoint_after_upload=False)
        return path


def _worker_info(cfg: Config) -> dist.ParallelContext:
    """init_from_env joins nothing here (Ray formed the group) and reads rank and world
    size. The CUDA device is Ray's pick for this worker, which need not be LOCAL_RANK
    when Ray gives each worker its own CUDA_VISIBLE_DEVICES."""
    info = dist.init_from_env("cpu")
    if cfg.experiment.device != "cpu" and torch.cuda.is_available():
        import ray.train.torch

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        info = dataclasses.replace(info, local_rank=dev.index, device=dev)
    elif cfg.experiment.device == "cuda":
        raise RuntimeError("experiment.device=cuda but this Ray worker sees no GPU: launch with --gpus-per-worker 1")
    return info


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function."""
    import ray.train

    cfg = config_from_dict(loop_config["config"], loop_config["source"])
    info = _worker_info(cfg)
    local = RunDir.of(cfg.experiment.output_dir, cfg.experiment.name).resolve_resume("auto")
    reported = ray.train.get_checkpoint()
    trainer = None
    if reported is not None:
        # Ray's copy is used only when it is newer (run directory not shared, or lost);
        # the Trainer reads it while the directory exists.
        with reported.as_directory() as d:
            if _step_of(Path(d)) > _step_of(local):
                trainer = _RayTrainer(cfg, resume=str(d), info=info)
    if trainer is None:
        user = loop_config.get("resume")
        # The user's start point serves the first attempt only; retries continue the run.
        resume = str(user) if local is None and user not in (None, "auto") else "auto"
        trainer = _RayTrainer(cfg, resume=resume, info=info)
    try:
        final = trainer.fit()
    finally:
        trainer.logger.close()
    # Rank 0's values reach the driver's Result.metrics.
    ray.train.report({"step": trainer.state.step, "done": True, **final})


def forwarded_env(environ=None) -> dict:
    env = os.environ if environ is None else environ
    out = {k: v for k, v in env.items() if k.startswith(FORWARD_ENV_PREFIXES)}
    # Ray Train routes print() through its logger and also tees it to the (wrapped)
    # stdout, so every metrics line reached the driver twice; plain stdout is enough.
    out.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", env.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"))
    return out


def build_trainer(cfg: Config, source: str, *, num_workers: int, gpus_per_worker: float = 0,
                  cpus_per_worker: float = 1, max_failures: int = 0, storage_path: str | None = None,
                  resume: str | None = "auto"):
    """A ray.train.torch.TorchTrainer for this config (not started)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    run_dir = RunDir.of(cfg.experiment.output_dir, cfg.experiment.name).root
    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "source": source, "resume": resume},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.experiment.name,
            # Ray needs an absolute path or a URI (s3://, gs://).
            storage_path=(storage_path if storage_path and "://" in storage_path
                          else str(Path(storage_path or run_dir / "ray").resolve())),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": forwarded_env()},
        ),
    )


def launch(config_path: str, overrides: list[str] = (), *, address: str | None = None,
           num_cpus: int | None = None, **trainer_kwargs):
    """Validate the config here, connect to (or start) Ray, run the job; returns Ray's
    Result and the run directory."""
    import ray

    source = str(config_path) + (" (with overrides " + " ".join(overrides) + ")" if overrides else "")
    cfg = absolute_paths(load_config(config_path, list(overrides)), Path.cwd())
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
    result = build_trainer(cfg, source, **trainer_kwargs).fit()
    return result, RunDir.of(cfg.experiment.output_dir, cfg.experiment.name).root
