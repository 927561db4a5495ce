"""Validation: the heads' loss and top-10% overlap on held-out samples (of a seed training never
uses)."""
from dataclasses import dataclass

import torch

from ..loading.tokenizer import Tokenizer
from .config import TrainConfig
from .forward import LOSSES, heads_forward, training_ids
from .loss import topk_overlap

HELD_OUT = 1_000_003  # added to the training seed


@dataclass(frozen=True)
class Validation:
    step: int
    loss: float
    overlap: float

    def __str__(self) -> str:
        return f"step {self.step}: val loss {self.loss:.4f}, val top-10% overlap {self.overlap:.3f}"


@torch.no_grad()
def validate(model, tokenizer: Tokenizer, config: TrainConfig, step: int, evicted: tuple | None,
             layers: slice) -> Validation:
    """Mean loss and overlap over config.val_samples held-out samples, after `step` steps."""
    losses, overlaps = [], []
    for i in range(config.val_samples):
        ids, prompt_len = training_ids(tokenizer, config, i, config.seed + HELD_OUT)
        pred, label = heads_forward(model, ids, prompt_len, config.target, evicted, layers)
        losses.append(LOSSES[config.target](pred, label, config.alpha).item())
        overlaps.append(topk_overlap(pred, label))
    return Validation(step, sum(losses) / len(losses), sum(overlaps) / len(overlaps))
