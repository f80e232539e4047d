"""W&B: offline runs record the logged keys with no network; failures never stop training."""
import json
import time

import pytest

from dpface.config import WandbConfig
from dpface.engine.logging import MetricsLogger
from tests.helpers import load_tiny


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path


def offline_blob(run_dir, keys, timeout_s=30.0) -> bytes:
    """The offline run's .wandb bytes once they hold ``keys``. wandb's service process
    writes the file; on a loaded machine the records can land after finish() returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        blob = b"".join(p.read_bytes() for p in runs[0].rglob("*.wandb"))
        if all(k in blob for k in keys) or time.monotonic() > deadline:
            return blob
        time.sleep(0.2)


def test_offline_run_contains_logged_keys(wandb_env, capsys):
    run_dir = wandb_env / "run"
    log = MetricsLogger(run_dir, True, WandbConfig(enabled=True, mode="offline", name="t", tags=["x"]),
                        config={"train": {"lr": 0.1}})
    log.log(1, {"loss": 2.5, "acc": 0.25})
    log.log(1, {"synthetic/acc": 0.9}, prefix="eval")
    log.close()
    keys = (b"train/loss", b"train/acc", b"eval/synthetic/acc")
    blob = offline_blob(run_dir, keys)
    for key in keys:
        assert key in blob
    assert "[train] step 1 loss=2.5000 acc=0.2500" in capsys.readouterr().out


def test_disabled_mode_writes_nothing(wandb_env):
    run_dir = wandb_env / "run"
    log = MetricsLogger(run_dir, True, WandbConfig(enabled=True, mode="disabled"))
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (run_dir / "wandb").exists()
    assert (run_dir / "metrics.jsonl").read_text().count("loss") == 1


def test_wandb_failure_never_stops_training(wandb_env, monkeypatch):
    import wandb

    def boom(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(UserWarning, match="W&B disabled: RuntimeError: no network"):
        log = MetricsLogger(wandb_env / "run", True, WandbConfig(enabled=True))
    log.log(1, {"loss": 1.0})  # still logs to stdout and JSONL
    log.close()
    assert (wandb_env / "run" / "metrics.jsonl").is_file()


def test_trainer_logs_memory_and_roc_to_an_offline_run(wandb_env):
    """The trainer's extra W&B content: per-rank peak memory (reduced to rank 0) with the
    training scalars, and the ROC curve of each evaluation set as a W&B line chart."""
    from dpface.engine.trainer import Trainer

    cfg = load_tiny(wandb_env, "w", "model={name: iresnet_tiny, base_width: 16}", "head.embedding_size=16",
                    "data.batch_size=8", "train.steps=2", "train.log_every=1",
                    "wandb.enabled=true", "wandb.mode=offline", "wandb.name=mem-roc",
                    drop=("head.loss",))  # the default loss
    Trainer(cfg).fit()
    keys = (b"train/mem/rss_peak_mb_max", b"train/mem/rss_peak_mb_mean", b"train/grad_norm",
            b"train/skipped", b"eval/synthetic/acc", b"roc/synthetic")
    blob = offline_blob(wandb_env / "w", keys)
    for key in keys:
        assert key in blob, key
    tables = list((wandb_env / "w" / "wandb").rglob("roc/synthetic*.table.json"))
    assert tables, "the ROC chart's table was not written"
    data = json.loads(tables[0].read_text())
    assert data["columns"] == ["far", "tar"] and len(data["data"]) >= 2
