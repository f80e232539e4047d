"""Batched embedding extraction with the insightface flip convention."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dpface.data.transforms import hflip, normalize


def _to_nchw_uint8(images) -> torch.Tensor:
    """uint8 torch [N,3,H,W] passes through; uint8 numpy [N,H,W,3] is transposed (a view)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 images, got numpy dtype {images.dtype}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"numpy images must be [N,H,W,3] (channels last), got shape {images.shape}")
        return torch.from_numpy(images).permute(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got torch dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"torch images must be [N,3,H,W] (channels first), got shape {tuple(images.shape)}")
        return images
    raise TypeError(f"images must be a torch.Tensor or numpy.ndarray, got {type(images).__name__}")


def extract_embeddings(model: torch.nn.Module, images, batch_size: int = 128, device="cpu",
                       flip: bool = True) -> torch.Tensor:
    """Embed uint8 images → L2-normalised float32 [N, D] on the CPU.

    ``images``: uint8 torch [N,3,H,W] or uint8 numpy [N,H,W,3]. The model must already live
    on ``device`` (it is not moved: moving a caller's model would be a surprising side effect);
    batches are sent there as uint8 and normalised on the device.
    With ``flip`` the embedding is emb(x) + emb(hflip(x)) before normalisation (insightface).
    The model runs in eval mode under ``no_grad``; every submodule's previous train/eval flag
    is restored afterwards, even when the model call raises.
    """
    x = _to_nchw_uint8(images)
    n = x.shape[0]
    if n == 0:
        raise ValueError("no images to embed (N = 0)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    # per-module flags: model.train(prev) would flatten a deliberately mixed state
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out: torch.Tensor | None = None
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = x[start:start + batch_size].to(device)
                emb = _forward(model, normalize(batch))
                if flip:
                    emb = emb + _forward(model, normalize(hflip(batch)))
                emb = F.normalize(emb.float(), dim=1).cpu()
                if out is None:
                    out = torch.empty(n, emb.shape[1], dtype=torch.float32)
                elif emb.shape[1] != out.shape[1]:
                    raise ValueError(
                        f"model returned D={emb.shape[1]} at image {start}, D={out.shape[1]} before")
                out[start:start + emb.shape[0]] = emb
    finally:
        # train(prev) runs any custom train() override; then re-apply mixed per-module flags
        model.train(modes[0][1])
        for m, was_training in modes:
            if m.training != was_training:
                m.training = was_training
    return out


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    emb = model(x)
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != x.shape[0]:
        got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"model must return embeddings [B, D] for B={x.shape[0]} images, got {got}")
    return emb
