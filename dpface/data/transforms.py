"""The one place that fixes the image convention shared by every data backend.

Backends yield uint8 images [B, 3, H, W] (RGB) and int64 labels [B]; the trainer and
the evaluator normalise on the device, so the host moves 4× fewer bytes.
"""
import torch

MEAN = 127.5
STD = 127.5


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] in [0,255] → float32 in [−1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return (images.float() - MEAN) / STD


def hflip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)
