"""Helpers of the launcher / Ray / DeepSpeed / fault-tolerance tests: real training
processes on a tiny model, and comparisons of their checkpoints.

One 2-rank DDP run through launchers/torchrun.sh is the reference the other runs are
compared with; it is made once per test session, in the session's base temp directory
(on disk, keyed by name), so every test module reuses it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu_demo.yaml"
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


def base_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in [k for k in env if k.startswith("DPFACE_")]:
        del env[k]
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
