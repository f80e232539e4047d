"""DaliStream on the CPU: same labels/images as the webdataset path, int64 labels, resume, bad data."""
import builtins
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dpface.data.formats.convert import convert_synthetic
from dpface.data.streams.webdataset import WebDatasetStream
from tests.helpers import write_tar


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_dali")
    # 12 identities so labels ≥ 10 exist: their .cls bytes are two ASCII digits
    m = convert_synthetic(str(out), num_identities=12, max_images=3, min_images=2, exponent=0.3,
                          max_shard_samples=100, num_workers=0, progress=False)
    assert len(m["shards"]) == 1
    return out, m


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=90)
    return out.getvalue()


def take(stream, n):
    out = []
    for x, y in stream:
        out.append((x, y))
        if len(out) == n:
            break
    return out


def test_missing_dali_is_a_clear_error(monkeypatch, syn):
    from dpface.data.streams import dali as dali_stream
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("nvidia.dali"):
            raise ImportError("no DALI here")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        dali_stream.DaliStream(str(syn[0]), batch_size=4, device="cpu")


def test_dali_matches_webdataset_path(dali, syn):
    from dpface.data.streams.dali import DaliStream
    path, m = syn
    n = m["num_images"]
    ref = WebDatasetStream(str(path), batch_size=n, num_workers=0, resampled=False, augment=(),
                           shuffle_buffer=0, shuffle_shards=False)
    (x_ref, y_ref), = list(ref)
    d = DaliStream(str(path), batch_size=n, num_workers=1, shuffle_buffer=0, augment=(),
                   device="cpu")
    (x, y), = take(d, 1)
    assert y.dtype == torch.int64 and x.dtype == torch.uint8 and x.shape == x_ref.shape
    # labels are the parsed digits, not the ASCII codes (b"11" would be [49, 49])
    assert y.tolist() == y_ref.tolist()
    assert max(y.tolist()) >= 10
    diff = (x.int() - x_ref.int()).abs().float()
    assert diff.mean() < 0.5 and diff.max() <= 16  # two libjpeg builds may round IDCT apart
    assert d.stats()["samples"] == n and d.stats()["bad_samples"] == 0


def test_dali_flip_and_infinite_stream(dali, syn):
    from dpface.data.streams.dali import DaliStream
    path, m = syn
    d = DaliStream(str(path), batch_size=8, num_workers=1, shuffle_buffer=16, device="cpu",
                   augment=("flip", "crop", "color"), seed=3)
    batches = take(d, 2 * m["num_images"] // 8 + 2)  # wraps around the epoch
    assert all(x.shape == (8, 3, 112, 112) for x, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert labels.min() >= 0 and labels.max() < m["num_classes"]


def test_dali_resume_continues_the_same_stream(dali, syn):
    from dpface.data.streams.dali import DaliStream
    path, _ = syn
    kw = dict(batch_size=5, num_workers=1, shuffle_buffer=10, device="cpu", seed=11,
              augment=("flip", "crop"))
    full = take(DaliStream(str(path), **kw), 9)
    s = DaliStream(str(path), **kw)
    take(s, 4)
    state = s.state_dict()
    resumed = DaliStream(str(path), **kw)
    resumed.load_state_dict(state)
    rest = take(resumed, 5)
    for (x0, y0), (x1, y1) in zip(full[4:], rest):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    with pytest.raises(ValueError, match="different stream"):
        DaliStream(str(path), **{**kw, "seed": 12}).load_state_dict(state)


def _write(path, members):
    """A tar (as the webdataset tests write it) plus its DALI index."""
    write_tar(path, members)
    from wds2idx import IndexCreator  # DALI's own indexer, shipped with the wheel
    with IndexCreator(str(path), str(path)[:-4] + ".idx", verbose=False) as ic:
        ic.create_index()


def test_dali_bad_data(dali, tmp_path):
    from dpface.data.streams.dali import DaliStream
    pytest.importorskip("wds2idx")
    good = []
    for i in range(8):
        good += [(f"g{i}.jpg", jpeg(i)), (f"g{i}.cls", str(i % 4).encode())]
    _write(tmp_path / "a.tar", good + [("b1.jpg", jpeg(20)), ("b1.cls", b"x1"),  # bad label
                                       ("b2.jpg", jpeg(21))])                    # no label
    _write(tmp_path / "t.tar", good[:4])
    raw = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(raw[:1500])                                 # truncated
    with tarfile.open(tmp_path / "e.tar", "w"):
        pass
    (tmp_path / "e.idx").write_text("v1.2 0\n")                                  # empty
    tars = [str(tmp_path / n) for n in ("a.tar", "t.tar", "e.tar")]
    d = DaliStream(tars, batch_size=9, num_classes=4, num_workers=1, shuffle_buffer=0,
                   augment=(), device="cpu", max_bad_fraction=1.0)
    (x, y), = take(d, 1)
    assert x.shape[0] == 9 and sorted(set(y.tolist())) == [0, 1, 2, 3]  # bad label replaced
    st = d.stats()
    assert (st["bad_label"], st["missing_label"]) == (1, 1)
    assert (st["truncated_shards"], st["empty_shards"]) == (1, 1)

    # an undecodable JPEG loses its batch, training goes on
    _write(tmp_path / "c.tar", good + [("c1.jpg", b"\xff\xd8\xff broken"), ("c1.cls", b"1")])
    d = DaliStream([str(tmp_path / "c.tar")], batch_size=3, num_classes=4, num_workers=1,
                   shuffle_buffer=0, augment=(), device="cpu", max_bad_fraction=1.0)
    batches = take(d, 4)
    assert len(batches) == 4 and d.stats()["failed_batches"] >= 1
    assert d.stats()["lost_samples"] == 3 * d.stats()["failed_batches"]

    # labels outside the classifier name the sample; too much bad data stops
    _write(tmp_path / "o.tar", good[:4] + [("o1.jpg", jpeg(30)), ("o1.cls", b"9")])
    d = DaliStream([str(tmp_path / "o.tar")], batch_size=3, num_classes=4, num_workers=1,
                   shuffle_buffer=0, augment=(), device="cpu")
    with pytest.raises(ValueError, match="o1.*label 9"):
        take(d, 1)
    with pytest.raises(RuntimeError, match="too much bad data"):
        DaliStream([str(tmp_path / "a.tar")], batch_size=2, num_classes=4, device="cpu",
                   max_bad_fraction=0.05, bad_check_min_samples=5)
