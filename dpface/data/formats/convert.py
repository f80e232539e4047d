"""Converters to WebDataset shards: image folder, insightface RecordIO, synthetic faces.

All three share one engine (:func:`_convert`):

* Samples are enumerated in a fixed order (their *index*, which becomes the tar key).
* Worker processes prepare the JPEG bytes of chunks of samples; results come back in
  order (a bounded window of chunks in flight, so memory stays constant however large
  the data set) and the main process streams them into :class:`~dpface.data.shards.ShardWriter`.
* JPEG policy: a source image that already is a JPEG of ``image_size``² (RGB or grey) is
  passed through byte for byte after a full trial decode (shards then never hold an
  image a reader cannot decode — DALI fails a whole batch on one); anything else is
  decoded, converted to RGB, centre-cropped to a square, resized (bicubic) to
  ``image_size``² and encoded at ``quality``. Undecodable source images are skipped
  and counted (``skipped_source_samples`` in the manifest).
* Resume: each shard is committed by an atomic rename; a rerun with the same
  parameters keeps the complete shards, deletes partial ones and continues after the
  last sample written. A finished conversion (manifest present, same parameters) is
  not redone. Different parameters in a non-empty output directory are an error
  unless ``overwrite=True``.

Common keyword arguments of the ``convert_*`` functions:

    image_size (int, 112): side of the square images stored.
    quality (int, 95): JPEG quality of re-encoded images.
    max_shard_bytes (int, 1 GiB): size limit of one tar.
    max_shard_samples (int | None): sample limit of one tar.
    num_workers (int | None): worker processes (None: all CPUs; 0: in-process).
    chunk_size (int, 64): samples per worker task.
    progress (bool, True): progress bar (tqdm if installed, else a line every ~10 %).
    prefix (str, "shard"): shard file prefix.
    metadata (bool, True): write ``<key>.json`` with the sample's origin.
    overwrite (bool, False): clear an output directory converted with other parameters.

Each returns the manifest dict (also written to ``<out_dir>/manifest.json``).
"""
from __future__ import annotations

import functools
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from dpface.data.formats import shards as sh
from dpface.data.formats.recordio import InsightFaceRecord
from dpface.io import atomic_write_json

PARAMS_NAME = "convert_params.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MAX_WARNINGS = 10


# -- JPEG preparation (runs in workers) ----------------------------------------------
def prepare_jpeg(data: bytes, image_size: int, quality: int = 95) -> tuple[bytes, bool]:
    """(JPEG bytes of an image_size² RGB image, whether it was re-encoded).

    Raises ValueError if ``data`` is not a decodable image.
    """
    try:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG" and im.size == (image_size, image_size) and im.mode in ("RGB", "L"):
            im.load()  # trial decode: catches truncated/corrupt files before they reach a shard
            return bytes(data), False
        im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"undecodable image ({e})") from e
    return encode_jpeg(np.asarray(im), image_size, quality), True


def encode_jpeg(image: np.ndarray, image_size: int, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] → JPEG bytes, centre-cropped to a square and resized to image_size²."""
    im = Image.fromarray(np.ascontiguousarray(image))
    w, h = im.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=int(quality))
    return out.getvalue()


class _FileEncoder:
    """Task: [(index, path, label, meta)] → prepared samples."""

    def __init__(self, image_size: int, quality: int):
        self.image_size, self.quality = image_size, quality

    def __call__(self, task):
        out = []
        for index, path, label, meta in task:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                jpeg, _ = prepare_jpeg(data, self.image_size, self.quality)
                out.append((index, jpeg, label, meta, None))
            except (OSError, ValueError) as e:
                out.append((index, None, label, meta, f"{path}: {e}"))
        return out


class _BytesEncoder:
    """Task: [(index, image bytes, label, meta)] → prepared samples."""

    def __init__(self, image_size: int, quality: int):
        self.image_size, self.quality = image_size, quality

    def __call__(self, task):
        out = []
        for index, data, label, meta in task:
            try:
                jpeg, _ = prepare_jpeg(data, self.image_size, self.quality)
                out.append((index, jpeg, label, meta, None))
            except ValueError as e:
                out.append((index, None, label, meta, f"{meta}: {e}"))
        return out


@functools.lru_cache(maxsize=2)
def _synthetic_dataset(params: tuple):
    # Cached per process: each worker builds the renderer (noise bank, face cache) once,
    # not once per task.
    from dpface.data.synthetic.faces import SyntheticFaceDataset
    return SyntheticFaceDataset(**dict(params))


class _SyntheticEncoder:
    """Task: (lo, hi) dataset indices → rendered + encoded samples."""

    def __init__(self, params: dict, quality: int, metadata: bool):
        self.params = tuple(sorted(params.items()))
        self.quality, self.metadata = quality, metadata

    def __call__(self, task):
        ds = _synthetic_dataset(self.params)
        size = ds.faces.image_size
        out = []
        for index in range(*task):
            label, sample = ds.locate(index)
            img = ds.faces.render(ds.identity_offset + label, sample)
            meta = ({"identity": ds.identity_offset + label, "sample": sample}
                    if self.metadata else None)
            out.append((index, encode_jpeg(img, size, self.quality), label, meta, None))
        return out


# -- ordered parallel map ------------------------------------------------------------
def _ordered_map(fn: Callable, tasks: Iterable, num_workers: int) -> Iterator:
    """fn over tasks in order, in ``num_workers`` processes, with a bounded window in flight."""
    if num_workers <= 0:
        yield from map(fn, tasks)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    window = 4 * num_workers
    with ctx.Pool(num_workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    """tqdm when installed, else a plain line roughly every 10 %."""

    def __init__(self, total: int | None, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.n, self._bar, self._next = 0, None, 0.1
        self._t0 = time.time()
        if enabled and sys.stderr.isatty():  # a log file gets plain lines, not \r redraws
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif self.enabled and self.total and self.n >= self._next * self.total:
            rate = self.n / max(time.time() - self._t0, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} images ({rate:.0f} img/s)", file=sys.stderr)
            self._next += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- the engine ----------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _prepare_out_dir(out_dir: str, params: dict, prefix: str, overwrite: bool) -> dict | None:
    """Create/validate out_dir; returns the finished manifest if there is nothing to do."""
    os.makedirs(out_dir, exist_ok=True)
    ppath = os.path.join(out_dir, PARAMS_NAME)
    if os.path.exists(ppath):
        with open(ppath, encoding="utf-8") as f:
            old = json.load(f)
        if old != params:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
                raise ValueError(f"{out_dir} holds a conversion with other parameters "
                                 f"(differing: {', '.join(diff)}); use an empty directory or "
                                 "--overwrite")
            for name in os.listdir(out_dir):
                if name.startswith(prefix + "-") or name in (sh.MANIFEST_NAME, PARAMS_NAME):
                    os.remove(os.path.join(out_dir, name))
        else:
            mpath = os.path.join(out_dir, sh.MANIFEST_NAME)
            if os.path.exists(mpath):
                manifest = sh.load_manifest(mpath)
                if manifest.get("params") == params:
                    return manifest
    elif any(n.startswith(prefix + "-") for n in os.listdir(out_dir)) and not overwrite:
        raise ValueError(f"{out_dir} holds {prefix}-* files but no {PARAMS_NAME}: not a "
                         "conversion this tool can resume; use an empty directory or "
                         "--overwrite")
    atomic_write_json(ppath, params, indent=1, sort_keys=True)
    return None


def _convert(*, out_dir: str, params: dict, source: str, total: int,
             num_classes: int | None, make_tasks: Callable[[int], Iterable],
             encoder: Callable, image_size: int, max_shard_bytes: int,
             max_shard_samples: int | None, num_workers: int | None, progress: bool,
             prefix: str, overwrite: bool) -> dict:
    done = _prepare_out_dir(out_dir, params, prefix, overwrite)
    if done is not None:
        return done
    kept = sh.complete_shard_prefix(out_dir, prefix)
    counts = np.zeros(max(num_classes or 0, 1), dtype=np.int64)

    def count(labels) -> None:
        nonlocal counts
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) == 0:
            return
        if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
            raise ValueError(f"label {int(labels.min() if labels.min() < 0 else labels.max())} "
                             f"outside [0, {num_classes})")
        if labels.max() >= len(counts):
            counts = np.concatenate([counts, np.zeros(labels.max() + 1 - len(counts), np.int64)])
        np.add.at(counts, labels, 1)

    for info in kept:
        count(info.labels)
        info.labels = []
    start = int(kept[-1].last_key) + 1 if kept else 0
    workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    bar = _Progress(total, f"convert {source}", progress)
    bar.update(start)
    warned = 0
    writer = sh.ShardWriter(out_dir, prefix=prefix, max_shard_bytes=max_shard_bytes,
                            max_shard_samples=max_shard_samples, start_shard=len(kept))
    try:
        for results in _ordered_map(encoder, make_tasks(start), workers):
            for index, jpeg, label, meta, error in results:
                if jpeg is None:
                    if warned < _MAX_WARNINGS:
                        print(f"dpface convert: skipping sample {index}: {error}", file=sys.stderr)
                        warned += 1
                    continue
                if label < 0 or (num_classes is not None and label >= num_classes):
                    raise ValueError(f"sample {index} ({meta}) has label {label}, outside "
                                     f"[0, {num_classes})")
                writer.write(sh.sample_key(index), jpeg, label, meta)
                if label >= len(counts):  # class count unknown up front: grow
                    counts = np.concatenate([counts, np.zeros(label + 1 - len(counts), np.int64)])
                counts[label] += 1
            bar.update(len(results))
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    shard_list = kept + writer.close()
    if num_classes is not None:
        counts = counts[:num_classes] if len(counts) >= num_classes else np.concatenate(
            [counts, np.zeros(num_classes - len(counts), np.int64)])
    elif int(counts.sum()) == 0:
        counts = counts[:0]
    written = sum(s.samples for s in shard_list)
    manifest = sh.build_manifest(shard_list, counts, image_size, params,
                                 skipped=total - written, source=source)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sh.write_manifest(out_dir, manifest)
    if total - written:
        print(f"dpface convert: {total - written} of {total} source samples skipped "
              "(undecodable)", file=sys.stderr)
    return manifest


def _common_params(image_size, quality, max_shard_bytes, max_shard_samples, prefix, metadata):
    _check_int("image_size", image_size, 8)
    _check_int("quality", quality, 1)
    if quality > 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    return {"image_size": int(image_size), "quality": int(quality),
            "max_shard_bytes": int(max_shard_bytes),
            "max_shard_samples": None if max_shard_samples is None else int(max_shard_samples),
            "prefix": prefix, "metadata": bool(metadata)}


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- image folder --------------------------------------------------------------------
def _class_dirs(src: str) -> list[str]:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"image folder not found: {src}")
    names = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"image folder {src} has no identity sub-folders")
    return names


def _images_in(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith(".")
                  and e.name.lower().endswith(IMAGE_EXTENSIONS))


def convert_image_folder(src_dir: str, out_dir: str, *, image_size: int = 112, quality: int = 95,
                         max_shard_bytes: int = 1 << 30, max_shard_samples: int | None = None,
                         num_workers: int | None = None, chunk_size: int = 64,
                         progress: bool = True, prefix: str = "shard", metadata: bool = True,
                         overwrite: bool = False) -> dict:
    """``src_dir/<identity>/<image>`` → shards; sorted folder names get labels 0…C−1.

    Images are taken in sorted file-name order within each folder; files whose extension
    is not an image type (``IMAGE_EXTENSIONS``) and hidden entries are ignored. Empty
    identity folders keep their label (with count 0). Only one folder's file list is in
    memory at a time. See the module docstring for the other kwargs.
    """
    params = _common_params(image_size, quality, max_shard_bytes, max_shard_samples, prefix,
                            metadata)
    src_dir = os.path.abspath(src_dir)
    classes = _class_dirs(src_dir)
    params.update(source="image_folder", src=src_dir, num_classes=len(classes))
    # A listing pass for the total (progress bar, skipped count): names are not kept.
    total = sum(len(_images_in(os.path.join(src_dir, c))) for c in classes)

    def samples(start: int):
        index = 0
        for label, c in enumerate(classes):
            folder = os.path.join(src_dir, c)
            names = _images_in(folder)
            if index + len(names) <= start:
                index += len(names)
                continue
            for name in names:
                if index >= start:
                    meta = {"src": f"{c}/{name}"} if metadata else None
                    yield index, os.path.join(folder, name), label, meta
                index += 1

    return _convert(out_dir=out_dir, params=params, source=src_dir, total=total,
                    num_classes=len(classes),
                    make_tasks=lambda start: _chunks(samples(start), chunk_size),
                    encoder=_FileEncoder(image_size, quality), image_size=image_size,
                    max_shard_bytes=max_shard_bytes, max_shard_samples=max_shard_samples,
                    num_workers=num_workers, progress=progress, prefix=prefix,
                    overwrite=overwrite)


# -- insightface RecordIO ------------------------------------------------------------
def convert_recordio(rec_path: str, out_dir: str, *, idx_path: str | None = None,
                     image_size: int = 112, quality: int = 95, max_shard_bytes: int = 1 << 30,
                     max_shard_samples: int | None = None, num_workers: int | None = None,
                     chunk_size: int = 64, progress: bool = True, prefix: str = "shard",
                     metadata: bool = True, overwrite: bool = False) -> dict:
    """insightface ``train.rec`` (+ ``train.idx``, default: next to it) → shards.

    Images are taken in record-key order; their labels come from each image record's
    header. The class count comes from the header record (identity records); without
    one it is the largest label + 1. The main process reads records sequentially
    (I/O); workers check/re-encode the JPEGs. See the module docstring for the kwargs.
    """
    params = _common_params(image_size, quality, max_shard_bytes, max_shard_samples, prefix,
                            metadata)
    rec_path = os.path.abspath(rec_path)
    rec = InsightFaceRecord(rec_path, idx_path)
    params.update(source="recordio", src=rec_path)

    def samples(start: int):
        for pos, label, payload in rec.iter_images(start):
            meta = {"rec_key": int(rec.image_keys[pos])} if metadata else None
            yield pos, payload, label, meta

    return _convert(out_dir=out_dir, params=params, source=rec_path, total=rec.num_images,
                    num_classes=rec.num_classes,
                    make_tasks=lambda start: _chunks(samples(start), chunk_size),
                    encoder=_BytesEncoder(image_size, quality), image_size=image_size,
                    max_shard_bytes=max_shard_bytes, max_shard_samples=max_shard_samples,
                    num_workers=num_workers, progress=progress, prefix=prefix,
                    overwrite=overwrite)


# -- synthetic faces -----------------------------------------------------------------
def convert_synthetic(out_dir: str, *, num_identities: int, seed: int = 0, image_size: int = 112,
                      difficulty: float = 1.0, max_images: int = 60, min_images: int = 2,
                      exponent: float = 1.0, identity_offset: int = 0, quality: int = 95,
                      max_shard_bytes: int = 1 << 30, max_shard_samples: int | None = None,
                      num_workers: int | None = None, chunk_size: int = 64,
                      progress: bool = True, prefix: str = "shard", metadata: bool = True,
                      overwrite: bool = False) -> dict:
    """Render :class:`~dpface.data.synthetic.SyntheticFaceDataset` into shards.

    ``num_identities``, ``seed``, ``difficulty``, ``max_images``, ``min_images``,
    ``exponent`` and ``identity_offset`` are the dataset's (labels 0…num_identities−1,
    long-tailed counts); images are rendered at ``image_size`` and JPEG-encoded at
    ``quality``. See the module docstring for the other kwargs.
    """
    params = _common_params(image_size, quality, max_shard_bytes, max_shard_samples, prefix,
                            metadata)
    ds_params = {"num_identities": int(num_identities), "seed": int(seed),
                 "image_size": int(image_size), "difficulty": float(difficulty),
                 "max_images": int(max_images), "min_images": int(min_images),
                 "exponent": float(exponent), "identity_offset": int(identity_offset)}
    ds = _synthetic_dataset(tuple(sorted(ds_params.items())))  # validates the arguments
    params.update(source="synthetic", **ds_params)
    total = len(ds)

    def tasks(start: int):
        for lo in range(start, total, chunk_size):
            yield lo, min(lo + chunk_size, total)

    return _convert(out_dir=out_dir, params=params, source="synthetic", total=total,
                    num_classes=ds.num_classes, make_tasks=tasks,
                    encoder=_SyntheticEncoder(ds_params, quality, metadata),
                    image_size=image_size, max_shard_bytes=max_shard_bytes,
                    max_shard_samples=max_shard_samples, num_workers=num_workers,
                    progress=progress, prefix=prefix, overwrite=overwrite)
