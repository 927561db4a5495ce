"""Prefill a prompt into a static KV pool, then decode token by token (greedy or sampled)."""
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch

from models import CausalLM

from .kv_pool import KVPool


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    pool_bytes: int
    peak_memory_bytes: int


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
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.inference_mode()
def generate(model: CausalLM, prompt: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset(),
             sampling: Sampling = Sampling(), on_token: Callable[[int], None] | None = None
             ) -> tuple[list[int], GenerationStats]:
    """Full-attention generation: one prefill of the whole prompt, then greedy/sampled decoding."""
    p = model.lm_head.weight
    pool = KVPool(model.config, len(prompt) + max_new_tokens, dtype=p.dtype, device=p.device)
    generator = torch.Generator(p.device).manual_seed(sampling.seed)
    tokens = torch.tensor([prompt], device=p.device)
    t0 = time.perf_counter()
    logits = model(tokens, torch.arange(len(prompt), device=p.device), pool, last_only=True)
    pool.advance(len(prompt))
    t1 = time.perf_counter()
    out = []
    for _ in range(max_new_tokens):
        token = sample(logits[0, -1], sampling, generator)
        out.append(token)
        if on_token:
            on_token(token)
        if token in stop_ids or len(out) == max_new_tokens:
            break
        position = torch.tensor([pool.length], device=p.device)
        logits = model(torch.tensor([[token]], device=p.device), position, pool)
        pool.advance(1)
    t2 = time.perf_counter()
    return out, GenerationStats(len(prompt), len(out), t1 - t0, t2 - t1, pool.nbytes, peak_memory_bytes(p.device))
