"""`train.init_from`: a new run starts from a trained backbone (a new head of any size),
records where it came from, freezes the backbone for its first steps and then trains it at
the scaled rate; a resume continues the fine-tuning run itself; bad sources are one line."""
from __future__ import annotations

import json

import pytest
import torch

from dpface.cli import main
from dpface.config import load_config
from dpface.engine.checkpoint import complete_checkpoints
from dpface.engine.trainer import Trainer
from dpface.rundir import read_meta
from tests.helpers import demo_args, error_line, load_tiny, losses

NEW_IDS = "data.synthetic={num_identities: 7, max_images: 8, min_images: 4, seed: 3}"


def source_backbone(run_dir):
    ckpt = complete_checkpoints(run_dir / "checkpoints")[-1]
    return ckpt, torch.load(ckpt / "trainer.pt", weights_only=True)["backbone"]


def test_a_run_directory_gives_its_backbone_a_new_head_and_is_recorded(tiny_run, tmp_path, capsys):
    ckpt, src = source_backbone(tiny_run)
    assert main(["train", *demo_args(tmp_path, "ft", f"train.init_from={tiny_run}", NEW_IDS, "train.steps=1",
                                     "train.freeze_backbone_steps=1")]) == 0
    out = capsys.readouterr().out
    assert f"init_from {ckpt.resolve()} (dpface checkpoint, step 2): backbone tensors loaded {len(src)}, new 0, " \
           "dropped 0; head: new (7 classes)" in out
    mine, got = source_backbone(tmp_path / "ft")
    # One frozen step: weights and BatchNorm statistics are the source's, bit for bit.
    assert all(torch.equal(got[k], src[k]) for k in src)
    meta = read_meta(mine)
    assert meta["num_classes"] == 7
    rec = meta["init_from"]
    assert (rec["path"], rec["step"], rec["kind"], rec["head"]) == (str(ckpt.resolve()), 2, "dpface checkpoint", "new")
    src_card = json.loads((tiny_run / "model_card.json").read_text())
    assert rec["data_hash"] == src_card["data"]["hash"]  # the data the source was trained on
    card = (tmp_path / "ft" / "MODEL_CARD.md").read_text()
    assert f"started from: `{ckpt.resolve()}` (dpface checkpoint, step 2" in card


def test_frozen_steps_leave_the_backbone_then_it_learns_at_the_scaled_rate(tiny_run, tmp_path):
    cfg = load_tiny(tmp_path, "fz", f"train.init_from={tiny_run}", "train.freeze_backbone_steps=1",
                    "train.backbone_lr_scale=0.25", "train.warmup_steps=0", "train.steps=3")
    tr = Trainer(cfg)
    try:
        it = iter(tr.stream)
        before = {k: v.clone() for k, v in tr.backbone.state_dict().items()}
        head_before = tr.head.weight.detach().clone()
        tr.train_step(next(it))  # step 0: frozen
        after = tr.backbone.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), "a frozen step changed the backbone"
        assert not torch.equal(tr.head.weight, head_before)
        assert not tr.backbone.training  # BatchNorm in eval mode while frozen
        m = tr.train_step(next(it))  # step 1: learns
        assert tr.backbone.training
        assert any(not torch.equal(tr.backbone.state_dict()[k], before[k]) for k in before)
        assert tr.parallel.param_groups[0]["lr"] == pytest.approx(0.25 * m["lr"])
        assert tr.head_opt.param_groups[0]["lr"] == pytest.approx(m["lr"])
    finally:
        tr.release()
        tr.logger.close()


def test_a_resumed_fine_tuning_run_continues_itself(tiny_run, tmp_path, capsys):
    common = (f"train.init_from={tiny_run}", NEW_IDS, "train.ckpt_every=1")
    assert main(["train", *demo_args(tmp_path, "whole", *common, "train.steps=3")]) == 0
    args = demo_args(tmp_path, "split", *common, "train.steps=3")
    tr = Trainer(load_config(args[1], args[2:]))
    tr.fit(until=2)  # stopped after step 2, checkpointed, as a preempted run
    tr.release()
    capsys.readouterr()
    assert main(["train", "--resume", "auto", *args]) == 0
    assert "init_from" not in capsys.readouterr().out  # nothing is loaded from the source again
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert split[3] == pytest.approx(whole[3], rel=1e-6)  # not re-initialised from the source
    last = complete_checkpoints(tmp_path / "split" / "checkpoints")[-1]
    assert read_meta(last)["init_from"]["step"] == 2  # the record survives the resume


@pytest.mark.parametrize("extra, words", [
    (("model={name: iresnet18, base_width: 8}",), ["holds a iresnet_tiny backbone", "model is iresnet18"]),
    (("head.embedding_size=16",), ["'fc.weight' has shape [32,", "in the file but [16,"]),
    (("train.init_head=true", NEW_IDS), ["init_head", "12 classes", "this run's 7"]),
])
def test_a_source_that_does_not_fit_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys, extra, words):
    assert main(["train", *demo_args(tmp_path, "bad", f"train.init_from={tiny_run}", *extra)]) == 2
    line = error_line(capsys.readouterr().err)
    assert all(w in line for w in words) and str(tiny_run) in line, line
    assert not (tmp_path / "bad").exists()  # nothing written, not even the run directory


def test_a_file_that_is_not_weights_is_one_line(tmp_path, capsys):
    junk = tmp_path / "backbone.pth"
    junk.write_bytes(b"not a torch file at all")
    assert main(["train", *demo_args(tmp_path, "junk", f"train.init_from={junk}")]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"dpface: error: train.init_from: {junk}: not a torch checkpoint or state dict"), line
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3, "note": "no tensors"}, empty)
    assert main(["train", *demo_args(tmp_path, "junk", f"train.init_from={empty}")]) == 2
    line = error_line(capsys.readouterr().err)
    assert "train.init_from" in line and "not a state dict" in line and str(empty) in line, line


# -- distillation ----------------------------------------------------------------------------
def distill(teacher, kind="cosine"):
    return f"aux_losses=[{{name: distill, teacher: {teacher}, kind: {kind}, weight: 2.0}}]"


def test_a_distilled_student_trains_and_resumes_and_the_teacher_file_is_untouched(tiny_run, tmp_path, capsys):
    ckpt, _ = source_backbone(tiny_run)
    stamp = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    args = demo_args(tmp_path, "st", "model={name: iresnet_tiny, base_width: 8}", "head.embedding_size=16",
                     distill(tiny_run), "train.steps=3", "train.ckpt_every=1")
    tr = Trainer(load_config(args[1], args[2:]))
    tr.fit(until=2)
    tr.release()
    out = capsys.readouterr().out
    assert f"distill teacher {ckpt.resolve()} (iresnet_tiny, 32-d" in out and "ms per batch of 8" in out
    assert main(["train", "--resume", "auto", *args]) == 0
    whole = demo_args(tmp_path, "whole", *args[4:])
    assert main(["train", *whole]) == 0
    a, b = losses(tmp_path / "st"), losses(tmp_path / "whole")
    assert a[3] == pytest.approx(b[3], rel=1e-6)  # the projection and its optimizer resume too
    rows = [json.loads(x) for x in (tmp_path / "st" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux/distill"] > 0 for r in rows if r["kind"] == "train")
    assert stamp == {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}


def test_a_teacher_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    junk = tmp_path / "teacher.pt"
    junk.write_text("hello")
    assert main(["train", *demo_args(tmp_path, "t", distill(junk))]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"dpface: error: aux_losses[0].teacher: {junk}: not a torch checkpoint"), line
    assert not (tmp_path / "t").exists()
