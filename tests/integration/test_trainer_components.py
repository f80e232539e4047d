"""The newer components reached from a config through the real trainer: gradient
accumulation (resume mid-run), the qan backbone with its set loss, sub-centre ArcFace,
lazy AdamW for sampled rows, and the errors a resume under another optimizer gives."""
from __future__ import annotations

import json

import pytest
import torch

from dpface.engine.checkpoint import CheckpointError, complete_checkpoints
from dpface.engine.trainer import Trainer
from tests.helpers import load_tiny


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _cfg(tmp_path, name, *extra):
    return load_tiny(tmp_path, name, "train.steps=4", "train.log_every=1", "train.lr=0.05",
                     "data.batch_size=8", *extra)


def test_accumulation_resumes_mid_run_like_an_uninterrupted_run(tmp_path):
    """Checkpoints fall on update boundaries and the data position counts micro-batches:
    2 updates, stop, resume, 2 more == 4 uninterrupted updates of 2 micro-batches."""
    full = Trainer(_cfg(tmp_path, "full", "train.accumulate=2"))
    full.fit()
    first = Trainer(_cfg(tmp_path, "split", "train.accumulate=2"))
    first.fit(until=2)
    second = Trainer(_cfg(tmp_path, "split", "train.accumulate=2"), resume="auto")
    assert second.state.step == 2
    second.fit()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    for (k, v), (_, w) in zip(full.backbone.state_dict().items(), second.backbone.state_dict().items()):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k
    # the position: 4 updates × 2 micro-batches consumed (batches of the map stream)
    assert full.stream.state_dict() == second.stream.state_dict()


def test_qan_backbone_trains_its_quality_branch_with_the_set_loss(tmp_path):
    cfg = _cfg(tmp_path, "qan", "model={name: qan, base: {name: iresnet_tiny, base_width: 8}, hidden: 8}",
               "data.sampler=pk", "data.pk_images=4",
               "aux_losses=[{name: qan_set, weight: 1.0, set_size: 2}]", "train.steps=2")
    t = Trainer(cfg)
    before = {k: v.clone() for k, v in t.backbone.quality.state_dict().items()}
    t.fit()
    after = t.backbone.quality.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the branch learned
    saved = torch.load(complete_checkpoints(t.ckpt_root)[-1] / "trainer.pt", weights_only=True)
    assert any(k.startswith("quality.") for k in saved["backbone"])


def test_set_loss_without_a_quality_branch_is_a_clear_error(tmp_path):
    from dpface.schema import ConfigError

    with pytest.raises(ConfigError, match="no quality branch"):
        Trainer(_cfg(tmp_path, "noq", "data.sampler=pk", "aux_losses=[{name: qan_set, weight: 1.0}]"))


def test_subcenter_head_from_the_config(tmp_path):
    t = Trainer(_cfg(tmp_path, "sub", "head.subcenters=3", "head.drop_after=1", "train.steps=2"))
    assert t.head.weight.shape[0] == 3 * t.head.num_classes
    assert t.head_kernel.startswith("PyTorch reference (subcenters=3")  # the fused op cannot take the max
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "sub" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    assert "head/dropped" not in train[1]  # step 0 < drop_after: the drop is not active yet
    assert 0.0 <= train[2]["head/dropped"] <= 1.0  # from step 1 on it is, and is logged
    shard = torch.load(next((complete_checkpoints(t.ckpt_root)[-1]).glob("head-rank*.pt")), weights_only=True)
    assert shard["rows"]["weight"].shape[0] == 3 * t.head.num_classes


def test_lazy_adamw_for_sampled_rows_and_optimizer_change_on_resume(tmp_path):
    extra = ("head.update=sampled", "head.sample_rate=0.5", "train.optimizer=adamw", "train.lr=0.01")
    t = Trainer(_cfg(tmp_path, "adam", *extra, "train.steps=2"))
    assert type(t.head_opt).__name__ == "SampledRowAdamW"
    t.fit()
    sgd = Trainer(_cfg(tmp_path, "sgd", "head.update=sampled", "head.sample_rate=0.5", "train.steps=2"))
    sgd.fit()
    ckpt = complete_checkpoints(sgd.ckpt_root)[-1]
    files = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    with pytest.raises(CheckpointError, match="train.optimizer=sgd"):
        Trainer(_cfg(tmp_path, "sgd", *extra, "train.steps=4"), resume="auto")
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == files  # nothing rewritten
