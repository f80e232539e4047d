"""Nothing a user does loses a checkpoint: real `python -m dpface train`
processes that diverge, find stale partial saves, rerun in a used run directory, are
killed mid-save or get SIGTERM / SIGINT, then run again."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dpface.cli import main
from dpface.engine.checkpoint import complete_checkpoints
from tests.helpers import DEMO_TINY, REPO, base_env, copy_of, demo_args, dpface, ok


def names(run_dir: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(run_dir / "checkpoints")]


def is_finite(ckpt: Path) -> bool:
    for f in ckpt.glob("*.pt"):
        stack = [torch.load(f, weights_only=True)]
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                if x.is_floating_point() and not torch.isfinite(x).all():
                    return False
            elif isinstance(x, dict):
                stack += x.values()
            elif isinstance(x, (list, tuple)):
                stack += x
    return True


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test)."""
    out = tmp_path_factory.mktemp("base")
    ok(dpface("train", *demo_args(out, "base")))
    return out / "base"


# -- 1: a diverged run never checkpoints NaN weights, nor rotates the good ones away ----
@pytest.mark.slow
def test_diverged_run_writes_no_nan_checkpoint_and_keeps_the_finite_ones(base_run, tmp_path):
    run = copy_of(base_run, tmp_path, "n")
    r = dpface("train", "--resume", "auto", *demo_args(tmp_path, "n", "train.steps=40", "train.ckpt_every=1",
                                                   "train.lr=1000000.0", "train.max_skipped_steps=30"))
    assert r.returncode == 4, r.stderr[-3000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("dpface: error:")]
    assert len(err) == 1 and "non-finite" in err[0] and "nothing was written" in err[0], r.stderr[-3000:]
    left = names(run)
    assert left and all(is_finite(run / "checkpoints" / n) for n in left), left
    assert not list((run / "checkpoints").glob("*.partial"))
    refused = int(err[0].split("refusing to save step ")[1].split(":")[0])
    assert int(left[-1][5:]) == refused - 1  # the last finite step is kept


# -- 2: a stale step-N.partial never becomes part of a later save ------------------------
@pytest.mark.slow
def test_stale_partial_save_is_not_reused(base_run, tmp_path):
    run = copy_of(base_run, tmp_path, "p")
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step-00000004")
    # What an interrupted 2-rank save of step 4 leaves, and an older one of step 3.
    for step in (3, 4):
        stale = ckpts / f"step-{step:08d}.partial"
        stale.mkdir()
        for r in (0, 1):
            shutil.copy(ckpts / "step-00000002" / "head-rank00000-of-00001.pt",
                        stale / f"head-rank{r:05d}-of-00002.pt")
            shutil.copy(ckpts / "step-00000002" / "rank00000.pt", stale / f"rank{r:05d}.pt")
    ok(dpface("train", "--resume", "auto", *demo_args(tmp_path, "p")))
    assert sorted(p.name for p in (ckpts / "step-00000004").iterdir()) == [
        "head-rank00000-of-00001.pt", "meta.json", "rank00000.pt", "trainer.pt"]
    assert not list(ckpts.glob("*.partial"))  # step 3's cleaned at start-up too
    ok(dpface("export-head", "--checkpoint", str(ckpts / "step-00000004"), "--out", str(tmp_path / "h.pt")))
    assert "steps 4->5" in ok(dpface("train", "--resume", "auto", *demo_args(tmp_path, "p", "train.steps=5"))).stdout


# -- 3: a fresh run in a used run directory is refused unless --overwrite ----------------
@pytest.mark.slow
def test_fresh_run_in_a_used_run_directory_is_refused_unless_overwrite(base_run, tmp_path):
    run = copy_of(base_run, tmp_path, "ow")
    before = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    r = dpface("train", *demo_args(tmp_path, "ow", "train.steps=2", "train.lr=0.05"))
    assert r.returncode == 2
    assert r.stderr.count("dpface: error:") == 1
    assert "already holds checkpoints" in r.stderr and "--resume auto" in r.stderr and "--overwrite" in r.stderr
    assert {p: p.read_bytes() for p in before} == before and not list((run / "checkpoints").glob("*.partial"))
    ok(dpface("train", "--overwrite", *demo_args(tmp_path, "ow", "train.steps=2", "train.lr=0.05")))
    assert names(run) == ["step-00000002"]
    meta = json.loads((run / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["config"]["train"]["lr"] == 0.05
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if x["kind"] == "train"] == [1, 2]  # the old run's rows went too
    assert "steps 2->3" in ok(dpface("train", "--resume", "auto", *demo_args(tmp_path, "ow", "train.steps=3"))).stdout


KILL_AT_COMMIT = """
import os, signal, sys
from pathlib import Path
real = os.replace
def replace(src, dst, *a, **k):
    if str(src).endswith(".partial"):  # the commit of a save: die as a preempted node would
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from dpface.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resave_of_the_last_step_killed_mid_commit_loses_nothing(base_run, tmp_path):
    """A run stopped at its last step before its final evaluation, resumed, re-saves that
    step; killed between removing the old directory and renaming the new one into place,
    the step must survive. (A run that did finish is left alone by --resume auto.)"""
    run = copy_of(base_run, tmp_path, "rs")
    (run / "final_metrics.json").unlink()  # stopped before the final evaluation
    r = subprocess.run([sys.executable, "-c", KILL_AT_COMMIT, "train", "--resume", "auto", *demo_args(tmp_path, "rs")],
                       cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "steps 4->5" in ok(dpface("train", "--resume", "auto", *demo_args(tmp_path, "rs", "train.steps=5"))).stdout
    assert names(run)[-2:] == ["step-00000004", "step-00000005"]


# -- 4: SIGTERM / SIGINT stop at a step boundary with a checkpoint -------------------------
class Proc:
    """A training process whose output is read while it runs."""

    def __init__(self, argv, extra_env=None):
        self.p = subprocess.Popen([sys.executable, "-m", "dpface", *argv], cwd=REPO,
                                  env={**base_env(), **(extra_env or {})},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout=120.0) -> None:
        end = time.monotonic() + timeout
        while text not in self.output:
            assert self.p.poll() is None and time.monotonic() < end, f"no {text!r}:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def wait(self, timeout=120.0) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_to_one_rank_stops_both_at_a_step_boundary_with_a_checkpoint(tmp_path):
    port = str(free_port())
    procs = [Proc(["train", *demo_args(tmp_path, "pre", "train.steps=100000", "train.ckpt_every=0")],
                  dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)) for r in (0, 1)]
    procs[0].wait_for("[train] step 2 ")
    procs[1].p.send_signal(signal.SIGTERM)  # one rank only: the other learns it by the all-reduce
    codes = [p.wait() for p in procs]
    assert codes == [143, 143], [p.output[-3000:] for p in procs]
    done = names(tmp_path / "pre")
    assert len(done) == 1
    step = int(done[0][5:])
    assert 2 <= step < 100
    assert f"dpface: stopped by SIGTERM at step {step}" in procs[0].output
    assert "Traceback" not in procs[0].output + procs[1].output
    assert json.loads((tmp_path / "pre" / "checkpoints" / done[0] / "meta.json").read_text())["world_size"] == 2
    # Nothing lost: one rank with the same global batch continues from that step.
    r = ok(dpface("train", "--resume", "auto",
                  *demo_args(tmp_path, "pre", f"train.steps={step + 1}", "data.batch_size=16")))
    assert f"steps {step}->{step + 1}" in r.stdout


@pytest.mark.slow
def test_sigint_saves_and_a_second_signal_exits_at_once(tmp_path):
    p = Proc(["train", *demo_args(tmp_path, "int", "train.steps=100000", "train.ckpt_every=0")])
    p.wait_for("[train] step 1 ")
    p.p.send_signal(signal.SIGINT)
    assert p.wait() == 130, p.output[-3000:]
    step = int(names(tmp_path / "int")[0][5:])
    assert f"dpface: stopped by SIGINT at step {step}" in p.output and "Traceback" not in p.output
    # Second signal: sent while the first waits for the step boundary (here: during the
    # slow evaluation before step 1), it exits at once, without writing anything.
    p = Proc(["train", *demo_args(tmp_path, "int2", "train.steps=100000", "eval.num_pairs=400",
                                  "eval.num_identities=40")])
    p.wait_for("steps 0->")
    p.p.send_signal(signal.SIGTERM)
    p.wait_for("stopping after this step")
    time.sleep(1.2)  # a second copy within a second is the launcher forwarding the same signal
    p.p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert p.wait() == -signal.SIGTERM, p.output[-3000:]
    assert time.monotonic() - t0 < 5
    assert "exiting now" in p.output
    assert names(tmp_path / "int2") == []


# -- 5: the README's torchrun line after the demo; an incompatible resume says what to do -------
@pytest.mark.slow
@pytest.mark.multiproc
def test_readme_torchrun_line_works_after_the_demo(tmp_path):
    readme = (REPO / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("launchers/torchrun.sh --nproc-per-node 2"))
    cmd = shlex.split(line.split("#")[0])
    assert cmd[cmd.index("--config") + 1] == "configs/cpu_demo.yaml"
    # The demo first (1 rank, its own run name cpu_demo), tiny-sized, then the README line.
    ok(dpface("train", *demo_args(tmp_path, "cpu_demo")))
    tiny = [f"experiment.output_dir={tmp_path}", *DEMO_TINY, "train.steps=2"]
    r = subprocess.run(["bash", *cmd, *tiny], cwd=REPO, env={**base_env(), "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world 2" in r.stdout


def test_incompatible_resume_says_what_to_do(base_run, tmp_path, capsys):
    copy_of(base_run, tmp_path, "gb")
    assert main(["train", "--resume", "auto", *demo_args(tmp_path, "gb", "train.steps=5", "data.batch_size=4")]) == 2
    err = capsys.readouterr().err
    assert "global batch 8" in err and "this run's is 4" in err
    assert "data.batch_size=8" in err and "experiment.name" in err


# -- 8: resume with another optimizer ------------------------------------------------------
def test_resume_with_another_optimizer_is_a_clear_error(base_run, tmp_path, capsys):
    copy_of(base_run, tmp_path, "opt")
    assert main(["train", "--resume", "auto",
                 *demo_args(tmp_path, "opt", "train.steps=5", "train.optimizer=adamw")]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer=sgd" in err and "adamw" in err and "experiment.name" in err


# -- 9: W&B: a resumed run continues its W&B run ---------------------------------------------
def test_resume_continues_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in dict(WANDB_DIR=tmp_path, WANDB_CONFIG_DIR=tmp_path / "cfg", WANDB_CACHE_DIR=tmp_path / "cache",
                     WANDB_SILENT="true").items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    w = ["wandb.enabled=true", "wandb.mode=offline", "train.ckpt_every=0"]
    assert main(["train", *demo_args(tmp_path, "wb", "train.steps=1", *w)]) == 0
    assert main(["train", "--resume", "auto", *demo_args(tmp_path, "wb", "train.steps=2", *w)]) == 0
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs


# -- 10: checkpoint files follow the umask (and: --resume auto with nothing to resume) --------
def test_checkpoint_and_exported_head_files_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert main(["train", "--resume", "auto",
                     *demo_args(tmp_path, "um", "train.steps=1", "train.ckpt_every=0")]) == 0
        assert "no checkpoint found, starting fresh" in capsys.readouterr().out
        ckpt = complete_checkpoints(tmp_path / "um" / "checkpoints")[-1]
        assert main(["export-head", "--checkpoint", str(ckpt), "--out", str(tmp_path / "head.pt")]) == 0
    finally:
        os.umask(old)
    files = [*ckpt.iterdir(), tmp_path / "head.pt"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o640" for f in files}
