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


# -- train.epochs: the alternative to train.steps -------------------------------------------
def test_a_layer_that_sets_epochs_replaces_the_steps_below_it(tmp_path):
    child = write(tmp_path, "child.yaml", {"base": str(CONFIGS / "cpu_demo.yaml"),
                                           "train": {"epochs": 3, "warmup_epochs": 0.5}})
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.epochs, cfg.train.warmup_steps, cfg.train.warmup_epochs) == (0, 3, 0, 0.5)
    back = load_config(child, ["train.steps=50"])  # and the overrides replace the recipe's epochs
    assert (back.train.steps, back.train.epochs, back.train.warmup_epochs) == (50, 0, 0.5)


@pytest.mark.parametrize("where", ["recipe", "overrides"])
def test_steps_and_epochs_in_one_layer_are_refused(tmp_path, where):
    if where == "recipe":
        args = (write(tmp_path, "r.yaml", {"train": {"steps": 10, "epochs": 2}}), [])
    else:
        args = (CONFIGS / "cpu_demo.yaml", ["train.epochs=2", "train.steps=10"])
    with pytest.raises(ConfigError, match="'train.steps' and 'train.epochs' are both set; set exactly one"):
        load_config(*args)


def test_the_run_length_from_epochs_counts_the_global_batch():
    from math import ceil

    t = load_config(CONFIGS / "cpu_demo.yaml", ["train.epochs=2.5", "train.warmup_epochs=0.25"]).train
    # 1000 images, 64 per update (batch × ranks × accumulation): ceil(2500 / 64) updates
    assert t.length(1000, 64) == (ceil(2.5 * 1000 / 64), ceil(0.25 * 1000 / 64)) == (40, 4)
    assert load_config(CONFIGS / "cpu_demo.yaml").train.length(1000, 64) == (200, 20)  # steps as set
    with pytest.raises(ConfigError, match="train.epochs needs the data set's image count"):
        t.length(None, 64)
    with pytest.raises(ConfigError, match="'train.steps' is 0 and train.epochs is not set"):
        load_config(CONFIGS / "cpu_demo.yaml", ["train.steps=0"])
