"""Config schema: recipes, inheritance, overrides and the errors users see."""
from pathlib import Path

import pytest
import yaml

from dpface.config import Config, ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    assert isinstance(load_config(CONFIGS / recipe), Config)


def test_demo_derives_from_base():
    cfg = load_config(CONFIGS / "cpu_demo.yaml")
    assert cfg.train.momentum == 0.9  # from base.yaml
    assert cfg.model == {"name": "iresnet_tiny"}  # spec replaced whole, not merged with base's
    assert cfg.head.loss == {"name": "arcface", "s": 32.0, "m": 0.4}


def test_unknown_key_suggests_closest_and_names_file(tmp_path):
    p = write(tmp_path, "r.yaml", {"train": {"warmup_step": 10, "lr": 0.1}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "r.yaml" in msg and "train.warmup_step" in msg and "did you mean 'warmup_steps'" in msg
    with pytest.raises(ConfigError, match="unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, "s.yaml", {"trian": {}}))


def test_wrong_type_and_range(tmp_path):
    with pytest.raises(ConfigError, match="'train.steps' expects int, got str 'many'"):
        load_config(write(tmp_path, "a.yaml", {"train": {"steps": "many"}}))
    with pytest.raises(ConfigError, match="'train.steps' expects int, got float"):
        load_config(None, ["train.steps=1.5"])
    with pytest.raises(ConfigError, match="'head.sample_rate' must be in \\(0, 1\\]"):
        load_config(None, ["head.sample_rate=1.5"])
    with pytest.raises(ConfigError, match="'data.backend' expects one of"):
        load_config(None, ["data.backend=hdf5"])
    with pytest.raises(ConfigError, match="'train.amp' expects"):
        load_config(None, ["train.amp=true"])  # YAML bool is not a mode


def test_int_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_dotted_overrides_and_spec_params():
    cfg = load_config(CONFIGS / "cpu_demo.yaml",
                      ["train.lr=0.05", "head.loss.s=16", "data.synthetic.num_identities=50"])
    assert cfg.train.lr == 0.05
    assert cfg.head.loss == {"name": "arcface", "s": 16, "m": 0.4}
    assert cfg.data.synthetic.num_identities == 50


def test_spec_errors_list_valid_choices():
    with pytest.raises(ConfigError, match="head.loss.*unknown loss 'arcfac'.*did you mean 'arcface'"):
        load_config(None, ["head.loss={name: arcfac}"])
    with pytest.raises(ConfigError, match="head.loss.*no parameter 'margin'.*valid: easy_margin, m, s"):
        load_config(None, ["head.loss={name: arcface, margin: 0.5}"])
    with pytest.raises(ConfigError, match="model.*unknown backbone"):
        load_config(None, ["model={name: resnet9000}"])
    with pytest.raises(ConfigError, match="embedding_size"):
        load_config(None, ["model={name: iresnet18, embedding_size: 64}"])  # set by head.embedding_size


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])


def test_base_loop_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", {"base": "b.yaml"})
    write(tmp_path, "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "cpu_demo.yaml", ["train.lr=0.02"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
