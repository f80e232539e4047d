"""Trainer: LR schedule, loss scaling, resume equivalence, and an end-to-end run."""
import json
import math

import pytest
import torch

from dpface.engine.amp import LossScaler
from dpface.engine.checkpoint import CheckpointError, complete_checkpoints
from dpface.engine.schedule import lr_at
from dpface.engine.trainer import Trainer
from tests.helpers import load_tiny, losses, tiny_cfg


def test_lr_schedule_closed_form():
    kw = dict(base_lr=0.1, total_steps=110, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(0.01)
    assert lr_at(9, **kw) == pytest.approx(0.1)
    assert lr_at(60, **kw, poly_power=2.0) == pytest.approx(0.1 * 0.5 ** 2)
    assert lr_at(60, **kw, schedule="cosine") == pytest.approx(0.05)
    assert lr_at(110, **kw) == pytest.approx(0.0)
    assert lr_at(50, **kw, schedule="constant") == 0.1


def test_loss_scaler_halves_on_overflow_and_never_reaches_zero():
    s = LossScaler(enabled=True, init_scale=8.0, growth_interval=2, min_scale=1.0)
    for _ in range(10):
        s.update(finite=False)
    assert s.scale == 1.0  # floored, not 0
    s.update(True), s.update(True)
    assert s.scale == 2.0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 4.0)
    s.unscale_([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("opt", [
    ["train.optimizer=sgd", "train.schedule=poly"],
    ["train.optimizer=adamw", "train.schedule=cosine", "train.lr=0.002"],
    # random layers: the resumed run must draw the same dropout masks as the uninterrupted one
    ["model={name: iresnet_tiny, base_width: 8, dropout: 0.3}"],
    ["model={name: mobilefacenet, width: 0.25}", "data.num_workers=1"],
])
def test_resume_continues_the_same_run(tmp_path, opt):
    """N steps, stop, resume, N steps == 2N uninterrupted steps: same losses, same weights."""
    full = Trainer(tiny_cfg(tmp_path, "full", *opt))
    full.fit()
    first = Trainer(tiny_cfg(tmp_path, "split", *opt))
    first.fit(until=3)
    assert [p.name for p in complete_checkpoints(first.ckpt_root)] == ["step-00000003"]
    second = Trainer(tiny_cfg(tmp_path, "split", *opt), resume="auto")
    assert second.state.step == 3
    second.fit()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    for (k, v), (_, w) in zip(full.backbone.state_dict().items(), second.backbone.state_dict().items()):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k
    assert torch.allclose(full.head.weight, second.head.weight, atol=1e-6)


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Trainer(tiny_cfg(tmp_path, "x"), resume=str(tmp_path / "nope"))
    t = Trainer(tiny_cfg(tmp_path, "y"))
    t.fit(until=2)
    ckpt = complete_checkpoints(t.ckpt_root)[-1]
    trainer_file = ckpt / "trainer.pt"
    trainer_file.write_bytes(trainer_file.read_bytes()[:100])  # truncated
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(CheckpointError, match="unreadable"):
        Trainer(tiny_cfg(tmp_path, "y"), resume="auto")
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing overwritten


def test_interrupted_save_is_never_resumed(tmp_path):
    t = Trainer(tiny_cfg(tmp_path, "z"))
    t.fit(until=2)
    # A save that died half-way: its directory has no meta.json and keeps the .partial name.
    (t.ckpt_root / "step-00000004.partial").mkdir()
    resumed = Trainer(tiny_cfg(tmp_path, "z"), resume="auto")
    assert resumed.state.step == 2


def test_non_finite_gradients_stop_with_a_clear_error(tmp_path):
    t = Trainer(tiny_cfg(tmp_path, "nan", "train.max_skipped_steps=3"))
    with torch.no_grad():
        t.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        t.fit()


@pytest.mark.slow
def test_training_beats_the_untrained_network(tmp_path):
    """End to end on synthetic faces: verification on held-out identities rises clearly
    above the randomly initialised network's."""
    # A larger run than the tiny one: a wider network, 40 identities, 200 pairs.
    cfg = load_tiny(tmp_path, "e2e",
                    "model={name: iresnet_tiny, base_width: 16}", "head.embedding_size=64",
                    "head.loss={name: arcface, s: 32.0, m: 0.3}", "data.batch_size=32",
                    "data.synthetic={num_identities: 40, max_images: 20, min_images: 8, exponent: 0.5}",
                    "train.steps=60", "train.warmup_steps=5", "train.log_every=20",
                    "eval.num_identities=40", "eval.num_pairs=200", drop=("eval.folds",))
    t = Trainer(cfg)
    final = t.fit()
    untrained = t.untrained["synthetic/acc"]
    assert final["synthetic/acc"] > untrained + 0.1, (untrained, final["synthetic/acc"])


def test_loss_family_options_wire_through_the_trainer(tmp_path):
    """P×K batches, hard negatives, a wrapped logit loss and weighted embedding losses
    all reach the training step from the config, and resume restores their state."""
    extra = ["data.sampler=pk", "data.pk_images=4", "head.negatives=hard", "head.sample_rate=0.5",
             "head.loss={name: km, gamma: 1.0, base: {name: cosface, s: 16.0, m: 0.2}}",
             "aux_losses=[{name: range, weight: 0.01}, {name: center, weight: 0.003}]"]
    t = Trainer(tiny_cfg(tmp_path, "family", *extra))
    images, labels = next(iter(t.stream))
    counts = torch.bincount(labels)
    assert set(counts[counts > 0].tolist()) == {4}  # 16 = 4 identities × 4 images
    t.fit(until=3)
    rows = [json.loads(l) for l in (tmp_path / "family" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "train"][-1]
    assert math.isfinite(last["loss"]) and last["aux/range"] >= 0 and last["aux/center"] > 0
    centres = t.aux_losses[1].state_dict()
    again = Trainer(tiny_cfg(tmp_path, "family", *extra), resume="auto")
    for k, v in again.aux_losses[1].state_dict().items():
        assert torch.equal(v, centres[k]), k


def test_pk_sampler_config_errors(tmp_path):
    from dpface.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of 'data.pk_images'"):
        tiny_cfg(tmp_path, "x", "data.sampler=pk", "data.pk_images=5")
    with pytest.raises(ConfigError, match="indexable"):
        tiny_cfg(tmp_path, "x", "data.sampler=pk", "data.backend=webdataset")
