"""W&B: offline runs record the logged keys with no network; failures never stop training."""
import pytest

from dpface.engine.logging import MetricsLogger
from dpface.config import WandbConfig


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path


def test_offline_run_contains_logged_keys(wandb_env, capsys):
    run_dir = wandb_env / "run"
    log = MetricsLogger(run_dir, True, WandbConfig(enabled=True, mode="offline", name="t", tags=["x"]),
                        config={"train": {"lr": 0.1}})
    log.log(1, {"loss": 2.5, "acc": 0.25})
    log.log(1, {"synthetic/acc": 0.9}, prefix="eval")
    log.close()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].rglob("*.wandb"))
    for key in (b"train/loss", b"train/acc", b"eval/synthetic/acc"):
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
