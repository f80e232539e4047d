"""What the tests share, in one module: the tiny training run, real gloo ranks, launcher
processes, subprocess runs of ``python -m dpface``, and comparisons of their results.

``TINY_RUN`` is a small network (iresnet_tiny, width 8, 32-d embedding, CosFace) on a
12-identity synthetic set, verified on 10 held-out identities (40 pairs, 2 folds), on the
CPU, without loader workers or W&B. A test states only how its run differs:

    tiny_overrides("train.steps=4", out=tmp_path, name="x")  # an extra replaces the same key
    tiny_overrides(..., drop=("head.loss",))                  # this key keeps its default
    load_tiny(tmp_path, "x", "train.steps=4")                  # the loaded Config

``run_distributed(fn, world_size, tmp_path, *args)`` spawns ``world_size`` processes,
joins them through a FileStore in ``tmp_path``, calls ``fn(rank, world_size, *args)``
in each and returns the per-rank return values (which must be torch.save-able). An
exception in any rank is re-raised in the caller with that rank's traceback; a run
that outlives ``timeout_s`` (a deadlock) is killed and reported as a TimeoutError.
``fn`` must be a module-level function (the spawn start method pickles it by name).

One 2-rank DDP run through launchers/torchrun.sh (``reference_run``) is the reference
the launcher, Ray, DeepSpeed and fault-tolerance runs are compared with; it is made once
per test session, in the session's base temp directory.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu_demo.yaml"

# -- the tiny run ------------------------------------------------------------------------
TINY_RUN = [
    "experiment.device=cpu",
    "model={name: iresnet_tiny, base_width: 8}", "head.embedding_size=32",
    "head.loss={name: cosface, s: 16.0, m: 0.2}",
    "data.batch_size=16", "data.num_workers=0",
    "data.synthetic={num_identities: 12, max_images: 8, min_images: 4}",
    "eval.num_identities=10", "eval.num_pairs=40", "eval.folds=2",
    "wandb.enabled=false",
]
# The synthetic training and verification sets' sizes: what a run on shards leaves out.
SYNTHETIC_SETS = ("data.synthetic", "eval.num_identities", "eval.num_pairs", "eval.folds")


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def tiny_overrides(*extra: str, out=None, name: str | None = None, drop=()) -> list[str]:
    """``TINY_RUN`` less the keys in ``drop`` and those ``extra`` sets again, then
    ``extra`` (after ``experiment.output_dir``/``experiment.name`` when given). The
    resolved config is the one of ``[*TINY_RUN, *extra]`` with ``drop`` at its defaults."""
    unknown = set(drop) - {_key(o) for o in TINY_RUN}
    if unknown:
        raise KeyError(f"drop names keys TINY_RUN does not set: {sorted(unknown)}")
    replaced = {_key(o) for o in extra} | set(drop)
    head = [] if out is None else [f"experiment.output_dir={out}"]
    head += [] if name is None else [f"experiment.name={name}"]
    return [*head, *(o for o in TINY_RUN if _key(o) not in replaced), *extra]


def load_tiny(out, name: str, *extra: str, drop=()):
    """The Config of the tiny run ``name`` under ``out`` (no recipe file: the defaults)."""
    from dpface.config import load_config

    return load_config(None, tiny_overrides(*extra, out=out, name=name, drop=drop))


# A tiny run of configs/cpu_demo.yaml as a user starts it: batch 8, 4 steps, a checkpoint
# every 2 steps (``dpface train *demo_args(out, name, ...)``).
DEMO_TINY = tiny_overrides("data.batch_size=8", "train.steps=4", "train.ckpt_every=2",
                           "train.warmup_steps=0", "train.log_every=1")


def demo_args(out: Path, name: str, *extra: str) -> list[str]:
    """``dpface train`` arguments of that run in ``out/name``; ``extra`` overrides win."""
    return ["--config", str(CONFIG), f"experiment.output_dir={out}", f"experiment.name={name}",
            *DEMO_TINY, *extra]


def tiny_cfg(tmp_path, name, *extra):
    """The tiny run with ArcFace and a long-tailed set, 6 steps."""
    return load_tiny(tmp_path, name, "head.loss={name: arcface, s: 16.0, m: 0.3}",
                     "data.synthetic={num_identities: 12, max_images: 8, min_images: 4, exponent: 0.5}",
                     "train.steps=6", "train.lr=0.05", "train.warmup_steps=2", "train.log_every=1",
                     *extra)


def losses(run_dir) -> dict[int, float]:
    """step → the last training loss logged for it."""
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def copy_of(run_dir: Path, tmp_path: Path, name: str) -> Path:
    """A copy of a finished run under ``tmp_path`` (tests that change a run change a copy)."""
    run = tmp_path / name
    shutil.copytree(run_dir, run)
    return run


def error_line(err: str) -> str:
    """The one ``dpface: error:`` line ``err`` must consist of."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("dpface: error: "), err
    return lines[0]


def write_tar(path, members) -> None:
    """A tar of (name, bytes) members, as a shard holds them."""
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def take(stream, n: int) -> list:
    """The first ``n`` batches of a new iteration of ``stream``."""
    it = iter(stream)
    return [next(it) for _ in range(n)]


def assert_resumes(build, batches: list, after: int) -> None:
    """A stream from ``build()`` that yielded ``after`` batches, its state loaded into a fresh
    ``build()``, continues with ``batches[after:]`` (an uninterrupted stream's), image for
    image and label for label."""
    first = build()
    take(first, after)
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    for (x0, y0), (x1, y1) in zip(batches[after:], take(resumed, len(batches) - after), strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)


# -- real gloo ranks -----------------------------------------------------------------------
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


# -- subprocesses and launchers ------------------------------------------------------------
def dpface(*argv: str, extra_env=None, timeout=180) -> subprocess.CompletedProcess:
    """``python -m dpface ARGV`` in the repository, to completion."""
    return subprocess.run([sys.executable, "-m", "dpface", *argv], cwd=REPO,
                          env={**base_env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


STEPS = 8
FAULT_STEP = 5  # rank 1 dies after this step; the last checkpoint before it is step 3


def overrides(output_dir: Path, name: str, *extra: str) -> list[str]:
    """The tiny run every test trains: 8 steps, checkpoints at 3 and 6 (and the end),
    no clipping (DeepSpeed clips by another norm, see deepspeed_backbone.py). The tiny run
    of tests/conftest.py at width 16, with the default device and loss."""
    return tiny_overrides(
        "model={name: iresnet_tiny, base_width: 16}", "data.batch_size=8",
        f"train.steps={STEPS}", "train.log_every=1", "train.ckpt_every=3", "train.keep_checkpoints=3",
        "train.warmup_steps=0", "train.grad_clip=0", *extra,
        out=output_dir, name=name, drop=("experiment.device", "head.loss"))


def base_env(tmp: Path | None = None) -> dict:
    """The environment of a dpface subprocess: no DPFACE_/WANDB_ settings of the caller's,
    one thread per process, unbuffered output, $PYTHON for the launchers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPFACE_", "WANDB_"))}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class Run:
    """A finished launcher process: its output, exit code and time to the first step."""

    def __init__(self, returncode: int, output: str, first_step_s: float | None, wall_s: float):
        self.returncode, self.output = returncode, output
        self.first_step_s, self.wall_s = first_step_s, wall_s

    def check(self) -> "Run":
        assert self.returncode == 0, f"exit {self.returncode}:\n{self.output[-6000:]}"
        return self


def launch(cmd: list[str], env: dict, timeout_s: float, cwd: Path = REPO) -> Run:
    """Run ``cmd`` to completion, streaming its output to note when step 1 is logged."""
    start = time.monotonic()
    first = None
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as proc:
        try:
            for line in proc.stdout:
                lines.append(line)
                if first is None and "[train] step 1 " in line:
                    first = time.monotonic() - start
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError
            proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
        except (TimeoutError, subprocess.TimeoutExpired) as e:
            os.killpg(proc.pid, 9)  # the launcher and the workers it started
            proc.wait()
            raise TimeoutError(f"{cmd[:3]} did not finish in {timeout_s} s:\n{''.join(lines)[-6000:]}") from e
    return Run(proc.returncode, "".join(lines), first, time.monotonic() - start)


def torchrun_sh(output_dir: Path, name: str, *extra: str, env: dict, launcher_args=(),
                timeout_s: float = 150) -> Run:
    cmd = ["bash", str(REPO / "launchers" / "torchrun.sh"), "--nproc-per-node", "2", *launcher_args,
           "--", "--config", str(CONFIG), *overrides(output_dir, name, *extra)]
    return launch(cmd, env, timeout_s)


def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank DDP run (made once per session); returns its run dir."""
    root = tmp_path_factory.getbasetemp() / "ddp-reference"
    run_dir = root / "ref"
    if not (run_dir / "final_metrics.json").is_file():
        root.mkdir(exist_ok=True)
        run = torchrun_sh(root, "ref", env=base_env(root)).check()
        (root / "timing.json").write_text(json.dumps({"first_step_s": run.first_step_s,
                                                      "wall_s": run.wall_s}))
    return run_dir


def train_losses(run_dir: Path) -> dict[int, list[float]]:
    """step → every loss logged for it (a resumed run logs the replayed steps again)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out.setdefault(row["step"], []).append(row["loss"])
    return out


def final_checkpoint(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert (path / "meta.json").is_file(), f"no complete final checkpoint in {run_dir}"
    return path


def final_weights(run_dir: Path) -> tuple[dict, dict]:
    """(backbone state_dict, whole head assembled from its shards) of the final checkpoint."""
    from dpface.heads.sharding import load_resharded

    ckpt = final_checkpoint(run_dir)
    backbone = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)["backbone"]
    meta = json.loads((ckpt / "meta.json").read_text())
    head = load_resharded(sorted(ckpt.glob("head-rank*.pt")), 0, meta["num_classes"])["rows"]
    return backbone, head


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    (bb_a, head_a), (bb_b, head_b) = final_weights(a), final_weights(b)
    assert bb_a.keys() == bb_b.keys()
    for k in bb_a:
        assert torch.allclose(bb_a[k].float(), bb_b[k].float(), atol=atol), f"backbone {k}"
    assert head_a.keys() == head_b.keys()
    for k in head_a:
        assert torch.allclose(head_a[k].float(), head_b[k].float(), atol=atol), f"head {k}"


def assert_same_loss_curve(run_dir, ref_dir, replayed_step):
    """Every logged loss (the replayed steps are logged twice) equals the uninterrupted run's."""
    got, ref = train_losses(run_dir), train_losses(ref_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert len(got[replayed_step]) == 2, f"step {replayed_step} should run in both attempts: {got}"
    for step, values in got.items():
        for v in values:
            assert v == pytest.approx(ref[step][0], rel=1e-5, abs=1e-6), (step, values, ref[step])
