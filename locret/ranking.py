"""Scores made comparable across layers and KV heads: each (layer, head) ranks its tokens, and a
token's shared score is its mean rank: one kept set for every layer (`--eviction shared`)."""
import torch


def percentile_rank(x: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its row (the last dim) as a fraction in [0, 1]; ties go by position.
    """
    n = x.shape[-1]
    order = x.argsort(dim=-1, stable=True)
    positions = torch.arange(n, device=x.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)  # order's inverse
    return ranks.float() / max(n - 1, 1)


def shared_rank(scores: torch.Tensor) -> torch.Tensor:
    """scores [L, B, KVH, n] -> [B, n]: each token's percentile rank, averaged over layers and KV
    heads."""
    return percentile_rank(scores).mean(dim=(0, 2))

