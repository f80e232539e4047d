"""Nothing already written is lost: resuming an older step keeps the later checkpoints
(moved aside, intact), --overwrite never deletes through a symbolic link, two runs cannot
share a run directory (and a killed run's lock is taken over with a message), and an
export never writes into a checkpoint or over a file without --force."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dpface.cli import main
from dpface.rundir import RunDir
from tests.helpers import error_line, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "cpu_demo.yaml")


def train(out: Path, name: str, *extra: str, resume: str | None = None, overwrite=False) -> int:
    argv = ["train", "--config", DEMO, *tiny_overrides(*extra, out=out, name=name)]
    argv += ["--resume", resume] if resume else []
    argv += ["--overwrite"] if overwrite else []
    return main(argv)


def steps(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("step-"))


def test_resume_from_an_older_step_moves_the_later_ones_aside(tmp_path, capsys):
    assert train(tmp_path, "r", "train.steps=6", "train.ckpt_every=2", "train.keep_checkpoints=3") == 0
    ckpts = tmp_path / "r" / "checkpoints"
    assert steps(ckpts) == ["step-00000002", "step-00000004", "step-00000006"]
    old = {n: (ckpts / n / "trainer.pt").read_bytes() for n in ("step-00000004", "step-00000006")}
    capsys.readouterr()
    assert train(tmp_path, "r", "train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=1",
                 resume=str(ckpts / "step-00000002")) == 0
    out = capsys.readouterr().out
    assert "the later checkpoints of this run were moved, intact, to" in out
    (aside,) = [p for p in ckpts.iterdir() if p.name.startswith("abandoned-after-step-00000002-")]
    assert {n: (aside / n / "trainer.pt").read_bytes() for n in old} == old  # the old branch, untouched
    assert steps(ckpts) == ["step-00000004"]  # the new branch (keep_checkpoints=1)
    import json

    final = json.loads((tmp_path / "r" / "final_metrics.json").read_text())
    assert Path(final["checkpoint"]).is_dir(), final["checkpoint"]
    assert RunDir(tmp_path / "r").resolve_resume("auto") == ckpts / "step-00000004"  # not the old branch


def test_overwrite_refuses_a_symlinked_checkpoints_dir(tmp_path, capsys):
    assert train(tmp_path, "r", "train.steps=2") == 0
    real = tmp_path / "elsewhere"
    (tmp_path / "r" / "checkpoints").rename(real)
    (tmp_path / "r" / "checkpoints").symlink_to(real)
    before = sorted(p.name for p in real.iterdir())
    capsys.readouterr()
    assert train(tmp_path, "r", "train.steps=2", overwrite=True) == 2
    assert "symbolic link" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in real.iterdir()) == before


def _cmd(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dpface.cli", "train", "--config", DEMO,
            *tiny_overrides(*extra, out=out, name=name)]


def test_two_runs_cannot_share_a_run_directory_and_a_killed_runs_lock_is_taken_over(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(_cmd(tmp_path, "r", "train.steps=100000", "train.log_every=1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in first.stdout:
            if line.startswith("[train]"):
                break
        second = subprocess.run(_cmd(tmp_path, "r", "train.steps=2"), capture_output=True, text=True,
                                timeout=120, env=env)
        assert second.returncode == 2, second.stderr
        line = error_line(second.stderr)
        assert "is in use by another dpface run (pid " in line and str(first.pid) in line, line
        first.send_signal(signal.SIGKILL)  # dies holding the lock: no release, no cleanup
        first.wait(timeout=30)
    finally:
        first.kill()
    third = subprocess.run([*_cmd(tmp_path, "r", "train.steps=2"), "--resume", "auto"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert third.returncode == 0, third.stderr
    assert f"(pid {first.pid} on " in third.stdout and "ended without releasing it; taken over" in third.stdout


def test_export_never_writes_into_a_checkpoint_or_over_a_file(tmp_path, capsys):
    assert train(tmp_path, "r", "train.steps=2") == 0
    ckpt = tmp_path / "r" / "checkpoints" / "step-00000002"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    capsys.readouterr()
    for cmd, what in ((["export-onnx", "--out", str(ckpt / "trainer.pt")], "inside the checkpoint directory"),
                      (["export-head", "--out", str(ckpt / "trainer.pt"), "--force"], "inside the checkpoint"),
                      (["export-onnx", "--out", str(tmp_path)], "is a directory"),
                      (["export-head", "--out", str(tmp_path / "r" / "config.yaml")], "exists; pass --force")):
        assert main([cmd[0], "--checkpoint", str(ckpt), *cmd[1:]]) == 2, cmd
        assert what in error_line(capsys.readouterr().err), cmd
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".partial"))
    head = tmp_path / "head.pt"
    assert main(["export-head", "--checkpoint", str(ckpt), "--out", str(head)]) == 0
    first = head.stat().st_mtime_ns
    time.sleep(0.01)
    assert main(["export-head", "--checkpoint", str(ckpt), "--out", str(head), "--force"]) == 0
    assert head.stat().st_mtime_ns != first


def test_resume_auto_on_a_finished_run_does_nothing_and_training_ends_with_a_summary(tmp_path, capsys):
    assert train(tmp_path, "r", "train.steps=2") == 0
    out = capsys.readouterr().out
    assert "dpface: evaluating step 0 on synthetic (40 pairs)…" in out  # the long phases say so first
    assert " eta=0:00:" in next(line for line in out.splitlines() if line.startswith("[train] step 2 "))
    assert "dpface: done: step 2 in 00:00:" in out and f"run {tmp_path / 'r'}" in out and "MODEL_CARD.md" in out
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    card = (tmp_path / "r" / "MODEL_CARD.md").read_text()
    assert "kernel fused margin-softmax op (cpu, fp32)" in card and "amp fp32" in card  # what ran, not "auto"
    assert train(tmp_path, "r", "train.steps=2", resume="auto") == 0
    assert "the run already finished at step 2" in capsys.readouterr().out
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics  # no duplicate rows
    assert (tmp_path / "r" / "MODEL_CARD.md").read_text() == card
