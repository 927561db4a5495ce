"""The KV pool: every buffer a generation needs, allocated once with static shapes.

Per layer: K and V [batch, kv_heads, capacity, head_dim], one score per entry (what the policy
said it is worth) and the prompt index of the token it holds; K before RoPE in compact mode with
eviction, else rotated (engine.py). Only KV heads are stored. New
entries are written into the free tail; eviction keeps the top entries per KV head, in their
original order, gathered into the front of the same buffers through a preallocated scratch."""
import torch

from models import ModelConfig

from .errors import LocretError
from .ranking import shared_rank


class KVPool:
    def __init__(self, config: ModelConfig, capacity: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        self.k = torch.zeros(L, batch, H, capacity, D, dtype=dtype, device=device)
        self.v = torch.zeros(L, batch, H, capacity, D, dtype=dtype, device=device)
        self.scores = torch.zeros(L, batch, H, capacity, dtype=torch.float32, device=device)
        self.index = torch.zeros(L, batch, H, capacity, dtype=torch.int64, device=device)
        self.scratch = torch.zeros(batch, H, capacity, D, dtype=dtype, device=device)  # one layer's K or V
        self.capacity = capacity
        self.length = 0  # filled entries, the same in every layer and head
        self.seen = 0  # tokens written so far: the prompt index of the next one

    @staticmethod
    def bytes_needed(config: ModelConfig, capacity: int, batch: int, dtype: torch.dtype) -> int:
        """What the constructor allocates, known before anything runs."""
        L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        kv = (2 * L + 1) * batch * H * capacity * D * dtype.itemsize  # K, V and the scratch
        return kv + L * batch * H * capacity * (4 + 8)  # scores (fp32) and token indices (int64)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.scores, self.index, self.scratch))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KVH, T, D] after the filled entries; return K, V [B, KVH, length + T, D]."""
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise LocretError(f"KV pool full: {end} entries needed, capacity {self.capacity}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        self.index[layer, :, :, self.length:end] = torch.arange(self.seen, self.seen + T, device=k.device)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        """[n_new, length + n_new] bool: new tokens see all filled entries and, causally, each other.
        None when the pool is empty (plain causal attention) or for one new token (it sees every entry):
        without a mask, sdpa can pick its fused kernels (on CUDA, none takes a mask together with GQA)."""
        if self.length == 0 or n_new == 1:
            return None
        device = self.k.device
        keys = torch.arange(self.length + n_new, device=device)
        return keys[None, :] <= self.length + torch.arange(n_new, device=device)[:, None]

    def load(self, saved: dict[str, torch.Tensor], seen: int) -> None:
        """Fill the front with saved entries: k, v [L, B, KVH, n, D], scores, index [L, B, KVH, n]."""
        n = saved["k"].shape[3]
        for name in ("k", "v", "scores", "index"):
            getattr(self, name)[:, :, :, :n] = saved[name]
        self.length, self.seen = n, seen

    def advance(self, n: int) -> None:
        """Mark the n entries written by the last forward as filled."""
        self.length += n
        self.seen += n

    def evict(self, keep: int, protect: int, shared: bool = False,
              ranking_layers: slice = slice(None)) -> torch.Tensor:
        """Keep, per layer and KV head, the `keep` best-scored entries, always counting the last
        `protect` (the stabilizers) among them; `shared`: the same entries in every layer and KV head,
        the best by mean percentile rank over the `ranking_layers` (ranking.py). Returns the kept entries'
        old slots [L, B, KVH, keep]."""
        n, (L, _, H) = self.length, self.scores.shape[:3]
        scores = self.scores[:, :, :, :n]
        # [1, B, 1, n] (one ranking for all) or [L, B, KVH, n]
        ranked = shared_rank(scores[ranking_layers])[None, :, None] if shared else scores.clone()
        ranked[..., max(n - protect, 0):] = float("inf")  # on a copy: stabilizers keep their real score
        kept = ranked.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values  # original order
        kept = kept.expand(L, -1, H, -1)
        for layer in range(L):
            self.gather_front(layer, kept[layer])
        self.length = keep
        return kept

    def gather_front(self, layer: int, slots: torch.Tensor) -> None:
        """Move the entries at `slots` [B, KVH, keep] (ascending) to the front of `layer`'s buffers."""
        keep = slots.shape[-1]
        rows = slots[..., None].expand(-1, -1, -1, self.k.shape[-1])  # [B, KVH, keep, D]
        for buf in (self.k[layer], self.v[layer]):
            scratch = self.scratch[:, :, :keep]
            torch.gather(buf, 2, rows, out=scratch)
            buf[:, :, :keep] = scratch
        for buf in (self.scores[layer], self.index[layer]):
            buf[..., :keep] = buf.gather(-1, slots)  # score-sized: no scratch needed
