"""The BatchStream protocol and the stream registry: every backend built from the config
keeps the contract; the ``data:`` section names backends and augmentations the code has."""
import typing

import pytest
import torch

from dpface.config import ConfigError, config_from_dict, load_config
from dpface.data.augment import AUGMENTS
from dpface.data.config import DataConfig
from dpface.data.streams.protocol import BatchStream
from dpface.data.streams.registry import STREAMS
from dpface.distributed import ParallelContext
from tests.helpers import assert_resumes, take

CPU = ParallelContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture
def manifest(shard_set):
    return shard_set[0] / "manifest.json"


def _data(backend, manifest):
    over = [f"data.backend={backend}", "data.batch_size=4", "data.num_workers=0",
            f"data.shards.manifest={manifest}", "data.shards.shuffle_buffer=6",
            "data.augment=[flip, crop, color]",
            "data.synthetic={num_identities: 6, max_images: 4, min_images: 3}"]
    return load_config(None, over).data


@pytest.mark.parametrize("backend", STREAMS.names())
def test_every_registered_stream_keeps_the_protocol(backend, manifest):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    data = _data(backend, manifest)
    stream = data.build(CPU, seed=7)
    assert isinstance(stream, BatchStream)
    batches = take(stream, 3)
    for x, y in batches:  # fixed-size per-rank batches in the shared image convention
        assert x.dtype == torch.uint8 and x.shape == (4, 3, 112, 112)
        assert y.dtype == torch.int64 and y.shape == (4,)
        assert 0 <= int(y.min()) and int(y.max()) < stream.num_classes
    assert stream.epoch > 0 and isinstance(stream.stats(), dict)
    # resume: a fresh stream loaded with the position after batch 1 continues with batch 2
    assert_resumes(lambda: data.build(CPU, seed=7), batches, after=1)


def test_the_protocol_checks_its_members():
    class NoStats:
        num_classes, num_images, epoch = 3, None, 0.0

        def __iter__(self):
            return iter(())

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    assert not isinstance(NoStats(), BatchStream)
    NoStats.stats = lambda self: {}
    assert isinstance(NoStats(), BatchStream)


def test_registry_names_are_the_accepted_backends():
    accepted = typing.get_args(typing.get_type_hints(DataConfig)["backend"])
    assert sorted(accepted) == STREAMS.names() == ["dali", "synthetic", "webdataset"]
    with pytest.raises(ConfigError, match="'data.backend' expects one of") as e:
        load_config(None, ["data.backend=hdf5"])
    assert all(repr(name) in str(e.value) for name in STREAMS.names())


def test_unknown_augmentation_fails_at_load(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  backend: webdataset\n  augment: [flipp]\n")
    with pytest.raises(ConfigError, match=r"'data.augment' has unknown augmentation 'flipp' "
                                          r"\(did you mean 'flip'\?\)") as e:
        load_config(recipe)
    assert str(recipe) in str(e.value) and all(name in str(e.value) for name in AUGMENTS)
    with pytest.raises(ConfigError, match="'data.augment'"):
        load_config(None, ["data.augment=flip"])  # a name, not a list
    assert load_config(None, ["data.augment=[color, flip]"]).data.augment == ["color", "flip"]


def test_the_old_webdataset_section_says_where_its_keys_went(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("data:\n  backend: webdataset\n"
                      "  webdataset: {shards: /d/manifest.json, augment: [flip]}\n")
    with pytest.raises(ConfigError, match="'data.webdataset' is no longer a section") as e:
        load_config(recipe)
    msg = str(e.value)
    assert "data.webdataset.shards → data.shards.manifest" in msg
    assert "data.webdataset.augment → data.augment" in msg
    # a checkpoint's stored config (a plain mapping) is refused the same way
    old = load_config(None).to_dict()
    old["data"]["webdataset"] = {"shards": "", "shuffle_buffer": 2000, "max_bad_fraction": 0.01}
    with pytest.raises(ConfigError, match="data.webdataset.shuffle_buffer → data.shards.shuffle_buffer"):
        config_from_dict(old, "<checkpoint>")
    with pytest.raises(ConfigError, match="'data.webdataset' is no longer"):
        load_config(None, ["data.webdataset.max_bad_fraction=0.1"])
