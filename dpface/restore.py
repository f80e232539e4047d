"""A trained backbone back from a checkpoint directory, with the config it was trained
under: what `dpface eval`, `dpface export-onnx` and `dpface cluster` start from."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import torch

from dpface.config import Config, apply_overrides, config_from_dict
from dpface.models import build_backbone
from dpface.rundir import META, CheckpointError, checkpoint_dir, read_meta


class Restored(NamedTuple):
    backbone: torch.nn.Module  # in eval mode, on the CPU
    cfg: Config
    meta: dict
    path: Path  # the step directory


def load_file(path: Path, weights_only: bool = True, mmap: bool = False):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if not zipped:  # torch.save writes a zip archive; a truncated one still starts like one
            raise CheckpointError(f"{path}: not a torch checkpoint or state dict (not a file torch.save "
                                  "wrote)") from None
        if isinstance(e, pickle.UnpicklingError):  # weights_only met a global it does not allow: never run it
            raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain "
                                  f"containers ({_last_line(e)})") from None
        raise CheckpointError(f"checkpoint file unreadable (corrupt or truncated?): {path}: {_last_line(e)}") from None


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def check_backbone_fits(path: Path, meta: dict, saved: dict, backbone: torch.nn.Module,
                        config: dict | None) -> None:
    """Before loading: the saved tensors fit ``backbone``; else one line naming what
    differs (embedding size, model spec keys) instead of torch's list of every tensor."""
    have = {k: tuple(v.shape) for k, v in saved.items()}
    want = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    diff = [k for k in want if k in have and have[k] != want[k]] or sorted(have.keys() ^ want.keys())
    if not diff:
        return
    what = []
    if config is not None:
        old = meta["config"]
        d0, d1 = old["head"]["embedding_size"], config["head"]["embedding_size"]
        if d0 != d1:
            what.append(f"checkpoint embedding size {d0}, config {d1}")
        m0, m1 = old["model"], config["model"]
        what += [f"model.{k}: checkpoint {m0.get(k, '(default)')}, config {m1.get(k, '(default)')}"
                 for k in sorted(m0.keys() | m1.keys()) if m0.get(k) != m1.get(k)]
    raise CheckpointError(f"{path}: checkpoint backbone does not fit this config ({'; '.join(what) or 'same spec'}"
                          f"; first differing tensor: {diff[0]})")


def load_backbone(ckpt: Path | str, overrides: list[str] | None = None, cfg: Config | None = None,
                  option: str = "--checkpoint") -> Restored:
    """The backbone of a complete checkpoint directory, under its stored config (with
    ``overrides``) or under ``cfg``. Every failure is a CheckpointError naming the file:
    not a checkpoint, no meta.json, a trainer.pt without a backbone, a backbone that
    does not fit its config."""
    ckpt = checkpoint_dir(ckpt, option)
    meta = read_meta(ckpt)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{ckpt / META}: no 'config' in it (not a dpface checkpoint?)")
    if cfg is None:
        cfg = config_from_dict(meta["config"], str(ckpt / META))
        if overrides:
            cfg = config_from_dict(apply_overrides(cfg.to_dict(), overrides), f"{ckpt / META} (with overrides)")
    path = ckpt / "trainer.pt"
    saved = load_file(path)
    state = saved.get("backbone") if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds no backbone weights (no 'backbone' state dict); "
                              "a dpface checkpoint's trainer.pt is needed")
    backbone = build_backbone(cfg.model, embedding_size=cfg.head.embedding_size)
    check_backbone_fits(ckpt, meta, state, backbone, cfg.to_dict())
    backbone.load_state_dict(state)
    return Restored(backbone.eval(), cfg, meta, ckpt)


class Weights(NamedTuple):
    """Trained weights to start a new run from (``train.init_from``, a distillation teacher)."""
    state: dict            # the backbone's state dict, in dpface's names
    model: dict | None     # its model spec and embedding size, when known: {"model", "embedding_size"}
    record: dict           # what the run records: path, kind, step, data hash
    head_files: list       # a dpface checkpoint's head shards (init_head), else []
    num_classes: int | None


def read_weights(path: str | Path, key_map: dict | None = None, option: str = "train.init_from") -> Weights:
    """The backbone weights at ``path``: a dpface checkpoint (a step directory, or a run
    directory: its latest complete step), a dpface ``trainer.pt``, an arcface_torch
    ``backbone.pth`` or another state dict (models/pretrained.py). Loads with
    ``weights_only`` (a pickle that would run code is refused); every failure is a
    CheckpointError naming ``option`` and the file."""
    from dpface.eval.model_card import data_identity
    from dpface.models.pretrained import WeightsError, backbone_state

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{option}: {p} does not exist")
    if p.is_dir():
        ckpt = checkpoint_dir(p, option)
        meta = read_meta(ckpt)
        saved = load_file(ckpt / "trainer.pt")
        state = saved.get("backbone") if isinstance(saved, dict) else None
        if not isinstance(state, dict) or not state or not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"{option}: {ckpt} is not a dpface checkpoint with backbone weights")
        cfg = config_from_dict(meta["config"], str(ckpt / META))
        record = {"path": str(ckpt.resolve()), "kind": "dpface checkpoint", "step": int(meta["step"]),
                  "data_hash": data_identity(cfg).get("hash")}
        return Weights(state, {"model": cfg.model, "embedding_size": cfg.head.embedding_size}, record,
                       sorted(ckpt.glob("head-rank*.pt")), int(meta["num_classes"]))
    try:
        obj = load_file(p)
    except CheckpointError as e:
        raise CheckpointError(f"{option}: {e}") from None
    try:
        if isinstance(obj, dict) and isinstance(obj.get("backbone"), dict) and "step" in obj:
            state, model, kind = obj["backbone"], None, "dpface trainer.pt"  # a checkpoint's own file
            step = int(obj["step"])
        else:
            (state, model, kind), step = backbone_state(obj, str(p), key_map), None
    except WeightsError as e:
        raise CheckpointError(f"{option}: {e}") from None
    record = {"path": str(p.resolve()), "kind": kind, "step": step, "data_hash": None}
    return Weights(state, model, record, [], None)
