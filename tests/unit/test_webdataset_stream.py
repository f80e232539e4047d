"""WebDatasetStream: exact-once epochs, node/worker split, resampling, resume, bad data."""
import collections
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dpface.data.formats import shards as sh
from dpface.data.formats.convert import convert_image_folder
from dpface.data.streams.webdataset import WebDatasetStream, _Config, shards_for
from tests.helpers import write_tar


def jpeg(seed: int, size=112) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=90)
    return out.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def digest(img: torch.Tensor) -> str:
    return hashlib.sha1(img.numpy().tobytes()).hexdigest()


def drain(stream, limit=None):
    out = []
    for i, (x, y) in enumerate(stream):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape[0] == y.shape[0]
        out.append((x, y))
        if limit is not None and i + 1 == limit:
            break
    return out


@pytest.fixture
def syn(shard_set):
    """conftest's shard set: 7 shards of ≤ 6 synthetic faces, 10 identities, 37 images."""
    return shard_set


def all_images(path, **kw):
    """digest → label over one exact pass (1 rank, 1 worker, no augmentation)."""
    s = WebDatasetStream(str(path), batch_size=5, num_workers=0, resampled=False, augment=(),
                         **kw)
    got = {}
    for x, y in s:
        for img, label in zip(x, y.tolist()):
            assert digest(img) not in got
            got[digest(img)] = label
    return got


def test_image_folder_round_trip_exactly_once(tmp_path):
    src = tmp_path / "src"
    truth = {}
    for c in range(4):
        (src / f"id{c:02d}").mkdir(parents=True)
        for k in range(3 + c):
            data = jpeg(10 * c + k)
            (src / f"id{c:02d}" / f"{k}.jpg").write_bytes(data)
            truth[hashlib.sha1(decode(data).tobytes()).hexdigest()] = c
    m = convert_image_folder(str(src), str(tmp_path / "out"), max_shard_samples=4,
                             num_workers=0, progress=False)
    for epoch in range(2):  # the same stream object, two epochs
        stream = WebDatasetStream(str(tmp_path / "out"), batch_size=3, num_workers=2,
                                  resampled=False, augment=(), seed=epoch)
        seen = collections.Counter()
        labels = {}
        for x, y in drain(stream):
            for img, label in zip(x, y.tolist()):
                seen[digest(img)] += 1
                labels[digest(img)] = label
        assert set(seen.values()) == {1} and len(seen) == m["num_images"] == 18
        assert labels == truth
    assert stream.num_classes == 4
    assert stream.stats()["samples"] == 18 and stream.stats()["bad_samples"] == 0


def test_epochs_differ_but_cover(syn):
    path, m = syn
    s = WebDatasetStream(str(path), batch_size=4, num_workers=0, resampled=False, augment=())
    e0 = [y for _, y in s]
    e1 = [y for _, y in s]
    assert sorted(torch.cat(e0).tolist()) == sorted(torch.cat(e1).tolist())
    assert len(torch.cat(e0)) == m["num_images"]
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1))  # reshuffled per epoch


def test_node_and_worker_split_covers_all_once(syn):
    path, m = syn
    truth = all_images(path)
    got = collections.Counter()
    per_rank = []
    for rank in range(2):
        s = WebDatasetStream(str(path), batch_size=4, rank=rank, world_size=2, num_workers=2,
                             resampled=False, augment=(), shuffle_buffer=8)
        n = 0
        for x, y in s:
            for img, label in zip(x, y.tolist()):
                got[digest(img)] += 1
                assert truth[digest(img)] == label
                n += 1
        per_rank.append(n)
    assert set(got.values()) == {1} and set(got) == set(truth)
    assert all(n > 0 for n in per_rank)


def test_resampled_slots_never_starve():
    cfg = _Config(tars=["a", "b"], slots=6, resampled=True, shuffle_shards=True, seed=3)
    reads = collections.Counter()
    for slot in range(6):
        for r in range(5):
            got = shards_for(cfg, slot, r)
            assert len(got) == 1  # ceil(2/6): every round of every slot has a shard
            reads.update(got)
    assert reads == {0: 15, 1: 15}  # 30 reads = 15 passes over the 2 shards
    # 4 slots over 8 shards: each epoch's 8 shards are spread over the slots, none twice
    cfg = _Config(tars=list(range(8)), slots=4, resampled=True, shuffle_shards=True, seed=1)
    for r in range(3):
        epoch = [s for slot in range(4) for s in shards_for(cfg, slot, r)]
        assert sorted(epoch) == list(range(8))


def test_resampled_more_slots_than_shards_every_rank_gets_full_batches(tmp_path):
    with sh.ShardWriter(str(tmp_path)) as w:
        for i in range(5):
            w.write(sh.sample_key(i), jpeg(i), i % 2)
    tars = [str(tmp_path / "shard-000000.tar")]
    for rank in range(2):
        s = WebDatasetStream(tars, batch_size=4, rank=rank, world_size=2, num_workers=2,
                             num_classes=2, shuffle_buffer=3)
        batches = drain(s, limit=6)
        assert [len(y) for _, y in batches] == [4] * 6


def test_deterministic_from_seed(syn):
    path, _ = syn
    kw = dict(batch_size=4, num_workers=2, augment=("flip", "crop", "color"), shuffle_buffer=10)
    a = drain(WebDatasetStream(str(path), seed=1, **kw), limit=6)
    b = drain(WebDatasetStream(str(path), seed=1, **kw), limit=6)
    c = drain(WebDatasetStream(str(path), seed=2, **kw), limit=6)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


@pytest.mark.parametrize("resampled,workers,first",
                         [(True, 2, 5), (True, 2, 11), (False, 2, 3), (True, 0, 4)])
def test_resume_continues_the_same_stream(syn, resampled, workers, first):
    path, _ = syn
    kw = dict(batch_size=4, num_workers=workers, seed=7, resampled=resampled, shuffle_buffer=10,
              augment=("flip", "crop", "color"))
    total = 9 if not resampled else 14
    full = drain(WebDatasetStream(str(path), **kw), limit=total)
    total = len(full)
    s = WebDatasetStream(str(path), **kw)
    drain(s, limit=first)
    state = json.loads(json.dumps(s.state_dict()))  # plain data: survives JSON
    assert state["batches"] == first
    resumed = WebDatasetStream(str(path), **kw)
    resumed.load_state_dict(state)
    rest = drain(resumed, limit=total - first)
    assert len(rest) == total - first
    for (x0, y0), (x1, y1) in zip(full[first:], rest):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    with pytest.raises(ValueError, match="different stream"):
        WebDatasetStream(str(path), **{**kw, "batch_size": 3}).load_state_dict(state)


# -- bad data --------------------------------------------------------------------------
@pytest.fixture
def bad_shards(tmp_path):
    good = [(f"{i:04d}", jpeg(i), str(i % 3).encode()) for i in range(12)]
    members = []
    for key, img, cls in good[:6]:
        members += [(f"{key}.jpg", img), (f"{key}.cls", cls)]
    members += [("b001.jpg", jpeg(50)[:300]), ("b001.cls", b"1"),       # truncated JPEG
                ("b002.jpg", b"not a jpeg at all"), ("b002.cls", b"2"),  # corrupt JPEG
                ("b003.jpg", jpeg(51)),                                  # missing label
                ("b004.jpg", jpeg(52)), ("b004.cls", b"one"),            # non-integer label
                ("b005.cls", b"0")]                                      # missing image
    write_tar(tmp_path / "a.tar", members)
    members = []
    for key, img, cls in good[6:]:
        members += [(f"{key}.jpg", img), (f"{key}.cls", cls)]
    write_tar(tmp_path / "b.tar", members)
    raw = (tmp_path / "b.tar").read_bytes()
    cut = raw.index(b"0009.jpg") + 512 + 100  # inside sample 9's JPEG: 6, 7, 8 survive
    (tmp_path / "b.tar").write_bytes(raw[:cut])
    write_tar(tmp_path / "c.tar", [])  # empty shard
    return [str(tmp_path / n) for n in ("a.tar", "b.tar", "c.tar")]


def test_bad_samples_are_skipped_and_counted(bad_shards):
    s = WebDatasetStream(bad_shards, batch_size=3, num_workers=0, num_classes=3,
                         resampled=False, augment=(), max_bad_fraction=1.0)
    labels = sorted(torch.cat([y for _, y in s]).tolist())
    assert labels == sorted(i % 3 for i in range(9))
    st = s.stats()
    assert st["samples"] == 9
    counts = (st["bad_image"], st["missing_label"], st["bad_label"], st["missing_image"])
    assert counts == (2, 1, 1, 1)
    assert st["bad_samples"] == 5
    assert st["truncated_shards"] == 1 and st["empty_shards"] == 1


def test_too_much_bad_data_is_an_error(bad_shards):
    s = WebDatasetStream(bad_shards[:1], batch_size=2, num_workers=0, num_classes=3,
                         resampled=False, max_bad_fraction=0.2, bad_check_min_samples=5,
                         shuffle_shards=False, shuffle_buffer=0)
    with pytest.raises(RuntimeError, match="too much bad data"):
        drain(s)


def test_label_outside_classes_names_the_sample(tmp_path):
    write_tar(tmp_path / "x.tar", [("k1.jpg", jpeg(1)), ("k1.cls", b"0"),
                                   ("k2.jpg", jpeg(2)), ("k2.cls", b"7")])
    s = WebDatasetStream([str(tmp_path / "x.tar")], batch_size=1, num_workers=0,
                         num_classes=5, resampled=False)
    with pytest.raises(ValueError, match="'k2'.*label 7"):
        drain(s)


def test_errors_before_iteration(syn, tmp_path):
    path, _ = syn
    with pytest.raises(FileNotFoundError):
        WebDatasetStream(str(tmp_path / "missing"), batch_size=2)
    with pytest.raises(FileNotFoundError):
        WebDatasetStream([str(tmp_path / "missing.tar")], batch_size=2, num_classes=3)
    with pytest.raises(ValueError, match="empty shard list"):
        WebDatasetStream([], batch_size=2, num_classes=3)
    with pytest.raises(ValueError, match="smaller than the manifest"):
        WebDatasetStream(str(path), batch_size=2, num_classes=3)
    with pytest.raises(ValueError, match="unknown augmentation"):
        WebDatasetStream(str(path), batch_size=2, augment=("rotate",))
    with pytest.raises(ValueError, match="rank"):
        WebDatasetStream(str(path), batch_size=2, rank=2, world_size=2)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_lean_tar_reader_agrees_with_tarfile(tmp_path, fmt):
    from dpface.data.streams.webdataset import TarFormatError, iter_tar_members
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60
    members = [(f"{long_dir}/k1.jpg", b"x" * 700), (f"{long_dir}/k1.cls", b"3"),
               ("k2.jpg", b""), ("k2.json", b"{}")]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as t:
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)  # non-file entries are skipped
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        got = [(m["fname"], m["data"]) for m in iter_tar_members(f)]
    assert got == members
    with open(path, "rb") as f:
        assert [m["fname"] for m in iter_tar_members(f, keep={"cls"})] == [members[1][0]]
    raw = path.read_bytes()
    end = (len(raw.rstrip(b"\0")) + 511) // 512 * 512
    path.write_bytes(raw[:end])  # cut right after the last member: no end-of-archive block
    with open(path, "rb") as f, pytest.raises(TarFormatError):
        list(iter_tar_members(f))


def test_resume_does_not_recount_bad_shards(bad_shards):
    kw = dict(batch_size=2, num_workers=0, num_classes=3, max_bad_fraction=1.0, augment=(),
              shuffle_buffer=4, seed=5)
    whole = WebDatasetStream(bad_shards, **kw)
    drain(whole, limit=8)  # crosses into the second round (9 good samples per round)
    s = WebDatasetStream(bad_shards, **kw)
    drain(s, limit=3)
    resumed = WebDatasetStream(bad_shards, **kw)
    resumed.load_state_dict(s.state_dict())
    drain(resumed, limit=5)
    assert resumed.stats() == whole.stats()
    assert whole.stats()["truncated_shards"] >= 1 and whole.stats()["empty_shards"] >= 1
