"""Memory: what a generation will need, known before it starts, and what it did use."""
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from models import CausalLM

from .errors import LocretError
from .engine import pool_bytes
from .policies import QUERY_BLOCK, READS_ATTENTION


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set size now (VmRSS) or at its peak (VmHWM), from Linux's /proc.
    Not ru_maxrss: across fork and exec it keeps the parent's peak, so a child of a large process
    reports that."""
    status = Path("/proc/self/status")
    if not status.is_file():  # not Linux: ru_maxrss is the best there is (bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = next(l for l in status.read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return rss_bytes("VmHWM")


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get: free GPU memory, or the system's MemAvailable plus
    what this process already holds (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    line = next(l for l in meminfo.read_text().splitlines() if l.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024 + rss_bytes()


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class MemoryEstimate:
    # before the run: the weights, or, if measured, all the process holds (runtime, loaded weights)
    held: int
    pool: int
    activations: int

    @property
    def total(self) -> int:
        return self.held + self.pool + self.activations


def sdpa_bytes(model: CausalLM, tokens: int, attended: int) -> int:
    """What attention holds for `tokens` queries over `attended` entries. CPU: sdpa works in
    blocks; a chunk after cached entries (models/base.cached_then_causal) holds its two partial
    outputs, the chunk's K and V per query head, the grouped queries and the fp32 merge, none of it
    growing with the cache, and the kernel's blocks (flash_scratch_bytes); a bf16 decoding step the
    fp32 copies of K and V (models/base.attend). Elsewhere a chunk can fall back to the math kernel:
    logits and softmax, fp32 at most (README: Performance)."""
    c, p = model.config, model.lm_head.weight
    if p.device.type != "cpu":
        return 2 * c.num_attention_heads * tokens * attended * 4
    kv_copies = 2 * c.num_key_value_heads * attended * c.head_dim * 4
    decode_copies = kv_copies if p.dtype == torch.bfloat16 else 0
    lse = 8  # the two log-sum-exps, per query
    split = c.num_attention_heads * tokens * (c.head_dim * (5 * p.element_size() + 12) + lse)
    return split + decode_copies + flash_scratch_bytes(model, tokens, attended)


def flash_scratch_bytes(model: CausalLM, tokens: int, attended: int) -> int:
    """sdpa's CPU flash kernel gives each thread a block of logits (up to 256 queries, a KV head's
    group of query heads in one, by 512 keys) with its running max, sum and output in fp32, and the
    block again in a 16-bit dtype: it grows with the threads, not the cache."""
    c, item = model.config, model.lm_head.weight.element_size()
    queries = min(256, tokens * (c.num_attention_heads // c.num_key_value_heads))
    keys = min(512, attended)
    block = queries * (keys + c.head_dim + 2) * 4 + (queries * keys * item if item < 4 else 0)
    return torch.get_num_threads() * block


def activation_bytes(model: CausalLM, tokens: int, attended: int, policy: str) -> int:
    """Upper bound on one layer's working memory for `tokens` queries over `attended` entries
    (they are freed layer by layer): hidden states, q/k/v, MLP, attention (sdpa_bytes; for policies
    that read attention, the weights of a block of queries, twice, and the keys in fp32), compact
    mode's cos/sin table (its turned keys, like int8's dequantized K and V, have buffers in the
    pool), retaining head and the last token's logits."""
    c, item = model.config, model.lm_head.weight.element_size()
    hidden = 4 * tokens * c.hidden_size * item
    qkv = 2 * tokens * c.qkv_size * item
    mlp = 3 * tokens * c.intermediate_size * item
    attention = sdpa_bytes(model, tokens, attended)
    slot_rope = 2 * attended * c.head_dim * item
    if policy in READS_ATTENTION:  # QUERY_BLOCK queries at a time
        attention += 2 * c.num_attention_heads * min(tokens, QUERY_BLOCK) * attended * 4
        attention += c.num_key_value_heads * attended * c.head_dim * 4
    heads = [h for h in model.retaining_heads if h is not None]
    head = tokens * heads[0].fc1.out_features * item if heads else 0
    if c.has_windows:  # a sliding-window layer: over its window and the chunk, with a bool mask
        ring = c.sliding_window - 1 + tokens
        attention = max(attention, sdpa_bytes(model, tokens, ring) + tokens * ring)
    return hidden + qkv + mlp + attention + slot_rope + head + c.vocab_size * 4


def estimate(model: CausalLM, settings, capacity: int, held: int | None = None) -> MemoryEstimate:
    """What is `held` already (default: the weights) + KV pool + the largest step's activations
    (a prefill chunk over a full pool)."""
    if held is None:
        unique = {id(p): p for p in model.parameters()}.values()  # tied embeddings once
        held = sum(p.numel() * p.element_size() for p in unique)
    p = model.lm_head.weight
    pool = pool_bytes(settings, model.config, capacity, p.dtype)
    step = min(settings.chunk, capacity)
    return MemoryEstimate(held, pool, activation_bytes(model, step, capacity, settings.policy))


def largest_budget(model: CausalLM, at_budget, limit: int, capacity_of, low: int, upper: int,
                   held: int | None = None) -> int:
    """The largest budget in [`low`, `upper`] whose estimate fits in `limit` bytes.
    `at_budget(budget)` gives the run's settings at that budget, `capacity_of(settings)` sizes the
    pool; `held` is what the process holds before the run."""
    def need(budget: int) -> int:
        s = at_budget(budget)
        return estimate(model, s, capacity_of(s), held).total

    high = max(upper, low)
    if need(low) > limit:
        raise LocretError(f"--max-memory {format_bytes(limit)} is too small: even budget {low} "
                          f"needs {format_bytes(need(low))} (weights and runtime included)")
    while low < high:  # the estimate grows with the budget: bisect
        mid = (low + high + 1) // 2
        low, high = (mid, high) if need(mid) <= limit else (low, mid - 1)
    return low
