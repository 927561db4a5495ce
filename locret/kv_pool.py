"""The KV pool of the global layers: every buffer a generation needs, allocated once with static
shapes (sliding-window layers keep only their window, window_pool.py).

Per global layer (config.global_layers): K and V [batch, kv_heads, capacity, head_dim], one score
per entry (what the policy said it is worth) and the prompt index of the token it holds; K before
RoPE in compact mode with eviction, else rotated (engine.py); in compact mode one more buffer takes
a layer's keys turned to their slots at each forward. Only KV heads are stored. New entries are
written into the free tail; eviction keeps the top entries per KV head, in their original order,
gathered into the front of the same buffers through a preallocated scratch. With `int8`, K and V
are stored as int8 with an fp16 scale per group of values (int8.py) and each read dequantizes one
layer's into preallocated buffers in the model's dtype."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models import ModelConfig

from .errors import LocretError
from .int8 import SCALE_DTYPE, dequantize, group_size, quantize
from .ranking import shared_rank

if TYPE_CHECKING:  # importing it loads torch._dynamo (~1.5 s at every start): done on first use
    from torch.nn.attention.bias import CausalBias

POOL_TENSORS = ("k", "v", "scores", "index")  # what `stored()` names, and a saved context holds
SCALE_TENSORS = ("k_scale", "v_scale")  # and, in an int8 pool, these


class KVPool:
    def __init__(self, config: ModelConfig, capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 int8: bool = False, turned_keys: bool = False):
        self.layers = config.global_layers  # the model's layers, one per row
        L, H, D = len(self.layers), config.num_key_value_heads, config.head_dim
        batch = 1  # one sequence: the model's [B, KVH, T, D] layout
        stored = torch.int8 if int8 else dtype
        self.k = torch.zeros(L, batch, H, capacity, D, dtype=stored, device=device)
        self.v = torch.zeros(L, batch, H, capacity, D, dtype=stored, device=device)
        self.scores = torch.zeros(L, batch, H, capacity, dtype=torch.float32, device=device)
        self.index = torch.zeros(L, batch, H, capacity, dtype=torch.int64, device=device)
        # one layer's K or V
        self.scratch = torch.zeros(batch, H, capacity, D, dtype=stored, device=device)
        scales = lambda: torch.zeros(L, batch, H, capacity, D // group_size(D), dtype=SCALE_DTYPE,
                                     device=device)
        self.scales = (scales(), scales()) if int8 else ()  # int8: K's and V's scales per group
        layer_buffer = lambda dtype: torch.zeros(batch, H, capacity, D, dtype=dtype, device=device)
        # int8: one layer's K or V dequantized in fp32, then its K, V read back in `dtype`
        self.work = layer_buffer(torch.float32) if int8 else None
        self.dequantized = (layer_buffer(dtype), layer_buffer(dtype)) if int8 else ()
        # compact mode: one layer's keys turned to their slots, in the model's dtype
        # (None: keys are stored rotated)
        self.turned = layer_buffer(dtype) if turned_keys else None
        self.capacity, self.dtype = capacity, dtype
        self.length = 0  # filled entries, the same in every layer and head
        self.seen = 0  # tokens written so far: the prompt index of the next one

    @staticmethod
    def bytes_needed(config: ModelConfig, capacity: int, dtype: torch.dtype,
                     int8: bool = False, turned_keys: bool = False) -> int:
        """What the constructor allocates, known before anything runs."""
        L, H, D = len(config.global_layers), config.num_key_value_heads, config.head_dim
        layer = H * capacity * D  # values in one layer's K or V
        kv = (2 * L + 1) * layer * (1 if int8 else dtype.itemsize)  # K, V and the scratch
        scales = 2 * L * layer // group_size(D) * SCALE_DTYPE.itemsize if int8 else 0
        # the fp32 work buffer, K and V dequantized
        read_back = layer * (4 + 2 * dtype.itemsize) if int8 else 0
        turned = layer * dtype.itemsize if turned_keys else 0
        scores_and_index = L * H * capacity * (4 + 8)  # fp32, int64
        return kv + scales + read_back + turned + scores_and_index

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the pool allocated."""
        every = (self.k, self.v, self.scores, self.index, self.scratch, *self.scales, self.work,
                 *self.dequantized, self.turned)
        return [t for t in every if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.buffers())

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KVH, T, D] after the filled entries; return K, V [B, KVH, length + T, D].
        """
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise LocretError(f"KV pool full: {end} entries needed, capacity {self.capacity}")
        new = slice(self.length, end)
        if self.scales:
            for buf, scale, x in zip((self.k, self.v), self.scales, (k, v)):
                buf[layer, :, :, new], scale[layer, :, :, new] = quantize(x)
        else:
            self.k[layer, :, :, new], self.v[layer, :, :, new] = k, v
        self.index[layer, :, :, new] = torch.arange(self.seen, self.seen + T, device=k.device)
        return self.read(layer, end)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`'s first `end` K, V [B, KVH, end, D] in the model's dtype (int8: dequantized
        into buffers that the next read overwrites)."""
        k, v = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if not self.scales:
            return k, v
        work = self.work[:, :, :end]
        return tuple(dequantize(t, scale[layer, :, :, :end], work, out[:, :, :end])
                     for t, scale, out in zip((k, v), self.scales, self.dequantized))

    def attention_mask(self, n_new: int) -> CausalBias | None:
        """New tokens see all filled entries and, causally, each other: a lower-right causal bias
        over [n_new, length + n_new], never materialised. None when the pool is empty (plain
        causal attention) or for one new token (it sees every entry)."""
        if self.length == 0 or n_new == 1:
            return None
        from torch.nn.attention.bias import causal_lower_right
        return causal_lower_right(n_new, self.length + n_new)

    def stored(self) -> dict[str, torch.Tensor]:
        """Every per-layer buffer but the scratch, by name: k, v [L, B, KVH, capacity, D],
        scores, index [L, B, KVH, capacity] and, int8, k_scale, v_scale
        [L, B, KVH, capacity, D // group]."""
        buffers = (self.k, self.v, self.scores, self.index, *self.scales)
        return dict(zip(POOL_TENSORS + SCALE_TENSORS, buffers))

    def load(self, saved: dict[str, torch.Tensor], seen: int) -> None:
        """Fill the front with saved entries (`stored()`'s names, n entries each)."""
        n = saved["k"].shape[3]
        for name, buf in self.stored().items():
            buf[:, :, :, :n] = saved[name]
        self.length, self.seen = n, seen

    def advance(self, n: int) -> None:
        """Mark the n entries written by the last forward as filled."""
        self.length += n
        self.seen += n

    def evict(self, keep: int, protect: int, shared: bool = False,
              ranking_layers: slice = slice(None)) -> torch.Tensor:
        """Keep, per layer and KV head, the `keep` best-scored entries, always counting the last
        `protect` (the stabilizers) among them; `shared`: the same entries in every layer and KV
        head, the best by mean percentile rank over the `ranking_layers` (ranking.py). Returns
        the kept entries' old slots [L, B, KVH, keep]."""
        n, (L, _, H) = self.length, self.scores.shape[:3]
        scores = self.scores[:, :, :, :n]
        # [1, B, 1, n] (one ranking for all) or [L, B, KVH, n]
        ranked = shared_rank(scores[ranking_layers])[None, :, None] if shared else scores.clone()
        # on a copy: the stabilizers keep their real score
        ranked[..., max(n - protect, 0):] = float("inf")
        kept = ranked.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values  # original order
        kept = kept.expand(L, -1, H, -1)
        for layer in range(L):
            self.gather_front(layer, kept[layer])
        self.length = keep
        return kept

    def gather_front(self, layer: int, slots: torch.Tensor) -> None:
        """Move the entries at `slots` [B, KVH, keep] (ascending) to the front of `layer`'s
        buffers. Whole rows are copied by their flat index: several times faster than gathering
        element by element."""
        B, H, keep = slots.shape
        row_starts = self.capacity * torch.arange(B * H, device=slots.device).view(B, H, 1)
        rows = (slots + row_starts).view(-1)  # [B*KVH*keep]
        for buf in (self.k[layer], self.v[layer]):
            D = buf.shape[-1]
            front = self.scratch.view(-1)[:rows.numel() * D].view(-1, D)  # [B*KVH*keep, D]
            torch.index_select(buf.view(-1, D), 0, rows, out=front)
            buf[:, :, :keep] = front.view(B, H, keep, D)
        small = (self.scores[layer], self.index[layer], *(scale[layer] for scale in self.scales))
        for buf in small:
            by_row = buf.reshape(B * H * self.capacity, -1)
            buf[:, :, :keep] = by_row[rows].view_as(buf[:, :, :keep])
