"""The sliding-window layers' KV: what a query of such a layer can still see, nothing more.

A query sees its own key and the `window - 1` before it, so each sliding-window layer keeps the
last `window - 1` entries plus `room` for what comes next (a forward, or a question and its
answer), in buffers allocated once: [layers, B, KVH, window - 1 + room, D]. Entries stay in
prompt order, front-compacted: when a forward would not fit, the last `window - 1` slide to the
front. Keys are stored before RoPE and turned to their slots 0..n-1 at each use, so a slide never
re-rotates them and positions stay small however long the stream. Nothing is scored or evicted by
a policy: the budget and the retaining heads are the global layers' (kv_pool.py)."""
import torch

from models.base import window_mask
from models.rope import apply_rope

from .errors import LocretError


class WindowPool:
    def __init__(self, layers: list[int], kv_heads: int, head_dim: int, window: int, room: int,
                 slot_rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        self.layers = layers  # the model's sliding-window layers, one per row
        self.keep, self.window = window - 1, window
        self.capacity = self.keep + room
        shape = (len(layers), 1, kv_heads, self.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # one layer's keys turned to their slots; the scratch of a slide
        self.turned = torch.zeros(shape[1:], dtype=dtype, device=device)
        self.cos, self.sin = slot_rope  # [capacity, rotary dim]: slots 0..capacity-1
        self.length = 0  # filled entries, the same in every layer
        self.slides = 0

    @staticmethod
    def bytes_needed(layers: int, kv_heads: int, head_dim: int, window: int, room: int,
                     dtype: torch.dtype) -> int:
        """What the constructor allocates: K, V, the turned keys and the slot RoPE table."""
        capacity = window - 1 + room
        per_layer = kv_heads * capacity * head_dim * dtype.itemsize
        return (2 * layers + 1) * per_layer + 2 * capacity * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.turned, self.cos, self.sin))

    def make_room(self, n_new: int) -> None:
        """Before a forward of `n_new` tokens: slide the last window - 1 entries to the front if
        the new ones would not fit after them all."""
        if self.length + n_new <= self.capacity:
            return
        if self.keep + n_new > self.capacity:
            raise LocretError(f"{n_new} tokens in one forward do not fit the sliding-window "
                              f"layers' {self.capacity - self.keep} free entries")
        first = self.length - self.keep  # entries before it no query can see again
        for buffers in (self.k, self.v):
            for layer in buffers:  # [B, KVH, capacity, D], through the scratch: they overlap
                self.turned[:, :, :self.keep] = layer[:, :, first:self.length]
                layer[:, :, :self.keep] = self.turned[:, :, :self.keep]
        self.length, self.slides = self.keep, self.slides + 1

    def view(self, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' slots [n_new] and what each sees of the filled entries and the new
        ones, [n_new, length + n_new] (KVCache.window_view)."""
        slots = torch.arange(self.length + n_new, device=self.k.device)
        return slots[self.length:], window_mask(slots[self.length:], slots, self.window)

    def write(self, row: int, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k (before RoPE), v [B, KVH, T, D] after the filled entries of the `row`-th
        sliding-window layer; return its keys turned to their slots and values,
        [B, KVH, length + T, D] (the keys in a buffer the next write overwrites)."""
        end = self.length + k.shape[2]
        self.k[row, :, :, self.length:end], self.v[row, :, :, self.length:end] = k, v
        turned = self.turned[:, :, :end]
        return apply_rope(self.k[row, :, :, :end], self.cos[:end], self.sin[:end], out=turned), \
            self.v[row, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the front with saved entries k, v [layers, B, KVH, n, D]."""
        n = k.shape[3]
        self.k[:, :, :, :n], self.v[:, :, :, :n] = k, v
        self.length = n
