"""No file a user is handed runs code when dpface reads it: a pickle whose ``__reduce__``
calls a function is planted in every load path (trainer state, per-rank state, head
shards, DeepSpeed's ZeRO states, a GCN file, a .bin set); each is refused with one error
line and the planted call never runs."""
from __future__ import annotations

import os
import pathlib
import pickle
import shutil

import pytest
import torch

from dpface.cli import main
from tests.helpers import demo_args

DEMO = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "cpu_demo.yaml")


class Payload:
    """Unpickling this calls Path.touch(marker): any code at all would have run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def plant(path: pathlib.Path, marker: pathlib.Path, torch_format: bool = True) -> None:
    """Replace ``path`` with a file that runs Payload when unpickled unsafely."""
    obj = {"state": Payload(marker), "tensor": torch.zeros(2)}
    if torch_format:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    # The payload is real: an unsafe load runs it (checked, then undone).
    torch.load(path, weights_only=False) if torch_format else pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("victim", ["trainer.pt", "rank00000.pt", "head-rank00000-of-00001.pt"])
def test_a_planted_checkpoint_file_is_refused_on_resume(tiny_run, tmp_path, capsys, victim):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints" / "step-00000002"
    assert (ckpt / victim).is_file()
    marker = tmp_path / "pwned"
    plant(ckpt / victim, marker)
    rc = main(["train", *demo_args(tmp_path, "run", "train.steps=3"), "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dpface: error: "), err
    assert victim in err[0] and ("refused to load" in err[0] or "Unsupported global" in err[0]), err
    assert not marker.exists()


def test_a_planted_checkpoint_is_refused_by_eval_and_export(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    plant(ckpt / "trainer.pt", marker)  # eval reads the backbone from it
    plant(ckpt / "head-rank00000-of-00001.pt", marker)  # export-head reads the shards
    for cmd in (["eval", "--checkpoint", str(ckpt)], ["export-head", "--checkpoint", str(ckpt),
                                                        "--out", str(tmp_path / "head.pt")]):
        rc = main(cmd)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("dpface: error: "), (cmd, err)
    assert not marker.exists()


def test_a_planted_gcn_file_is_refused(tmp_path):
    from dpface.cluster.gcn import ClusterError, load_gcn

    marker = tmp_path / "pwned"
    plant(tmp_path / "gcn.pt", marker)
    with pytest.raises(ClusterError, match="not a readable GCN file"):
        load_gcn(tmp_path / "gcn.pt")
    assert not marker.exists()


def test_a_planted_bin_set_is_refused(tmp_path):
    from dpface.eval.bin_sets import load_bin

    marker = tmp_path / "pwned"
    plant(tmp_path / "lfw.bin", marker, torch_format=False)
    with pytest.raises(ValueError, match="not a readable .bin pickle"):
        load_bin(tmp_path / "lfw.bin")
    assert not marker.exists()


def test_deepspeed_states_load_safely(tmp_path):
    """DeepSpeed's own engine loads its ZeRO states with weights_only=False; dpface's
    replacement allows tensors, containers and the DeepSpeed types those states hold."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from dpface.engine.deepspeed_backbone import _safe_checkpoint_engine
    from dpface.rundir import CheckpointError

    engine = _safe_checkpoint_engine(None)
    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "fp32": [torch.ones(3)]}
    torch.save(state, tmp_path / "ok.pt")
    back = engine.load(str(tmp_path / "ok.pt"))
    assert back["zero_stage"] == ZeroStageEnum.gradients and torch.equal(back["fp32"][0], torch.ones(3))
    assert isinstance(back["loss_scaler"], LossScaler) and back["loss_scaler"].cur_scale == 1.0
    marker = tmp_path / "pwned"
    plant(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        engine.load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.multiproc
def test_deepspeed_resume_refuses_a_planted_zero_state(tmp_path):
    """End to end: 2 ranks under ZeRO-2 write a checkpoint; a crafted optimizer-state file
    in it stops --resume auto with one error line, and the payload never runs (it did
    4 times before, once per load)."""
    pytest.importorskip("deepspeed")
    from tests.helpers import base_env, torchrun_sh

    env = base_env(tmp_path)
    torchrun_sh(tmp_path, "ds", "deepspeed.enabled=true", "deepspeed.zero_stage=2", "train.steps=2",
                env=env, timeout_s=300).check()
    zero = tmp_path / "ds" / "checkpoints" / "step-00000002" / "deepspeed" / "zero"
    marker = tmp_path / "pwned"
    for f in sorted(zero.glob("*_states.pt")):
        plant(f, marker)
    run = torchrun_sh(tmp_path, "ds", "deepspeed.enabled=true", "deepspeed.zero_stage=2", "train.steps=3",
                      env=env, timeout_s=300)
    assert run.returncode != 0
    assert "refused to load" in run.output and "dpface: error:" in run.output, run.output[-3000:]
    assert not marker.exists()
    assert os.path.isdir(zero)  # the checkpoint is still there, untouched
