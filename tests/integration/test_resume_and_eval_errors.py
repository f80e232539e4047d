"""Issue 10 leftovers: bad checkpoints, shard patterns without a manifest, divergence and
Ctrl-C with DataLoader workers end in one `dpface: error:` line (or a clean stop) with a
documented exit code, never a traceback, and nothing already saved is overwritten."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dpface.cli import main
from dpface.engine.checkpoint import complete_checkpoints
from tests.helpers import REPO, base_env, copy_of, demo_args, error_line


# -- 1: --resume <not a checkpoint> says so, as dpface eval --checkpoint does ------------
def test_resume_from_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "somedir").mkdir()
    assert main(["train", "--resume", str(tmp_path / "somedir"), *demo_args(tmp_path, "x")]) == 2
    line = error_line(capsys.readouterr().err)
    assert "not a checkpoint (no meta.json; expected …/checkpoints/step-N)" in line and "somedir" in line
    assert "interrupted" not in line
    assert main(["eval", "--checkpoint", str(tmp_path / "somedir")]) == 2
    assert error_line(capsys.readouterr().err).split("--checkpoint: ")[-1] == line.split("--resume: ")[-1]


# -- 2: a truncated head shard: one line naming the file, exit 2, nothing overwritten -------
def test_truncated_head_shard_on_resume_and_export_head(tiny_run, tmp_path, capsys):
    run = copy_of(tiny_run, tmp_path, "r")
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    shard = ckpt / "head-rank00000-of-00001.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert main(["train", "--resume", "auto", *demo_args(tmp_path, "r", "train.steps=3")]) == 2
    assert str(shard) in error_line(capsys.readouterr().err)
    out = tmp_path / "head.pt"
    out.write_bytes(b"old")
    assert main(["export-head", "--checkpoint", str(ckpt), "--out", str(out), "--force"]) == 2
    assert str(shard) in error_line(capsys.readouterr().err)
    assert out.read_bytes() == b"old"
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [ckpt.name]


# -- 3: a shard pattern without a manifest ----------------------------------------------
def test_shard_pattern_without_manifest_names_the_key(tmp_path, capsys):
    from dpface.data.formats.convert import convert_synthetic

    convert_synthetic(str(tmp_path / "wds"), num_identities=3, max_images=2, max_shard_samples=3,
                      num_workers=0, progress=False)
    tars = sorted((tmp_path / "wds").glob("*.tar"))
    assert len(tars) == 2, tars
    pattern = str(tars[0]).replace("000000.tar", "{000000..000001}.tar")
    assert main(["train", *demo_args(tmp_path, "w", "data.backend=webdataset",
                                f"data.shards.manifest={pattern}")]) == 2
    line = error_line(capsys.readouterr().err)
    assert "data.shards.manifest" in line and "manifest" in line and pattern in line


# -- 4: a signal to the whole process group reaches the DataLoader workers too -----------------
@pytest.mark.slow
def test_signal_to_the_process_group_with_dataloader_workers_saves(tmp_path):
    """Ctrl-C and SLURM's scancel signal the process group: the trainer and its data
    workers. SIGTERM is the sharp case: it used to kill the worker, and the trainer died
    of torch's "DataLoader worker is killed by signal" mid-save (exit 1, no checkpoint)."""
    p = subprocess.Popen([sys.executable, "-m", "dpface", "train",
                          *demo_args(tmp_path, "c", "train.steps=100000", "train.ckpt_every=0", "data.num_workers=1")],
                         cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    out = ""
    try:
        end = time.monotonic() + 90
        while "[train] step 1 " not in out:
            assert p.poll() is None and time.monotonic() < end, out[-3000:]
            out += p.stdout.readline()
        os.killpg(p.pid, signal.SIGTERM)
        out += p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 143, out[-3000:]
    assert "Traceback" not in out and "stopped by SIGTERM" in out, out[-3000:]
    assert len(complete_checkpoints(tmp_path / "c" / "checkpoints")) == 1


def test_data_workers_ignore_sigint_and_sigterm():
    from dpface.data.streams.map_stream import ignore_stop_signals

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in old)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- 5: N consecutive non-finite steps: exit 4 through the CLI ----------------------------
def test_consecutive_non_finite_steps_exit_4(tmp_path, capsys):
    assert main(["train", *demo_args(tmp_path, "nan", "train.steps=20", "train.ckpt_every=0",
                                "train.lr=1000000.0", "train.max_skipped_steps=2")]) == 4
    line = error_line(capsys.readouterr().err)
    assert "2 consecutive steps had non-finite gradients" in line
    assert complete_checkpoints(tmp_path / "nan" / "checkpoints") == []


# -- 6: --resume with a checkpoint of another backbone ------------------------------------
def test_resume_with_another_backbone_names_what_differs(tiny_run, tmp_path, capsys):
    copy_of(tiny_run, tmp_path, "m")
    assert main(["train", "--resume", "auto",
                 *demo_args(tmp_path, "m", "train.steps=3", "model={name: iresnet_tiny, base_width: 16}")]) == 2
    line = error_line(capsys.readouterr().err)
    assert "base_width" in line and "8" in line and "16" in line
    assert len(line) < 600  # what differs, not torch's list of every tensor


def test_bin_sets_without_pairs_of_both_kinds_or_too_few_for_the_folds(tiny_run, tmp_path, capsys):
    """An empty .bin, one whose pairs are all matches, and one with fewer pairs than folds:
    one line each, exit 2 (they were tracebacks)."""
    import numpy as np

    from dpface.eval.bin_sets import write_bin

    imgs = np.random.default_rng(0).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)
    cases = {"empty": (imgs[:0], imgs[:0], []), "one_class": (imgs[:4], imgs[4:], [True] * 4),
             "few": (imgs[:4], imgs[4:], [True, False, True, False])}
    ckpt = complete_checkpoints(tiny_run / "checkpoints")[-1]
    for name, (a, b, same) in cases.items():
        path = tmp_path / f"{name}.bin"
        write_bin(path, a, b, np.asarray(same, dtype=bool))
        assert main(["eval", "--checkpoint", str(ckpt), "--bin", str(path), "eval.folds=10"]) == 2, name
        line = error_line(capsys.readouterr().err)
        assert {"empty": "holds no pairs", "one_class": "all 4 pairs are matches",
                "few": "4 pairs cannot be split into eval.folds=10 folds"}[name] in line, line


def test_eval_without_matplotlib_says_it_skips_the_plots(tiny_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ckpt = complete_checkpoints(tiny_run / "checkpoints")[-1]
    assert main(["eval", "--checkpoint", str(ckpt)]) == 0
    assert "matplotlib not installed, no plots" in capsys.readouterr().err


def test_checkpoint_means_a_step_or_a_run_directory_everywhere(tiny_run, tmp_path, capsys):
    """--checkpoint takes a step directory or a run directory (its latest complete step) in
    eval, export-head and export-onnx as in cluster; an empty run directory says so."""
    for cmd in (["eval", "--checkpoint", str(tiny_run)],
                ["export-head", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "h.pt")]):
        assert main(cmd) == 0, cmd
    capsys.readouterr()
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert main(["eval", "--checkpoint", str(tmp_path / "empty")]) == 2
    assert "holds no complete checkpoint" in error_line(capsys.readouterr().err)
