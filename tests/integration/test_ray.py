"""Ray Train: a 2-worker CPU job on a local Ray runs the same Trainer as torchrun, survives
a killed worker (FailureConfig) and ends with the uninterrupted torchrun run's weights."""
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch.distributed as tdist

from dpface import distributed as dist
from tests.helpers import (
    CONFIG,
    FAULT_STEP,
    REPO,
    STEPS,
    assert_same_loss_curve,
    assert_same_weights,
    base_env,
    launch,
    overrides,
    reference_run,
)


def test_init_from_env_reads_an_existing_group(tmp_path, monkeypatch):
    """Under Ray Train the group exists before dpface runs: init_from_env must read it, not
    create another (the environment's values are not used to initialise anything)."""
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                             timeout=datetime.timedelta(seconds=30))
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # would make init_from_env try to join a 2-rank group
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        info = dist.init_from_env("cpu")
        assert (info.rank, info.world_size, info.device.type) == (0, 1, "cpu")
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiproc
def test_ray_job_recovers_from_killed_worker(tmp_path, tmp_path_factory):
    pytest.importorskip("ray.train.torch")
    ref = reference_run(tmp_path_factory)
    # Ray's unix sockets live under RAY_TMPDIR and must stay under ~107 characters.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        env = base_env(tmp_path)
        env.update(RAY_TMPDIR=str(ray_tmp), HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0",
                   DPFACE_FAULT_AT_STEP=str(FAULT_STEP), DPFACE_FAULT_RANK="1",
                   DPFACE_FAULT_MARKER=str(tmp_path / "fault-happened"))
        cmd = [sys.executable, str(REPO / "launchers" / "ray_launch.py"), "--num-workers", "2",
               "--num-cpus", "2", "--max-failures", "1", "--config", str(CONFIG),
               *overrides(tmp_path, "rayjob")]
        run = launch(cmd, env, timeout_s=240).check()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\nRay Train, 2 CPU workers: launch -> first step {run.first_step_s:.1f} s, "
          f"total {run.wall_s:.1f} s (one worker killed and the group restarted)")
    assert (tmp_path / "fault-happened").is_file(), "the fault was not injected"
    run_dir = tmp_path / "rayjob"
    assert "steps 3->8" in run.output  # the restarted group resumed from checkpoint 3
    assert_same_loss_curve(run_dir, ref, replayed_step=4)
    assert_same_weights(run_dir, ref)
    # Ray kept its own copies of the reported checkpoints (RunConfig storage).
    copies = sorted(p.name for p in (run_dir / "ray" / "rayjob").glob("step-*"))
    assert f"step-{STEPS:08d}" in copies and (run_dir / "ray" / "rayjob" / copies[-1] / "meta.json").is_file()
    # The launcher's summary (Ray keeps logging after it, so decode just the object).
    summary, _ = json.JSONDecoder().raw_decode(run.output[run.output.rindex('{\n "run_dir"'):])
    assert summary["run_dir"] == str(run_dir)
    assert summary["ray_checkpoint"].endswith(f"step-{STEPS:08d}")
    assert summary["final_metrics"]["step"] == STEPS and "synthetic/acc" in summary["final_metrics"]
