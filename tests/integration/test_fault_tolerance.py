"""A worker killed mid-run: torchrun restarts the group, which resumes from the latest
complete checkpoint and ends with the weights of an uninterrupted run.

(The Ray Train version of this is in test_ray.py; DeepSpeed's in test_deepspeed.py.)
"""
import pytest

from dpface.engine.faults import FaultInjection
from tests.helpers import (
    FAULT_STEP,
    assert_same_loss_curve,
    assert_same_weights,
    base_env,
    reference_run,
    torchrun_sh,
)


def fault_env(tmp_path, **extra):
    env = base_env(tmp_path)
    env.update(DPFACE_FAULT_AT_STEP=str(FAULT_STEP), DPFACE_FAULT_RANK="1",
               DPFACE_FAULT_MARKER=str(tmp_path / "fault-happened"), **extra)
    return env


def test_fault_injection_settings(tmp_path):
    assert FaultInjection.from_env({}) is None
    with pytest.raises(ValueError, match="DPFACE_FAULT_MARKER is not"):
        FaultInjection.from_env({"DPFACE_FAULT_AT_STEP": "3"})
    with pytest.raises(ValueError, match="must be integers"):
        FaultInjection.from_env({"DPFACE_FAULT_AT_STEP": "x", "DPFACE_FAULT_MARKER": "m"})
    f = FaultInjection.from_env({"DPFACE_FAULT_AT_STEP": "3", "DPFACE_FAULT_MARKER": str(tmp_path / "m")})
    assert (f.step, f.rank) == (3, 1)
    f.after_step(2, 1)  # another step, another rank: nothing happens
    f.after_step(3, 0)
    (tmp_path / "m").write_text("done")
    f.after_step(3, 1)  # the marker exists: the restarted attempt runs through
    assert (tmp_path / "m").read_text() == "done"


@pytest.mark.slow
@pytest.mark.multiproc
def test_torchrun_restart_after_killed_worker_matches_uninterrupted_run(tmp_path, tmp_path_factory):
    ref = reference_run(tmp_path_factory)
    env = fault_env(tmp_path)
    run = torchrun_sh(tmp_path, "faulty", env=env, launcher_args=["--max-restarts", "1"]).check()
    assert (tmp_path / "fault-happened").is_file(), "the fault was not injected"
    assert "exitcode: -9" in run.output or "Signals.SIGKILL" in run.output or "SIGKILL" in run.output
    # Checkpoints at 3 and 6: rank 1 died after step 5, so the restart resumed from step 3.
    assert "steps 3->8" in run.output
    assert_same_loss_curve(tmp_path / "faulty", ref, replayed_step=4)
    assert_same_weights(tmp_path / "faulty", ref)
