"""Durable file writes: the one way dpface replaces a file.

``atomic_write`` writes to a temp name in the target's directory, flushes and fsyncs
it, renames it over the target and fsyncs the directory. A crash (or an exception in
the writer) leaves either the old file or the new one, never half of one, and after
return the new file survives a power loss. Readers of checkpoints, shards, manifests
and evaluation sets rely on this.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames/creations inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: it creates 0600 files; mode 0666 lets the umask decide, as for any file
    # (a team on a shared file system reads each other's checkpoints). The unique name
    # lets concurrent writers of one path not clobber each other's temp file.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


__all__ = ["TMP_SUFFIX", "atomic_save", "atomic_write", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "fsync_dir"]
