"""Vision Transformer (ViT) backbones for aligned 112x112 faces.

The layout of the published face ViTs (trained on WebFace42M in "Killing Two Birds with
One Stone", An et al. 2022, and in the Partial FC paper), not ImageNet's:

  * patch embedding: a 9x9 conv with stride 9 and no padding. 112 = 12·9 + 4, so it gives a
    12x12 grid of 144 tokens and the last 4 pixel rows and columns (bottom, right) are never
    seen: aligned crops put the face well inside, so nothing is padded or resized. In general
    the grid is ⌊S/p⌋ per side and S mod p rows/columns are dropped;
  * a learned position embedding per token, no class token;
  * pre-norm blocks: x + Attn(LN(x)), then x + MLP(LN(x)); qkv without bias, the MLP
    dim → 4·dim → dim with ReLU6 (the face recipes' activation, not GELU); stochastic depth
    rising linearly from 0 to ``drop_path`` over the blocks;
  * in training, a random ``mask_ratio`` of the tokens is dropped before the blocks and
    replaced by one learned mask token after the final LN (a regulariser of the recipes);
  * head: the final LN's tokens flattened (all 144 positions, as the iresnets keep their
    7x7 map rather than pooling it) → Linear(144·dim → dim) → BN → Linear(dim → D) → BN.

Sizes (dim / depth / heads), those of the recipes: vit_t 256/12/8, vit_s 512/12/8,
vit_b 512/24/8, vit_l 768/24/8; ``vit_tiny_cpu`` (64/4/4) is for tests and CPU demos.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpface.models.checkpointing import check_checkpoint, run_blocks
from dpface.models.iresnet import at_least_fp32, check_embedding_size, check_image, positive_int

PATCH_SIZE = 9
BN_EPS = 2e-5  # the recipes' head BNs
# name → (dim, depth, heads)
SIZES = {
    "vit_t": (256, 12, 8),
    "vit_s": (512, 12, 8),
    "vit_b": (512, 24, 8),
    "vit_l": (768, 24, 8),
    "vit_tiny_cpu": (64, 4, 4),
}


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of the samples."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√d)·v per head
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, hidden: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU6(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """ViT over [B,3,S,S] images in [-1,1]; returns unnormalised float32 [B,D]."""

    def __init__(
        self,
        embedding_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int = PATCH_SIZE,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        mask_ratio: float = 0.1,
        input_size: int = 112,
        checkpoint: str = "none",
        checkpoint_every: int = 2,
    ):
        super().__init__()
        check_embedding_size(embedding_size)
        positive_int("dim", dim)
        positive_int("depth", depth)
        positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        positive_int("patch_size", patch_size)
        positive_int("input_size", input_size)
        if input_size < patch_size:
            raise ValueError(f"input_size ({input_size}) must be at least patch_size ({patch_size})")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be a number > 0 with dim·mlp_ratio >= 1, got {mlp_ratio!r}")
        drop_path = _fraction("drop_path", drop_path)
        self.mask_ratio = _fraction("mask_ratio", mask_ratio)
        self.checkpoint, self.checkpoint_every = check_checkpoint(checkpoint, checkpoint_every)
        self.input_size, self.embedding_size, self.dim = input_size, embedding_size, dim
        self.grid = input_size // patch_size
        self.num_tokens = self.grid * self.grid
        # Tokens kept in training (the recipes' rounding); at least one must stay.
        self.keep_tokens = int(self.num_tokens * (1.0 - self.mask_ratio))
        if self.keep_tokens < 1:
            raise ValueError(f"mask_ratio {mask_ratio} would mask all {self.num_tokens} tokens")

        # No padding: the S mod p last rows/columns are dropped (module docstring).
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        # Python floats, not torch.linspace: the model must build on the meta device too.
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, num_heads, int(dim * mlp_ratio), r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        # Only a model that masks has (and trains) a mask token.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.mask_ratio > 0 else None
        self.feature = nn.Sequential(
            nn.Linear(self.num_tokens * dim, dim, bias=False),  # no bias: the BN follows
            nn.BatchNorm1d(dim, eps=BN_EPS),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # The recipes' (and timm's) ViT init: truncated normal 0.02 for linears and the
        # position embedding; the patch conv keeps torch's default init.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:  # normal(0.02); truncated at ±2, i.e. ±100σ
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.input_size)
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, dim]
        b, n, d = x.shape
        kept = None
        if self.training and self.mask_token is not None and self.keep_tokens < n:
            # A random subset of keep_tokens positions per sample, in random order.
            kept = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :self.keep_tokens]
            kept = kept.unsqueeze(-1).expand(-1, -1, d)
            x = x.gather(1, kept)
        x = self.norm(run_blocks(self.blocks, x, self.checkpoint, self.checkpoint_every, self.training))
        if kept is not None:
            # Back to the N positions; the dropped ones get the mask token.
            x = self.mask_token.to(x.dtype).expand(b, n, d).scatter(1, kept, x)
        # The 144·dim-wide projection and the BNs in fp32 even under autocast (as IResNet's FC).
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.feature(at_least_fp32(x.flatten(1)))


def _preset(name: str):
    size = SIZES[name]

    def build(
        embedding_size: int,
        patch_size: int = PATCH_SIZE,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        mask_ratio: float = 0.1,
        input_size: int = 112,
        checkpoint: str = "none",
        checkpoint_every: int = 2,
        dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
    ) -> ViT:
        d, n, h = size
        return ViT(embedding_size, dim=d if dim is None else dim, depth=n if depth is None else depth,
                   num_heads=h if num_heads is None else num_heads, patch_size=patch_size,
                   mlp_ratio=mlp_ratio, drop_path=drop_path, mask_ratio=mask_ratio, input_size=input_size,
                   checkpoint=checkpoint, checkpoint_every=checkpoint_every)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{name}: ViT with dim {size[0]}, {size[1]} blocks, {size[2]} heads, 9x9 patches "
        "(a 12x12 grid at 112); `dim`/`depth`/`num_heads` override the size; `checkpoint` "
        "(none | blocks | every_n, with `checkpoint_every`) checkpoints the blocks' activations."
    )
    return build


vit_t = _preset("vit_t")
vit_s = _preset("vit_s")
vit_b = _preset("vit_b")
vit_l = _preset("vit_l")
vit_tiny_cpu = _preset("vit_tiny_cpu")
