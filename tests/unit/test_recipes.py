"""Issue 23: the recipes that state their published targets resolve against the schema, their
header's facts are the recipe's own settings, and the head memory per GPU printed in each
header is what `dpface plan` computes for it."""
import re
from pathlib import Path

import pytest

from dpface.cli import main
from dpface.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = ["ms1mv3_r100", "glint360k_r100", "wf42m_pfc02_r100", "wf42m_vit_b"]
PLAN = re.compile(r"^# plan: (\d+) GPUs x (\d+), ([\d,]+) classes -> Partial-FC head (.+) per GPU", re.M)
PUBLISHED = re.compile(r"^# published: IJB-C TAR@FAR 1e-4 (\d+\.\d\d), 1e-5 (\d+\.\d\d) on (\d+) GPUs", re.M)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_states_its_target_and_plan(name, capsys):
    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    cfg = load_config(str(path), [])
    plan, published = PLAN.search(text), PUBLISHED.search(text)
    assert plan and published, f"{path}: the header must give the published target and the plan"
    gpus, batch, classes, memory = int(plan[1]), int(plan[2]), int(plan[3].replace(",", "")), plan[4]
    assert int(published[3]) == gpus and batch == cfg.data.batch_size
    assert 95.0 < float(published[2]) < float(published[1]) < 99.0
    header = " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    assert f"{classes:,} identities" in header
    assert f"batch {cfg.data.batch_size} per GPU" in header
    assert f"{cfg.train.epochs:g} epochs" in header
    assert f"sample rate {cfg.head.sample_rate:g}" in header or (cfg.head.sample_rate == 1.0
                                                                 and "sample rate 1.0" in header)
    m = cfg.head.loss.get("m")
    assert f"m {m:g})" in header and f"s {cfg.head.loss['s']:g}" in header
    assert main(["plan", "--classes", str(classes), "--world", str(gpus), "--batch", str(batch),
                 "--sample-rate", str(cfg.head.sample_rate), "--optimizer", cfg.train.optimizer,
                 "--dim", str(cfg.head.embedding_size)]) == 0
    out = capsys.readouterr().out
    total = re.search(r"memory per rank.*?\n  total\s+(.+?)\n", out, re.S)[1]
    assert total == memory, f"{path}: the header says {memory}, dpface plan says {total}"
