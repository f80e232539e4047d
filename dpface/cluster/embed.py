"""Embeddings for clustering: a checkpoint's backbone (loaded as ``dpface export-onnx`` loads
it) run over the images of a converted shard set (``dpface convert``) with the evaluation
embedding helper (``dpface.eval.embeddings.extract_embeddings``: flip convention, L2 norm)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from dpface.restore import load_backbone as load_backbone_of

from .knn import ClusterError


def load_backbone(path):
    """(backbone in eval mode, its Config, the step directory) of a run or step directory,
    through the checkpoint loader `dpface eval` / `dpface export-onnx` use."""
    backbone, cfg, _, ckpt = load_backbone_of(path)
    return backbone, cfg, ckpt


def iter_samples(manifest) -> Iterator[tuple[str, str, bytes, int]]:
    """(shard name, sample key, JPEG bytes, label) of every sample of a converted set, in order."""
    from dpface.data.formats.shards import ShardError, ShardRead, resolve_shards
    from dpface.data.streams.decode import parse_label

    try:
        shards = resolve_shards(manifest)
    except ValueError as e:  # a manifest listing no shards
        raise ClusterError(f"{manifest}: {e} (empty pool)") from e
    for tar_path in shards.tars:
        name = Path(tar_path).name
        read = ShardRead(tar_path)
        for sample in read:  # the training stream's tar reader
            key = sample["__key__"]
            if "jpg" not in sample or "cls" not in sample:
                raise ShardError(f"{name}: sample {key} lacks its {'image' if 'jpg' not in sample else 'label'}")
            yield name, key, sample["jpg"], parse_label(sample["cls"])
        if read.outcome in ("truncated", "unreadable"):
            raise ShardError(f"{tar_path}: {read.outcome} shard")


def embed_manifest(backbone, manifest, image_size: int, device="cpu", batch_size: int = 128,
                   flip: bool = True, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray, list]:
    """(L2-normalised float32 [N, D], labels int64 [N], [(shard, key)]) of a converted set,
    decoded and embedded ``chunk`` images at a time (memory stays bounded)."""
    from dpface.data.streams.decode import decode_image
    from dpface.eval.embeddings import extract_embeddings

    embs, labels, where, batch = [], [], [], []

    def flush():
        if batch:
            embs.append(extract_embeddings(backbone, np.stack(batch), batch_size=batch_size, device=device,
                                           flip=flip).numpy())
            batch.clear()

    for shard, key, jpeg, label in iter_samples(manifest):
        batch.append(decode_image(jpeg, image_size))
        labels.append(label)
        where.append((shard, key))
        if len(batch) >= chunk:
            flush()
    flush()
    if not embs:
        raise ClusterError(f"{manifest}: the set holds no images: empty pool")
    return np.concatenate(embs), np.asarray(labels, np.int64), where
