"""How the heads are updated: AdamW (betas of the official code), a linear warmup and decay of the
learning rate, gradients clipped by value."""
import torch

from .config import TrainConfig
from .distributed import Rank, average_gradients


def adamw(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95),
                             weight_decay=config.weight_decay)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def update(params: list, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
           rank: Rank) -> None:
    """One AdamW step on the heads at learning rate `lr`, gradients averaged over the ranks."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params, rank)
    torch.nn.utils.clip_grad_value_(params, 0.5)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
