"""Fixtures the test modules share (helpers that are plain functions: tests/helpers.py).

``shard_set`` and ``tiny_run`` are made once per session; a test that changes them
changes a copy (``helpers.copy_of``)."""
from __future__ import annotations

import pytest

from tests.helpers import demo_args


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory):
    """WebDataset shards of the synthetic faces: 10 identities, 37 images in 7 shards of
    ≤ 6; returns (directory, manifest dict)."""
    from dpface.data.formats.convert import convert_synthetic

    out = tmp_path_factory.mktemp("shard_set")
    m = convert_synthetic(str(out), num_identities=10, max_images=6, min_images=2, exponent=0.6,
                          max_shard_samples=6, num_workers=0, progress=False)
    assert len(m["shards"]) >= 5
    return out, m


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 2-step run (``helpers.demo_args``), its one checkpoint at step 2; returns
    the run directory."""
    from dpface.cli import main

    out = tmp_path_factory.mktemp("tiny_run")
    assert main(["train", *demo_args(out, "tiny", "train.steps=2")]) == 0
    return out / "tiny"


@pytest.fixture
def one_thread():
    """Toy-sized ops gain nothing from intra-op threads, and on a busy machine the thread
    pool's spinning made them ~10x slower; restored afterwards. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
