"""SIGTERM during the final evaluation: the final checkpoint is already written, so the run
stops at once with exit 143 (it used to say "stopping after this step", evaluate for another
minute and exit 0); and launchers/torchrun.sh exits 143 on SIGTERM, not torchrun's 1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import base_env, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "cpu_demo.yaml")
# A verification set large enough that its evaluation takes seconds on the tiny network.
BIG_EVAL = ("eval.num_identities=100", "eval.num_pairs=2000", "eval.folds=10")


def test_sigterm_during_final_evaluation_stops_at_once(tmp_path):
    # step 1 with the small evaluation; then resumed (no untrained evaluation) to step 2
    from dpface.cli import main

    assert main(["train", "--config", DEMO, *tiny_overrides("train.steps=1", out=tmp_path, name="r")]) == 0
    cmd = [sys.executable, "-m", "dpface.cli", "train", "--config", DEMO, "--resume", "auto",
           *tiny_overrides("train.steps=2", "train.log_every=1", *BIG_EVAL, out=tmp_path, name="r")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(tmp_path))
    try:
        for line in p.stdout:
            if line.startswith("[train] step 2 "):  # the last step: the final save, then evaluation
                break
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        p.kill()
    err = p.stderr.read()
    assert rc == 143, err[-2000:]
    assert "received during the final evaluation" in err or "stopped by SIGTERM" in err, err[-2000:]
    assert waited < 15, waited
    assert (tmp_path / "r" / "checkpoints" / "step-00000002" / "meta.json").is_file()


@pytest.mark.multiproc
def test_torchrun_launcher_exits_143_on_sigterm(tmp_path):
    env = base_env(tmp_path)
    cmd = ["bash", str(REPO / "launchers" / "torchrun.sh"), "--nproc-per-node", "2", "--", "--config", DEMO,
           *tiny_overrides("train.steps=100000", "train.log_every=1", out=tmp_path, name="r",
                           drop=("experiment.device",))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        for line in p.stdout:
            if line.startswith("[train] step 2 "):
                break
        os.kill(p.pid, signal.SIGTERM)  # what SLURM or a user's kill sends to the launcher
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc == 143
    assert any(d.name.startswith("step-") for d in (tmp_path / "r" / "checkpoints").iterdir())
