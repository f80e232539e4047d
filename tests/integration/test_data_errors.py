"""A data error inside a DataLoader worker ends the process: one `dpface: error:` line, exit
3, within a bound — the workers are shut down on every error path (they ignore SIGTERM, and
the process used to hang forever at exit joining them). Also with 2 ranks under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import base_env, torchrun_sh

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 120  # the hang was unbounded; a healthy exit takes seconds


@pytest.fixture
def shards(shard_set):
    return shard_set[0]


def copy_shards(src: Path, dst: Path, *, num_classes: int | None = None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if num_classes is not None:  # labels >= num_classes are now outside the manifest's classes
        m = json.loads((dst / "manifest.json").read_text())
        m["num_classes"], m["class_counts"] = num_classes, m["class_counts"][:num_classes]
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst / "manifest.json"


def train_cmd(out: Path, manifest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dpface.cli", "train", "--config", str(REPO / "configs" / "cpu_demo.yaml"),
            f"experiment.output_dir={out}", "experiment.name=r", "data.backend=webdataset",
            f"data.shards.manifest={manifest}", "data.num_workers=1", "data.batch_size=4",
            "model={name: iresnet_tiny, base_width: 8}", "head.embedding_size=32", "eval.bin_sets=[]",
            "train.log_every=1", *extra]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("dpface: error: "), err[-3000:]
    return lines[0]


def test_label_outside_the_classes_in_a_worker_exits(shards, tmp_path):
    manifest = copy_shards(shards, tmp_path / "s", num_classes=2)
    t0 = time.monotonic()
    p = subprocess.run(train_cmd(tmp_path, manifest, "train.steps=50"), capture_output=True, text=True,
                       timeout=BOUND_S, env=base_env(tmp_path), cwd=tmp_path)
    assert p.returncode == 3, p.stderr[-3000:]
    line = one_error_line(p.stderr)
    assert "has label" in line and "outside [0, 2)" in line and "LabelError" not in line, line
    assert time.monotonic() - t0 < BOUND_S


def test_shards_overwritten_with_garbage_mid_run_exit(shards, tmp_path):
    manifest = copy_shards(shards, tmp_path / "s")
    p = subprocess.Popen(train_cmd(tmp_path, manifest, "train.steps=100000"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=base_env(tmp_path), cwd=tmp_path)
    try:
        for line in p.stdout:  # training is under way: then every shard turns to garbage
            if line.startswith("[train]"):
                break
        for tar in (tmp_path / "s").glob("*.tar"):
            tar.write_bytes(os.urandom(tar.stat().st_size))
        rc = p.wait(timeout=BOUND_S)
    finally:
        p.kill()
    err = p.stderr.read()
    assert rc == 3, err[-3000:]
    assert "shard-0000" in one_error_line(err)


@pytest.mark.multiproc
def test_one_ranks_data_error_ends_the_whole_two_rank_job(shards, tmp_path):
    manifest = copy_shards(shards, tmp_path / "s", num_classes=2)
    t0 = time.monotonic()
    run = torchrun_sh(tmp_path, "r2", "data.backend=webdataset", f"data.shards.manifest={manifest}",
                      "data.num_workers=1", "data.batch_size=4", "eval.bin_sets=[]", "train.steps=100000",
                      env=base_env(tmp_path), timeout_s=BOUND_S + 60)
    assert run.returncode != 0
    assert "dpface: error:" in run.output and "outside [0, 2)" in run.output, run.output[-3000:]
    assert time.monotonic() - t0 < BOUND_S
