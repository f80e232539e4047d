"""The tiny training run the end-to-end tests share: the overrides once, and helpers.

``TINY_RUN`` is a small network (iresnet_tiny, width 8, 32-d embedding, CosFace) on a
12-identity synthetic set, verified on 10 held-out identities (40 pairs, 2 folds), on the
CPU, without loader workers or W&B. A test states only how its run differs:

    tiny_overrides("train.steps=4", out=tmp_path, name="x")  # an extra replaces the same key
    tiny_overrides(..., drop=("head.loss",))                  # this key keeps its default
    load_tiny(tmp_path, "x", "train.steps=4")                  # the loaded Config

Training length, schedule and checkpointing (``train.*``) are each test's own. The
helpers are plain functions, not fixtures, so that module-level constants and spawned
ranks can use them (``from tests.conftest import ...``).
"""
from __future__ import annotations

import pytest

TINY_RUN = [
    "experiment.device=cpu",
    "model={name: iresnet_tiny, base_width: 8}", "head.embedding_size=32",
    "head.loss={name: cosface, s: 16.0, m: 0.2}",
    "data.batch_size=16", "data.num_workers=0",
    "data.synthetic={num_identities: 12, max_images: 8, min_images: 4}",
    "eval.num_identities=10", "eval.num_pairs=40", "eval.folds=2",
    "wandb.enabled=false",
]
# The synthetic training and verification sets' sizes: what a run on shards leaves out.
SYNTHETIC_SETS = ("data.synthetic", "eval.num_identities", "eval.num_pairs", "eval.folds")


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def tiny_overrides(*extra: str, out=None, name: str | None = None, drop=()) -> list[str]:
    """``TINY_RUN`` less the keys in ``drop`` and those ``extra`` sets again, then
    ``extra`` (after ``experiment.output_dir``/``experiment.name`` when given). The
    resolved config is the one of ``[*TINY_RUN, *extra]`` with ``drop`` at its defaults."""
    unknown = set(drop) - {_key(o) for o in TINY_RUN}
    if unknown:
        raise KeyError(f"drop names keys TINY_RUN does not set: {sorted(unknown)}")
    replaced = {_key(o) for o in extra} | set(drop)
    head = [] if out is None else [f"experiment.output_dir={out}"]
    head += [] if name is None else [f"experiment.name={name}"]
    return [*head, *(o for o in TINY_RUN if _key(o) not in replaced), *extra]


def load_tiny(out, name: str, *extra: str, drop=()):
    """The Config of the tiny run ``name`` under ``out`` (no recipe file: the defaults)."""
    from dpface.config import load_config

    return load_config(None, tiny_overrides(*extra, out=out, name=name, drop=drop))


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
