"""The retaining heads' objective (Locret, arXiv 2410.01805, as the official code computes it), the
loss for the shared targets (train.py --target shared, graded, joint) and the metric."""
import torch
import torch.nn.functional as F


def smoothness(pred: torch.Tensor) -> torch.Tensor:
    """The sum over layers of the MSE between neighbouring tokens' predictions, pred
    [L, B, KVH, P]."""
    return ((pred[..., :-1] - pred[..., 1:]) ** 2).flatten(1).mean(dim=1).sum()


def retaining_loss(pred: torch.Tensor, label: torch.Tensor, alpha: float = 0.0025) -> torch.Tensor:
    """pred, label [L, B, KVH, P]. SmoothL1 (beta 1) averaged over layers, heads and tokens, plus
    alpha times the smoothness of the predictions."""
    pred = pred.float()
    return F.smooth_l1_loss(pred, label, beta=1.0) + alpha * smoothness(pred)


def keep_loss(pred: torch.Tensor, label: torch.Tensor, alpha: float = 0.0025) -> torch.Tensor:
    """For the shared targets (ranking.py: 0/1, or in [0, 1] when graded): binary cross-entropy
    with the predictions as logits, plus alpha times their smoothness. pred, label
    [L, B, KVH, P]."""
    pred = pred.float()
    return F.binary_cross_entropy_with_logits(pred, label) + alpha * smoothness(pred)


@torch.no_grad()
def topk_overlap(pred: torch.Tensor, label: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of the top-`fraction` tokens by label that are also top by prediction, averaged over
    layers, batch and KV heads. pred, label [L, B, KVH, P]."""
    k = max(1, int(pred.shape[-1] * fraction))
    hits = torch.zeros(pred.shape, dtype=torch.bool, device=pred.device)
    hits.scatter_(-1, pred.topk(k, dim=-1).indices, True)
    return hits.gather(-1, label.topk(k, dim=-1).indices).float().mean().item()
