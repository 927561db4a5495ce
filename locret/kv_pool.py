"""A KV cache allocated once, with static shapes: per layer K and V of [batch, kv_heads, capacity, head_dim].
New entries are written into the free tail in place; attention reads a view of the filled front."""
import torch

from models import ModelConfig

from .errors import LocretError


class KVPool:
    def __init__(self, config: ModelConfig, capacity: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # filled entries, the same in every layer

    @staticmethod
    def bytes_needed(config: ModelConfig, capacity: int, batch: int, dtype: torch.dtype) -> int:
        per_entry = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_entry * batch * capacity * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, layer, q, k, v, scores):
        """Write k, v [B, KVH, T, D] after the filled entries; return K, V [B, KVH, length + T, D]."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise LocretError(f"KV pool full: {end} entries needed, capacity {self.capacity}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        """[n_new, length + n_new] bool: new tokens see all filled entries and, causally, each other.
        None when the pool is empty: plain causal attention."""
        if self.length == 0:
            return None
        device = self.k.device
        keys = torch.arange(self.length + n_new, device=device)
        return keys[None, :] <= self.length + torch.arange(n_new, device=device)[:, None]

    def advance(self, n: int) -> None:
        """Mark the entries written by the last forward as filled."""
        self.length += n
