"""MXNet RecordIO (``train.rec`` + ``train.idx``) as used by insightface, without MXNet.

Written from the format's specification (dmlc-core recordio + mxnet.recordio):

* A record on disk is ``uint32 magic 0xced7230a``, ``uint32 lrec``, data, zero padding to
  a multiple of 4 bytes. ``lrec`` = ``cflag << 29 | length``. A logical record whose data
  contains the magic word at a 4-aligned position is split there: the magic bytes are
  dropped and the pieces are written as parts with cflag 1 (first), 2 (middle), 3 (last);
  cflag 0 is an unsplit record. A reader re-joins the parts with the magic in between.
* ``train.idx`` is text, one ``key<TAB>byte offset of the record`` per line.
* A record's payload starts with ``IRHeader`` = struct ``<IfQQ`` (flag, label, id, id2).
  flag > 0 means ``flag`` float32 labels follow the header (and ``label`` is 0);
  then come the image bytes.
* insightface: record 0 is a header whose label array is ``[first identity key,
  end identity key]``; image records are keys 1 … first−1; identity records (keys
  first … end−1) hold ``[first image key, end image key)`` of one identity. Older
  files without that header (flag 0) list image records only.
"""
from __future__ import annotations

import os
import struct
from typing import Iterator, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


class RecordIOError(RuntimeError):
    """A .rec/.idx file is malformed."""


class IRHeader(NamedTuple):
    flag: int
    label: float
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes, labels=None) -> bytes:
    """Record payload: header (+ float32 label array when ``labels`` is given) + bytes."""
    if labels is not None:
        arr = np.asarray(labels, dtype=np.float32).ravel()
        header = header._replace(flag=len(arr), label=0.0)
        return _IR.pack(*header) + arr.tobytes() + payload
    return _IR.pack(header.flag, float(header.label), header.id, header.id2) + payload


def unpack(record: bytes) -> tuple[IRHeader, np.ndarray | float, bytes]:
    """(header, label — float or float32 array when flag > 0, remaining bytes)."""
    if len(record) < _IR.size:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than its IRHeader")
    header = IRHeader(*_IR.unpack_from(record))
    rest = record[_IR.size:]
    if header.flag > 0:
        n = header.flag * 4
        if len(rest) < n:
            raise RecordIOError(f"record header announces {header.flag} labels, "
                                f"only {len(rest)} bytes follow")
        return header, np.frombuffer(rest[:n], dtype=np.float32).copy(), rest[n:]
    return header, header.label, rest


class RecordIOReader:
    """Reads logical records by byte offset (``read_at``) or in file order (iteration)."""

    def __init__(self, rec_path: str):
        if not os.path.exists(rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {rec_path}")
        self.path = rec_path
        self._f = open(rec_path, "rb", buffering=1 << 20)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_part(self) -> tuple[int, bytes] | None:
        pos = self._f.tell()
        head = self._f.read(_LREC.size)
        if not head:
            return None
        if len(head) < _LREC.size:
            raise RecordIOError(f"{self.path}: truncated record header at byte {pos}")
        magic, lrec = _LREC.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"{self.path}: bad magic {magic:#x} at byte {pos} "
                                f"(expected {MAGIC:#x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        padded = (length + 3) & ~3
        data = self._f.read(padded)
        if len(data) < padded:
            raise RecordIOError(f"{self.path}: record at byte {pos} is truncated")
        return cflag, data[:length]

    def read_next(self) -> bytes | None:
        """The next logical record from the current position (None at end of file)."""
        first = self._read_part()
        if first is None:
            return None
        cflag, data = first
        if cflag == 0:
            return data
        if cflag != 1:
            raise RecordIOError(f"{self.path}: record continuation (cflag {cflag}) "
                                "without a start")
        pieces = [data]
        while True:
            part = self._read_part()
            if part is None:
                raise RecordIOError(f"{self.path}: split record ends at end of file")
            cflag, data = part
            if cflag not in (2, 3):
                raise RecordIOError(f"{self.path}: split record interrupted (cflag {cflag})")
            pieces.append(data)
            if cflag == 3:
                return _MAGIC_BYTES.join(pieces)

    def read_at(self, offset: int) -> bytes:
        self._f.seek(offset)
        rec = self.read_next()
        if rec is None:
            raise RecordIOError(f"{self.path}: no record at byte {offset} (past end of file)")
        return rec

    def __iter__(self) -> Iterator[bytes]:
        self._f.seek(0)
        while (rec := self.read_next()) is not None:
            yield rec


class RecordIOWriter:
    """Writes records (and an index when ``idx_path`` is given). Used by tests and tools."""

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self._f = open(rec_path, "wb")
        self._idx = open(idx_path, "w") if idx_path else None

    def write(self, record: bytes, key: int | None = None) -> int:
        """Append one logical record; returns its byte offset."""
        if len(record) >= 1 << 29:
            raise ValueError(f"record of {len(record)} bytes exceeds the 2^29-byte limit")
        offset = self._f.tell()
        start = 0
        aligned_end = len(record) & ~3
        for i in range(0, aligned_end, 4):
            if record[i:i + 4] == _MAGIC_BYTES:
                self._f.write(_LREC.pack(MAGIC, (1 if start == 0 else 2) << 29 | (i - start)))
                self._f.write(record[start:i])
                start = i + 4
        tail = len(record) - start
        self._f.write(_LREC.pack(MAGIC, (3 if start else 0) << 29 | tail))
        self._f.write(record[start:])
        self._f.write(b"\0" * (((tail + 3) & ~3) - tail))
        if self._idx is not None:
            if key is None:
                raise ValueError("an indexed writer needs a key for every record")
            self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def close(self) -> None:
        self._f.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_idx(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) as int64 arrays sorted by key (16 bytes per record in memory)."""
    if not os.path.exists(idx_path):
        raise FileNotFoundError(f"RecordIO index not found: {idx_path}")
    keys, offsets = [], []
    with open(idx_path) as f:
        for n, line in enumerate(f, 1):
            tok = line.split()
            if not tok:
                continue
            if len(tok) != 2:
                raise RecordIOError(f"{idx_path}:{n}: expected 'key<TAB>offset', got {line!r}")
            keys.append(int(tok[0]))
            offsets.append(int(tok[1]))
    k = np.asarray(keys, dtype=np.int64)
    o = np.asarray(offsets, dtype=np.int64)
    order = np.argsort(k, kind="stable")
    return k[order], o[order]


def _scalar_label(label) -> float:
    return float(label[0]) if isinstance(label, np.ndarray) else float(label)


class InsightFaceRecord:
    """An insightface ``train.rec``/``train.idx`` pair: image keys, labels and identity count.

    ``num_classes`` comes from the identity records when the header has them, else it is
    None until :meth:`scan_labels` (one pass over headers) has run.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        if idx_path is None:
            idx_path = os.path.splitext(rec_path)[0] + ".idx"
        self.rec_path, self.idx_path = rec_path, idx_path
        self.keys, self.offsets = read_idx(idx_path)
        if len(self.keys) == 0 or self.keys[0] != 0:
            raise RecordIOError(f"{idx_path} has no record 0 (the insightface header)")
        with RecordIOReader(rec_path) as r:
            header, label, _ = unpack(r.read_at(int(self.offsets[0])))
        if header.flag > 0:
            lo, hi = int(label[0]), int(label[1])
            self.image_keys = np.arange(1, lo, dtype=np.int64)
            self.identity_keys = np.arange(lo, hi, dtype=np.int64)
            self.num_classes: int | None = hi - lo
        else:  # no header record: every record is an image
            self.image_keys = self.keys
            self.identity_keys = np.zeros(0, dtype=np.int64)
            self.num_classes = None
        # Offsets of the image records, in key order (arrays, not a dict: 16 bytes per
        # image instead of ~100 for millions of records).
        where = np.minimum(np.searchsorted(self.keys, self.image_keys), len(self.keys) - 1)
        absent = self.image_keys[self.keys[where] != self.image_keys]
        if len(absent):
            raise RecordIOError(f"{idx_path} lacks {len(absent)} image record(s) the header "
                                f"announces, e.g. key {int(absent[0])}")
        self._image_offsets = self.offsets[where]

    @property
    def num_images(self) -> int:
        return len(self.image_keys)

    def iter_images(self, start: int = 0) -> Iterator[tuple[int, int, bytes]]:
        """(position, label, image bytes) for image positions start, start+1, … in key order."""
        with RecordIOReader(self.rec_path) as r:
            for pos in range(start, len(self.image_keys)):
                _, label, payload = unpack(r.read_at(int(self._image_offsets[pos])))
                yield pos, int(round(_scalar_label(label))), payload

    def scan_labels(self) -> int:
        """Number of classes = max label + 1 (reads every header once); sets num_classes."""
        top = -1
        for _, label, _ in self.iter_images():
            top = max(top, label)
        self.num_classes = top + 1
        return self.num_classes


def write_insightface_rec(rec_path: str, idx_path: str, samples, num_classes: int,
                          with_header: bool = True) -> None:
    """Write (label, image bytes) samples, grouped by label, as insightface does (tests/tools)."""
    samples = sorted(samples, key=lambda s: s[0])
    n = len(samples)
    with RecordIOWriter(rec_path, idx_path) as w:
        if with_header:
            w.write(pack(IRHeader(0, 0.0, 0, 0), b"", labels=[n + 1, n + 1 + num_classes]), key=0)
            first = 1
        else:
            first = 0
        ranges = {}
        for i, (label, image) in enumerate(samples):
            key = first + i
            lo, hi = ranges.get(label, (key, key))
            ranges[label] = (lo, key + 1)
            w.write(pack(IRHeader(0, float(label), key, 0), image), key=key)
        if with_header:
            for c in range(num_classes):
                lo, hi = ranges.get(c, (0, 0))
                w.write(pack(IRHeader(0, 0.0, n + 1 + c, 0), b"", labels=[lo, hi]), key=n + 1 + c)
