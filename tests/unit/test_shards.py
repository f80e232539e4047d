"""Shard writer, DALI index files, manifest, converters (folder, RecordIO, synthetic), resume."""
import io
import json
import os
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from dpface.data.formats import shards as sh
from dpface.data.formats.convert import convert_image_folder, convert_recordio, convert_synthetic
from dpface.data.formats.recordio import (
    MAGIC,
    InsightFaceRecord,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    pack,
    unpack,
    write_insightface_rec,
)


def jpeg(seed: int, size=(112, 112), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format=fmt, quality=90)
    return out.getvalue()


# -- writer + index ------------------------------------------------------------------
def test_writer_index_offsets_point_at_member_bytes(tmp_path):
    data = {i: (jpeg(i), i % 3) for i in range(7)}
    with sh.ShardWriter(str(tmp_path), max_shard_samples=4) as w:
        for i, (img, label) in data.items():
            w.write(sh.sample_key(i), img, label, meta={"i": i} if i % 2 else None)
    assert [s.samples for s in w.finished] == [4, 3]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(sh.TMP_SUFFIX)]
    for info in w.finished:
        raw = (tmp_path / info.name).read_bytes()
        lines = (tmp_path / info.index).read_text().splitlines()
        assert lines[0] == f"v1.2 {info.samples}"
        index = sh.read_index(str(tmp_path / info.index))
        for line, comps in zip(lines[1:], index):
            tok = line.split()
            key = tok[3].split(".")[0]
            img, label = data[int(key)]
            # the wds2idx layout: ext, data offset, size, member name — per component
            assert tok[0::4] == (["jpg", "cls", "json"] if int(key) % 2 else ["jpg", "cls"])
            off, size = comps["jpg"]
            assert raw[off:off + size] == img
            off, size = comps["cls"]
            assert raw[off:off + size] == str(label).encode()
        assert sh.scan_shard(str(tmp_path / info.name)).samples == info.samples
    # the tar is a valid archive that tarfile reads back
    with tarfile.open(tmp_path / "shard-000000.tar") as t:
        assert t.getnames()[:2] == ["0000000000.jpg", "0000000000.cls"]


def test_writer_respects_byte_limit(tmp_path):
    imgs = [jpeg(i) for i in range(6)]
    limit = 3 * (len(imgs[0]) + 3 * 512)
    with sh.ShardWriter(str(tmp_path), max_shard_bytes=limit) as w:
        for i, img in enumerate(imgs):
            w.write(sh.sample_key(i), img, 0)
    assert len(w.finished) >= 2
    assert all(s.bytes <= limit for s in w.finished)
    assert sum(s.samples for s in w.finished) == 6
    with pytest.raises(ValueError, match="must not contain"):
        sh.ShardWriter(str(tmp_path / "x")).write("a.b", imgs[0], 0)


def test_scan_shard_detects_truncation(tmp_path):
    with sh.ShardWriter(str(tmp_path)) as w:
        for i in range(3):
            w.write(sh.sample_key(i), jpeg(i), i)
    path = tmp_path / "shard-000000.tar"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(sh.ShardError):
        sh.scan_shard(str(path))


# -- image folder ----------------------------------------------------------------------
def make_image_folder(root, per_class=(3, 2, 4)):
    """Folders c0, c1, c2 (labels 0, 1, 2); c1 holds a PNG of another size, c2 a corrupt
    file and a non-image; returns {relative path: label} of the images that should survive."""
    expected = {}
    for c, n in enumerate(per_class):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for k in range(n):
            (d / f"img{k}.jpg").write_bytes(jpeg(100 * c + k))
            expected[f"c{c}/img{k}.jpg"] = c
    (root / "c1" / "odd.png").write_bytes(jpeg(999, size=(90, 120), fmt="PNG"))
    expected["c1/odd.png"] = 1
    (root / "c2" / "broken.jpg").write_bytes(jpeg(5)[:200])
    (root / "c2" / "notes.txt").write_text("not an image")
    return expected


def test_convert_image_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    expected = make_image_folder(src)
    m = convert_image_folder(str(src), str(out), max_shard_samples=4, num_workers=2,
                             progress=False)
    assert m["num_classes"] == 3
    assert m["num_images"] == len(expected) == 10
    assert m["class_counts"] == [3, 3, 4]
    assert m["skipped_source_samples"] == 1  # broken.jpg
    assert [s["samples"] for s in m["shards"]] == [4, 4, 2]
    assert m["image_size"] == 112 and m["params"]["quality"] == 95
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["shards"] == m["shards"]
    for s in m["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"]
    # pass-through of right-sized JPEGs, re-encode (to 112²) of the rest; labels + metadata
    seen = {}
    for s in m["shards"]:
        with tarfile.open(out / s["name"]) as t:
            members = {n: t.extractfile(n).read() for n in t.getnames()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name.split(".")[0]
                rel = json.loads(data)["src"]
                seen[rel] = int(members[key + ".cls"])
                img = members[key + ".jpg"]
                if rel.endswith(".jpg"):
                    assert img == (src / rel).read_bytes()
                else:
                    assert Image.open(io.BytesIO(img)).size == (112, 112)
    assert seen == expected


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_image_folder(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no identity sub-folders"):
        convert_image_folder(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)


# -- RecordIO --------------------------------------------------------------------------
def test_recordio_split_records_round_trip(tmp_path):
    magic = struct.pack("<I", MAGIC)
    records = [b"", b"abc", magic, b"xxxx" + magic + b"yyyy" + magic + b"z",
               magic + magic, b"12" + magic + b"34"]  # the last one's magic is unaligned
    rec = tmp_path / "a.rec"
    with RecordIOWriter(str(rec), str(tmp_path / "a.idx")) as w:
        offsets = [w.write(r, key=i) for i, r in enumerate(records)]
    raw = rec.read_bytes()
    assert len(raw) % 4 == 0
    # record 3 is stored in three parts: cflag 1, 2, 3
    flags = []
    pos = offsets[3]
    while True:
        m, lrec = struct.unpack_from("<II", raw, pos)
        assert m == MAGIC
        flags.append(lrec >> 29)
        pos += 8 + (((lrec & ((1 << 29) - 1)) + 3) & ~3)
        if flags[-1] in (0, 3):
            break
    assert flags == [1, 2, 3]
    with RecordIOReader(str(rec)) as r:
        assert list(r) == records
        assert r.read_at(offsets[4]) == records[4]
    lines = (tmp_path / "a.idx").read_text().splitlines()
    assert lines[2] == f"2\t{offsets[2]}"


def test_irheader_pack_unpack():
    h, label, payload = unpack(pack(IRHeader(0, 7.0, 5, 0), b"img"))
    assert (h.flag, label, h.id, payload) == (0, 7.0, 5, b"img")
    h, label, payload = unpack(pack(IRHeader(0, 0.0, 0, 0), b"", labels=[3, 9]))
    assert h.flag == 2 and list(label) == [3.0, 9.0] and payload == b""
    assert len(pack(IRHeader(0, 1.0, 0, 0), b"")) == 24  # struct IfQQ


@pytest.mark.parametrize("with_header", [True, False])
def test_convert_recordio(tmp_path, with_header):
    samples = [(label, jpeg(10 * label + k))
               for label, n in enumerate([2, 3, 1, 2]) for k in range(n)]
    # an image of another size is re-encoded; one payload is undecodable
    samples.append((3, jpeg(77, size=(64, 64))))
    samples.append((0, b"\xff\xd8\xff garbage"))
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    write_insightface_rec(rec, idx, samples, num_classes=5 if with_header else 4,
                          with_header=with_header)
    r = InsightFaceRecord(rec)
    assert r.num_images == len(samples)
    assert r.num_classes == (5 if with_header else None)
    m = convert_recordio(rec, str(tmp_path / "out"), max_shard_samples=3, num_workers=0,
                         progress=False)
    assert m["num_classes"] == (5 if with_header else 4)  # class 4 has no images
    assert m["class_counts"][:4] == [2, 3, 1, 3]
    assert m["num_images"] == 9 and m["skipped_source_samples"] == 1
    labels = []
    for s in m["shards"]:
        labels += sh.scan_shard(str(tmp_path / "out" / s["name"])).labels
    assert labels == [0, 0, 1, 1, 1, 2, 3, 3, 3]  # key order = grouped by identity


def test_recordio_rejects_bad_magic(tmp_path):
    rec = tmp_path / "bad.rec"
    rec.write_bytes(b"\0" * 16)
    (tmp_path / "bad.idx").write_text("0\t0\n")
    with pytest.raises(RuntimeError, match="bad magic"):
        InsightFaceRecord(str(rec))


# -- synthetic + resume ------------------------------------------------------------------
SYN = dict(num_identities=8, max_images=4, min_images=2, exponent=0.7, max_shard_samples=5,
           num_workers=0, progress=False)


def _shard_bytes(out):
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.startswith("shard-")}


def test_convert_synthetic_and_resume(tmp_path):
    from dpface.data.synthetic.faces import SyntheticFaceDataset
    out = tmp_path / "syn"
    m = convert_synthetic(str(out), **SYN)
    ds = SyntheticFaceDataset(8, max_images=4, min_images=2, exponent=0.7)
    assert m["num_images"] == len(ds) and m["class_counts"] == ds.counts.tolist()
    full = _shard_bytes(out)
    n_shards = len(m["shards"])
    assert n_shards >= 3

    # finished: a rerun is a no-op
    assert convert_synthetic(str(out), **SYN)["created"] == m["created"]

    # interrupted: manifest never written, last shard lost, a half-written temp left behind
    os.remove(out / "manifest.json")
    last = m["shards"][-1]
    os.remove(out / last["name"])
    (out / (sh.shard_name("shard", n_shards) + ".tar" + sh.TMP_SUFFIX)).write_bytes(b"partial")
    kept_mtime = (out / m["shards"][0]["name"]).stat().st_mtime_ns
    m2 = convert_synthetic(str(out), **SYN)
    assert {k: v for k, v in m2.items() if k != "created"} == \
        {k: v for k, v in m.items() if k != "created"}
    assert _shard_bytes(out) == full
    assert (out / m["shards"][0]["name"]).stat().st_mtime_ns == kept_mtime  # not rewritten

    # a shard cut short (disk trouble): it and everything after it are redone
    mid = out / m["shards"][1]["name"]
    mid.write_bytes(mid.read_bytes()[:3000])
    os.remove(out / "manifest.json")
    convert_synthetic(str(out), **SYN)
    assert _shard_bytes(out) == full


def test_convert_refuses_other_parameters(tmp_path):
    out = str(tmp_path / "syn")
    convert_synthetic(out, **SYN)
    with pytest.raises(ValueError, match="other parameters.*quality"):
        convert_synthetic(out, **{**SYN, "quality": 80})
    m = convert_synthetic(out, **{**SYN, "quality": 80}, overwrite=True)
    assert m["params"]["quality"] == 80


def test_manifest_checks(tmp_path):
    out = tmp_path / "syn"
    convert_synthetic(str(out), **SYN)
    s = sh.resolve_shards(str(out))
    assert len(s.tars) == len(s.indexes) and s.num_classes == 8
    with pytest.raises(ValueError, match="smaller than the manifest"):
        sh.resolve_shards(str(out), num_classes=4)
    os.remove(s.tars[-1])
    with pytest.raises(FileNotFoundError, match="missing"):
        sh.resolve_shards(str(out / "manifest.json"))
    with pytest.raises(FileNotFoundError):
        sh.resolve_shards(str(tmp_path / "nowhere" / "manifest.json"))
    with pytest.raises(ValueError, match="empty shard list"):
        sh.resolve_shards([], num_classes=3)
    with pytest.raises(ValueError, match="num_classes is required"):
        sh.resolve_shards(s.tars[:1])


def test_recordio_index_must_hold_announced_images(tmp_path):
    rec, idx = str(tmp_path / "train.rec"), tmp_path / "train.idx"
    write_insightface_rec(rec, str(idx), [(0, jpeg(1)), (1, jpeg(2))], num_classes=2)
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # drop image record 2
    with pytest.raises(RuntimeError, match="lacks 1 image record"):
        InsightFaceRecord(rec)
