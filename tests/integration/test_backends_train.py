"""Every data backend feeds the same trainer: synthetic faces → shards → webdataset / DALI."""
import json

import pytest

from dpface.engine.trainer import Trainer
from tests.helpers import SYNTHETIC_SETS, load_tiny


@pytest.fixture
def manifest(shard_set):
    return shard_set[0] / "manifest.json"


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_backend_trains_through_the_trainer(tmp_path, manifest, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = load_tiny(tmp_path, "b", "head.embedding_size=16", f"data.backend={backend}",
                    f"data.shards.manifest={manifest}", "data.batch_size=8", "data.num_workers=1",
                    "train.steps=4", "train.log_every=1", drop=SYNTHETIC_SETS)
    t = Trainer(cfg)
    assert t.head.num_classes == json.loads(manifest.read_text())["num_classes"] == 10
    t.fit()
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # Integer labels reached the head: the loss moves (a constant loss is the symptom of
    # labels read as raw bytes / floats) and is finite.
    losses = [r["loss"] for r in train]
    assert all(l == l and l < 1e3 for l in losses) and len(set(losses)) > 1
    assert train[-1]["data/samples"] >= 32 and train[-1]["data/bad_samples"] == 0
