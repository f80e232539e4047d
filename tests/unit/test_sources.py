"""Several data sets at once (data.sources, streams/mixed.py): exact mixing counts, disjoint
label ranges, resume mid-epoch, a changed manifest refused with the source named, and the
bad inputs of the section."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dpface.config import load_config
from dpface.data.formats.convert import convert_synthetic
from dpface.data.streams.mixed import split_batch
from dpface.data.streams.position import PositionError
from dpface.distributed import ParallelContext
from dpface.schema import ConfigError
from tests.helpers import assert_resumes, take

CPU = ParallelContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def second_set(tmp_path_factory):
    """4 identities, 15 images: the second source (the first is conftest's shard set)."""
    out = tmp_path_factory.mktemp("second")
    convert_synthetic(str(out), num_identities=4, identity_offset=50, max_images=5, min_images=3,
                      max_shard_samples=6, num_workers=0, progress=False)
    return out


def data(a, b, wa=0.75, wb=0.25, batch=8, backend="webdataset"):
    return load_config(None, [f"data.backend={backend}", f"data.batch_size={batch}", "data.num_workers=0",
                              f"data.sources=[{{manifest: {a}, weight: {wa}}}, {{manifest: {b}, weight: {wb}}}]",
                              "data.shards.shuffle_buffer=6"]).data


def test_split_batch_is_the_largest_remainder_and_names_a_source_left_out():
    assert split_batch(8, [0.75, 0.25]) == [6, 2]
    assert split_batch(10, [1, 1, 1]) == [4, 3, 3]  # ties go to the earlier source
    assert split_batch(7, [0.7, 0.3, 0.0]) == [5, 2, 0]
    with pytest.raises(ValueError, match=r"data.sources\[1\]: weight 0.01 of 1.01 gives it no image"):
        split_batch(8, [1.0, 0.01])


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_every_batch_mixes_by_weight_and_labels_never_collide(shard_set, second_set, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    a, ma = shard_set
    mb = json.loads((second_set / "manifest.json").read_text())
    stream = data(a, second_set, backend=backend).build(CPU, seed=3)
    assert stream.num_classes == ma["num_classes"] + mb["num_classes"]
    assert stream.num_images == ma["num_images"] + mb["num_images"]
    n = 10 * mb["num_images"] // 2  # ten passes over B (2 of its images a batch), ~3 over A
    seen_a, seen_b = torch.zeros(ma["num_classes"]), torch.zeros(mb["num_classes"])
    for x, y in take(stream, n):
        assert x.shape == (8, 3, 112, 112) and y.shape == (8,)
        in_a = y < ma["num_classes"]
        assert int(in_a.sum()) == 6  # sample by sample: 6 of A and 2 of B in every batch
        seen_a += torch.bincount(y[in_a], minlength=ma["num_classes"])
        seen_b += torch.bincount(y[~in_a] - ma["num_classes"], minlength=mb["num_classes"])
    assert int(seen_a.sum()) == 6 * n and int(seen_b.sum()) == 2 * n
    # B's labels are B's own classes shifted past A's: its class frequencies follow its manifest
    counts_b = torch.tensor(mb["class_counts"], dtype=torch.float)
    assert torch.corrcoef(torch.stack([seen_b, counts_b]))[0, 1] > 0.5


def test_resume_mid_epoch_equals_the_uninterrupted_stream(shard_set, second_set):
    d = data(shard_set[0], second_set)
    assert_resumes(lambda: d.build(CPU, seed=5), take(d.build(CPU, seed=5), 6), after=3)


def test_a_source_whose_manifest_changed_is_refused_by_name(shard_set, second_set, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(second_set, b)
    first = data(shard_set[0], b).build(CPU, seed=5)
    take(first, 2)
    state = first.state_dict()
    m = json.loads((b / "manifest.json").read_text())
    m["params"] = {**m.get("params", {}), "note": "re-converted"}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PositionError, match=rf"source1 \({b}\): its manifest changed since the checkpoint"):
        data(shard_set[0], b).build(CPU, seed=5).load_state_dict(state)


@pytest.mark.parametrize("over, words", [
    (["data.backend=synthetic", "data.sources=[{manifest: a, weight: 1}]"], "mix shard data sets"),
    (["data.backend=webdataset", "data.sources=[{manifest: a, weight: 0}, {manifest: b, weight: 0}]"],
     "weights must sum to a positive number"),
    (["data.backend=webdataset", "data.sources=[{manifest: a, weight: -1}]"], r"'data.sources\[0\].weight' must be"),
    (["data.backend=webdataset", "data.sources=[{path: a}]"], r"'data.sources\[0\]' must be \{manifest"),
    (["data.backend=webdataset", "data.shards.manifest=m", "data.sources=[{manifest: a}]"],
     "replace data.shards.manifest"),
])
def test_bad_sources_are_config_errors_naming_the_key(over, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, over)


def test_a_source_with_no_images_is_named_with_its_file(shard_set, second_set, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    m = json.loads((second_set / "manifest.json").read_text())
    m.update(num_classes=0, num_images=0, class_counts=[], shards=[])
    (empty / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match=rf"data.sources\[1\]: .*{empty}"):
        data(shard_set[0], empty).build(CPU, seed=0)


def _keys(batch):
    import hashlib

    x, y = batch
    return sorted(f"{int(label)}:{hashlib.sha1(img.numpy().tobytes()).hexdigest()}" for img, label in zip(x, y))


def _steps(a, b, world, batch, n, state=None):
    """Global batches (sorted label:image keys) of ``n`` steps of ``world`` simulated ranks,
    and the merged position after them (what rank 0's checkpoint file holds)."""
    from dpface.data.streams.webdataset import merge_states

    d = data(a, b, batch=batch)
    ranks = [d.build(ParallelContext(rank=r, world_size=world, local_rank=r, device=torch.device("cpu")), seed=3)
             for r in range(world)]
    if state is not None:
        for s in ranks:
            s.load_state_dict(state)
    per = [take(s, n) for s in ranks]
    steps = [sorted(sum((_keys(per[r][i]) for r in range(world)), [])) for i in range(n)]
    states = [s.state_dict() for s in ranks]
    merged = {**states[0], "sources": [{**src, "state": merge_states([st["sources"][i]["state"] for st in states])}
                                       for i, src in enumerate(states[0]["sources"])]}
    return steps, merged


def test_each_sources_position_reshards_at_a_constant_global_batch(shard_set, second_set):
    """2 ranks × 4 (3 of A + 1 of B each) for 3 steps, then 1 rank × 8 (6 + 2): the global
    batches are those of an uninterrupted 2-rank run, sample by sample, labels included."""
    whole, _ = _steps(shard_set[0], second_set, 2, 4, n=7)
    first, state = _steps(shard_set[0], second_set, 2, 4, n=3)
    second, _ = _steps(shard_set[0], second_set, 1, 8, n=4, state=state)
    assert first + second == whole
