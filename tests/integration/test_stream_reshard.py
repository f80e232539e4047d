"""Issue 10 items 6 and 7: a shard stream's position reshards at a constant global batch
(no sample skipped or repeated), and lost shards are counted, named and limited."""
import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from dpface.data.streams.webdataset import WebDatasetStream, merge_states
from tests.helpers import take


@pytest.fixture
def syn(shard_set):
    return str(shard_set[0])


KW = dict(augment=("flip",), shuffle_buffer=5, seed=3)  # augmentation on: draws must align too


def keys(batch):
    return sorted(hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in batch[0])


def steps_at(path, world, batch, workers, n, slots, state=None):
    """Global batches (sorted sample keys) of ``n`` steps at ``world`` ranks, and the
    merged position after them (what rank 0's checkpoint file holds)."""
    ranks = [WebDatasetStream(path, batch_size=batch, rank=r, world_size=world,
                              num_workers=workers, virtual_slots=slots, **KW) for r in range(world)]
    if state is not None:
        for s in ranks:
            s.load_state_dict(state)
    per_rank = [take(s, n) for s in ranks]
    steps = [sorted(sum((keys(per_rank[r][i]) for r in range(world)), [])) for i in range(n)]
    return steps, merge_states([s.state_dict() for s in ranks])


@pytest.mark.parametrize("before, after", [((2, 4, 1), (1, 8, 2)), ((1, 8, 2), (2, 4, 0))])
def test_position_reshards_at_constant_global_batch(syn, before, after):
    """(world, per-rank batch, workers) before and after the resume: the global batches
    are those of an uninterrupted run, sample by sample (the data set is 37 images, so
    12 steps of 8 run through more than two epochs)."""
    whole, _ = steps_at(syn, *before, n=12, slots=4)
    first, state = steps_at(syn, *before, n=5, slots=4)
    second, _ = steps_at(syn, *after, n=7, slots=4, state=state)
    assert first + second == whole


def test_other_global_batch_or_indivisible_slots_are_refused(syn):
    _, state = steps_at(syn, 2, 4, 1, n=2, slots=2)
    s = WebDatasetStream(syn, batch_size=8, rank=0, world_size=2, **KW)
    with pytest.raises(ValueError, match="global batch 8.*16"):
        s.load_state_dict(state)
    s = WebDatasetStream(syn, batch_size=2, rank=0, world_size=4, **KW)
    with pytest.raises(ValueError, match="2 virtual slots.*4 ranks"):
        s.load_state_dict(state)
    one = WebDatasetStream(syn, batch_size=4, rank=0, world_size=2, virtual_slots=2, **KW)
    take(one, 1)
    s = WebDatasetStream(syn, batch_size=8, rank=0, world_size=1, **KW)
    with pytest.raises(ValueError, match="holds slot.*0.*needs.*0, 1"):
        s.load_state_dict(one.state_dict())  # rank 0's own part only: not enough for 1 rank


# -- 7: lost shards ----------------------------------------------------------------------
def jpeg(seed):
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (112, 112, 3), np.uint8)).save(
        out, format="JPEG")
    return out.getvalue()


def write_tar(path, n, start=0):
    with tarfile.open(path, "w") as t:
        for i in range(start, start + n):
            for ext, data in (("jpg", jpeg(i)), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def test_lost_shards_are_counted_named_and_limited(tmp_path):
    write_tar(tmp_path / "a.tar", 10)
    write_tar(tmp_path / "b.tar", 10, start=10)
    raw = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(raw[: len(raw) // 5])  # most of b lost
    (tmp_path / "c.tar").write_bytes(b"")  # 0 bytes
    tars = [str(tmp_path / n) for n in ("a.tar", "b.tar", "c.tar")]
    s = WebDatasetStream(tars, batch_size=2, num_workers=0, num_classes=3, resampled=False,
                         augment=(), max_bad_fraction=1.0)
    n = sum(len(y) for _, y in s)
    st = s.stats()
    assert st["empty_shards"] == 1 and st["truncated_shards"] == 1  # 0 bytes is empty, not truncated
    assert st["bad_shards"] == 2 and st["lost_samples"] > 0
    assert n + st["lost_samples"] >= 20  # lost = estimated from the intact shards' size
    with pytest.raises(RuntimeError, match="too much bad data.*lost.*shard"):
        list(WebDatasetStream(tars, batch_size=2, num_workers=0, num_classes=3, resampled=False,
                              augment=(), bad_check_min_samples=5, shuffle_shards=False))


def test_console_line_shows_lost_shards_and_samples():
    from dpface.engine.logging import _on_console
    assert _on_console("data/bad_samples") and _on_console("data/bad_shards")
    assert _on_console("data/lost_samples") and not _on_console("data/truncated_shards")


# -- through the trainer: a 2-rank checkpoint resumes on 1 rank -------------------------------
def _cfg(out, shards, batch):
    from tests.helpers import SYNTHETIC_SETS, load_tiny
    return load_tiny(out, "wds", "experiment.seed=3",  # = KW: the reference stream below
                     "head.embedding_size=16", "data.backend=webdataset",
                     f"data.shards.manifest={shards}", "data.shards.shuffle_buffer=5",
                     f"data.batch_size={batch}", "train.steps=3", "train.log_every=1",
                     drop=SYNTHETIC_SETS)


def _two_ranks(rank, world, out, shards):
    from dpface.engine.trainer import Trainer
    t = Trainer(_cfg(out, shards, 4))
    t.fit()
    return t.stream.state_dict()


@pytest.mark.multiproc
def test_trainer_resumes_a_two_rank_shard_stream_on_one_rank(syn, tmp_path):
    from dpface.engine.trainer import Trainer
    from tests.helpers import run_distributed
    saved = run_distributed(_two_ranks, 2, tmp_path, str(tmp_path), syn, timeout_s=180)
    assert saved[0] == saved[1] and sorted(saved[0]["positions"]) == ["0", "1"]  # gathered
    t = Trainer(_cfg(str(tmp_path), syn, 8), resume="auto")  # 1 rank × 8 = 2 × 4
    assert t.state.step == 3
    assert {**t.stream.state_dict(), "world_size": 2} == saved[0]  # the same global position
    it = iter(t.stream)
    x, _ = next(it)
    nxt, _ = steps_at(syn, 2, 4, 1, n=4, slots=2, state=None)
    assert keys((x, None)) == nxt[3]  # the 4th global batch of an uninterrupted 2-rank stream
