"""Scoring policies. After each chunk passes a layer, a policy turns what the chunk exposes into one
score per cache entry and KV head; the engine keeps the top-`budget` of them. Each policy returns
the scores of all S entries (kept + new): most keep the stored scores and append the chunk's."""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .errors import LocretError

# queries per step when a policy sums attention over a whole chunk (memory.py counts it)
QUERY_BLOCK = 64


@dataclass
class Chunk:
    """One layer's view of a prefill chunk of T tokens over a pool of S entries (S - T kept, T new).
    """
    q: torch.Tensor  # [B, H, T, D] the chunk's queries, RoPE applied
    k: torch.Tensor  # [B, KVH, S, D] every entry's key, RoPE applied
    stored: torch.Tensor  # [B, KVH, S - T] scores of the kept entries
    index: torch.Tensor  # [B, KVH, S] prompt position of each entry's token
    head_scores: torch.Tensor | None  # [B, KVH, T] retaining heads' output for the chunk
    layer: int = 0

    @property
    def n_new(self) -> int:
        return self.q.shape[2]

    def attention(self, last: int | None = None) -> torch.Tensor:
        """Softmax attention of the chunk's last `last` queries (all by default) over every entry,
        grouped by KV head: [B, KVH, G, T', S], G query heads per KV head. Only chunk x pool."""
        return self.attention_rows(self.n_new - (last or self.n_new), self.n_new)

    def attention_rows(self, start: int, stop: int) -> torch.Tensor:
        """Softmax attention of the chunk's queries start..stop-1 over every entry:
        [B, KVH, G, stop - start, S]."""
        B, H, _, D = self.q.shape
        S, KVH = self.k.shape[2], self.k.shape[1]
        # [B, KVH, G * Tq, D]: head h reads KV head h // G
        q = self.q[:, :, start:stop].float().reshape(B, KVH, -1, D)
        dots = q @ self.k.float().transpose(-1, -2) / math.sqrt(D)
        logits = dots.view(B, KVH, H // KVH, stop - start, S)
        # slot of the first of these queries; each sees every slot up to its own
        first_query = S - self.n_new + start
        visible = (torch.arange(S, device=q.device)
                   <= first_query + torch.arange(stop - start, device=q.device)[:, None])
        return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)

    def received(self, block: int = QUERY_BLOCK) -> torch.Tensor:
        """Attention each entry received from all the chunk's queries, summed over them and the
        GQA group: [B, KVH, S], `block` queries at a time so the transient stays
        [B, KVH, G, block, S] for any chunk."""
        T = self.n_new
        return sum(self.attention_rows(i, min(i + block, T)).sum(dim=(2, 3))
                   for i in range(0, T, block))

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Stored scores followed by the chunk's `new` [B, KVH, T]."""
        return torch.cat((self.stored, new.float()), dim=-1)


def best_within(scores: torch.Tensor, span: int) -> torch.Tensor:
    """scores [B, KVH, T] -> each token's best score within span // 2 tokens either side (odd
    `span`): a token the scorer values keeps its neighbours, so a fact stays whole."""
    if span == 1:
        return scores
    pooled = F.max_pool1d(scores.flatten(0, 1)[:, None], span, stride=1, padding=span // 2)
    return pooled.view(scores.shape)


def locret(c: Chunk, span: int = 1) -> torch.Tensor:
    """Trained retaining heads: each token keeps the score its chunk gave it, best_within `span`."""
    return c.append(best_within(c.head_scores.float(), span))


def streamingllm(c: Chunk, sinks: int = 4) -> torch.Tensor:
    """Attention sinks (the first tokens) always, then the most recent."""
    return torch.where(c.index < sinks, float("inf"), c.index.float())


def h2o(c: Chunk) -> torch.Tensor:
    """Heavy hitters: attention each entry has received from all queries so far, summed over the
    GQA group."""
    return F.pad(c.stored, (0, c.n_new)) + c.received()


def snapkv(c: Chunk, window: int = 32, kernel: int = 7) -> torch.Tensor:
    """Attention from the chunk's last `window` queries, max-pooled over neighbouring keys, summed
    over the group."""
    votes = c.attention(last=min(window, c.n_new)).sum(dim=3)  # [B, KVH, G, S]
    pooled = F.max_pool1d(votes.flatten(0, 2)[:, None], kernel, stride=1, padding=kernel // 2)
    return pooled.view(votes.shape).sum(dim=2)


def tova(c: Chunk) -> torch.Tensor:
    """Attention from the chunk's last query, averaged over the query heads of each KV head."""
    return c.attention(last=1)[:, :, :, 0].mean(dim=2)


def knorm(c: Chunk) -> torch.Tensor:
    """Keys with a small L2 norm draw more attention: score -||k||."""
    return c.append(-c.k[:, :, -c.n_new:].float().norm(dim=-1))


class Random:
    """Uniform random scores, seeded: the floor any policy should beat."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, c: Chunk) -> torch.Tensor:
        B, KVH, T = c.stored.shape[0], c.stored.shape[1], c.n_new
        return c.append(torch.rand(B, KVH, T, generator=self.generator).to(c.stored.device))


class Precomputed:
    """Scores known in advance, [L, B, KVH, P] by layer and prompt position: an oracle's labels
    standing in for the heads (bench/sensitivity.py --oracle). Each new entry gets its token's
    score in its layer, taken best_within `span` in its chunk as the heads' scores are."""

    def __init__(self, scores: torch.Tensor, span: int = 1):
        self.scores, self.span = scores, span

    def __call__(self, c: Chunk) -> torch.Tensor:
        new = self.scores[c.layer].gather(-1, c.index[..., -c.n_new:]).float()
        return c.append(best_within(new, self.span))


EVICTING = {"locret": locret, "streamingllm": streamingllm, "h2o": h2o, "snapkv": snapkv,
            "tova": tova, "knorm": knorm, "random": Random}
POLICIES = ["full", *EVICTING]
# score from softmax attention weights: Chunk.attention_rows
READS_ATTENTION = ("h2o", "snapkv", "tova")


def make_policy(name: str, seed: int = 0, span: int = 1):
    """The scoring function of `name`; None for `full`, which never evicts."""
    if name == "full":
        return None
    if name not in EVICTING:
        raise LocretError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    if name == "locret" and span > 1:
        return partial(locret, span=span)
    return Random(seed) if name == "random" else EVICTING[name]
