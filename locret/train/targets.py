"""Training targets for heads meant for shared eviction (`train.py --target shared`, `graded`,
`joint`, `joint-rank`): one target for every layer and KV head, built from the per-layer CIS labels
by rank."""
import torch

from ..ranking import percentile_rank, shared_rank


def best_rank(labels: torch.Tensor) -> torch.Tensor:
    """Per-layer labels [L, B, KVH, P] -> [B, P]: a token's best percentile rank in any layer and KV
    head (what some layer needs most), re-ranked over the prompt so that it spreads evenly over
    [0, 1]."""
    return percentile_rank(percentile_rank(labels).amax(dim=(0, 2)))


def top_share(rank: torch.Tensor, like: torch.Tensor, share: float) -> torch.Tensor:
    """rank [B, P] -> 0/1 [L, B, KVH, P] shaped `like`: 1 for the `share` of tokens ranked
    highest."""
    return (rank >= 1 - share).float()[None, :, None].expand_as(like)


def shared_target(labels: torch.Tensor, share: float = 1 / 8) -> torch.Tensor:
    """Per-layer labels [L, B, KVH, P] -> one 0/1 target for every layer and KV head,
    [L, B, KVH, P]: 1 for the `share` of prompt tokens with the highest best_rank, the set a shared
    eviction at that budget keeps."""
    return top_share(best_rank(labels), labels, share)


def graded_target(labels: torch.Tensor,
                  shares: tuple = (1 / 32, 1 / 16, 1 / 8, 1 / 4)) -> torch.Tensor:
    """Like shared_target, at several budgets at once: a token's target is the share of `shares`
    whose kept set holds it (1 for the top 1/32, 0.25 for the 1/8-1/4 band), so the heads also learn
    an order among the kept tokens that budgets below 1/8 need. [L, B, KVH, P] in [0, 1]."""
    rank = best_rank(labels)
    return torch.stack([top_share(rank, labels, share) for share in shares]).mean(dim=0)


def joint_rank(labels: torch.Tensor, layers: slice) -> torch.Tensor:
    """Per-layer labels [L, B, KVH, P] -> [B, P]: a token's mean rank over `layers`' labels and KV
    heads (the order a shared eviction ranked by those layers gives when the heads fit each layer's
    labels exactly), re-ranked over the prompt."""
    return percentile_rank(shared_rank(labels[layers]))


def joint_target(labels: torch.Tensor, layers: slice, share: float = 1 / 8) -> torch.Tensor:
    """Like shared_target, ranking tokens by joint_rank: 1 for the `share` of tokens it ranks
    highest."""
    return top_share(joint_rank(labels, layers), labels, share)


def joint_rank_target(labels: torch.Tensor, layers: slice, sharpness: float = 8.0) -> torch.Tensor:
    """joint_rank itself, raised to `sharpness` and shared by every layer and KV head,
    [L, B, KVH, P] in [0, 1]: the whole order (which every budget's kept set follows), weighted
    toward its top (1 for the best token, 0.6 at the edge of the top sixteenth, 0.34 of the top
    eighth, 0.1 of the top quarter)."""
    target = joint_rank(labels, layers) ** sharpness
    return target[None, :, None].expand_as(labels)


# train.py's --target names of these targets:
# (per-layer labels, the layers a shared eviction ranks by) -> target.
SHARED_TARGETS = {
    "shared": lambda labels, layers: shared_target(labels),
    "graded": lambda labels, layers: graded_target(labels),
    "joint": joint_target,
    "joint-rank": joint_rank_target,
}


def target_eviction(target: str | None) -> str:
    """The eviction mode heads trained on `target` are meant for: shared (SHARED_TARGETS) or
    per-head (cis)."""
    return "shared" if target in SHARED_TARGETS else "per-head"
