"""Random draws: the next token (greedy, or seeded sampling with temperature, top-k and top-p),
and distinct values."""
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """Next token id from logits [V]."""
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def distinct(make, n: int) -> list[str]:
    """n distinct values from a random `make()`."""
    values = []
    while len(values) < n:
        value = make()
        if value not in values:
            values.append(value)
    return values
