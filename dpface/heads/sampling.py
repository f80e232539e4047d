"""Which of a shard's rows a step scores (Partial FC's negative sampling): always the
positives of the global batch, plus uniform negatives drawn from (seed, step, rank) alone,
or the hardest ones (the rows scoring highest against the batch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpface.heads.dist_ce import compute_dtype

# Hard-negative selection scores the whole shard in row blocks of at most this many
# [B_global × block] entries, so the selection never holds the full [B, C_local] matrix.
HARD_BLOCK_ELEMENTS = 1 << 24


def uniform_keys(num_rows: int, seed: int, device) -> torch.Tensor:
    """iid uniform keys in [0, 1): the top-n of them is a uniform n-subset."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(num_rows, generator=g, device=device)


def top_rows(keys: torch.Tensor, positives: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted indices of the n highest keys, the positives always among them."""
    keys[positives] = float("inf")
    return keys.topk(n, sorted=False).indices.sort().values


@torch.no_grad()
def hardness(embeddings: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, normalize: bool,
             subcenters: int = 1) -> torch.Tensor:
    """[C_local]: each class's highest score (cosine, or raw logit for unnormalised
    transforms; with sub-centres the max over them) against any sample of the batch,
    computed in blocks of classes."""
    dtype = compute_dtype(weight.dtype)
    x = embeddings.detach().to(dtype)
    if normalize:
        x = F.normalize(x, dim=1)
    k = subcenters
    num = weight.shape[0] // k
    block = max(1, HARD_BLOCK_ELEMENTS // max(1, x.shape[0] * k))
    out = torch.empty(num, dtype=dtype, device=x.device)
    for a in range(0, num, block):
        w = weight[a * k:(a + block) * k].detach().to(dtype)
        if normalize:
            s = x @ F.normalize(w, dim=1).T
        else:
            s = x @ w.T
            if bias is not None:
                s = s + bias[a:a + block].detach().to(dtype)
        out[a:a + block] = s.max(0).values.view(-1, k).max(1).values
    return out


__all__ = ["HARD_BLOCK_ELEMENTS", "hardness", "top_rows", "uniform_keys"]
