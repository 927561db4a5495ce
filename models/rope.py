"""Rotary position embeddings in Hugging Face's rotate-half layout, with the scaling variants
`default`, `linear`, `llama3` (Llama 3.1+) and `longrope` (Phi-3)."""
import math

import torch
from torch import nn

from .config import RopeConfig


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between."""
    inv_freq = default_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = ((old_len / wavelen - rope.low_freq_factor)
              / (rope.high_freq_factor - rope.low_freq_factor))
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def longrope_inv_freq(rope: RopeConfig, dim: int, ext_factors: list[float]) -> torch.Tensor:
    if len(ext_factors) != dim // 2:
        raise ValueError(f"longrope needs {dim // 2} short and long factors (one per frequency), "
                         f"not {len(ext_factors)}")
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32) * rope.theta**shape)


def longrope_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(inv_freq within the original context, inv_freq beyond it, cos/sin scaling)."""
    if rope.rope_type == "default":
        inv_freq = default_inv_freq(rope.theta, dim)
        return inv_freq, inv_freq, 1.0
    if rope.rope_type == "linear":
        inv_freq = default_inv_freq(rope.theta, dim) / rope.factor
        return inv_freq, inv_freq, 1.0
    if rope.rope_type == "llama3":
        inv_freq = llama3_inv_freq(rope, dim)
        return inv_freq, inv_freq, 1.0
    if rope.rope_type == "longrope":
        short = longrope_inv_freq(rope, dim, rope.short_factor)
        long = longrope_inv_freq(rope, dim, rope.long_factor)
        return short, long, longrope_attention_factor(rope)
    raise ValueError(f"unsupported rope type {rope.rope_type!r} "
                     "(supported: default, linear, llama3, longrope)")


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.dim = int(head_dim * rope.partial_rotary_factor)
        # Longrope uses its long factors for sequences longer than the original context, its short
        # ones otherwise.
        self.switch_length = (rope.original_max_position_embeddings
                              if rope.rope_type == "longrope" else None)
        short, long, self.scaling = inverse_frequencies(rope, self.dim)
        self.register_buffer("inv_freq", short, persistent=False)
        self.register_buffer("long_inv_freq", long, persistent=False)

    def angles(self, positions: torch.Tensor,
               seq_len: torch.Tensor | int | None = None) -> torch.Tensor:
        """positions [...] (int, any shape) -> rotation angles [..., dim] in float32.

        `seq_len` (default: max position + 1) picks longrope's short or long factors."""
        inv_freq = self.inv_freq
        if self.switch_length is not None:
            seq_len = positions.max() + 1 if seq_len is None else seq_len
            inv_freq = torch.where(torch.as_tensor(seq_len > self.switch_length),
                                   self.long_inv_freq, self.inv_freq)
        freqs = positions[..., None].float() * inv_freq  # [..., dim/2]
        return torch.cat((freqs, freqs), dim=-1)

    def forward(self, positions: torch.Tensor,
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, dim] in float32, scaled by longrope's attention factor.
        `seq_len` (default: max position + 1) picks longrope's frequencies, as in `angles`."""
        angles = self.angles(positions, seq_len)
        return angles.cos() * self.scaling, angles.sin() * self.scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x [..., T, head_dim] by cos, sin [..., T, dim],
    whose two halves repeat (RotaryEmbedding's angles): Hugging Face's
    x * cos + rotate_half(x) * sin, the same values. With `out` (x's shape, not overlapping it)
    the result is written there with no temporaries, for inference (out= takes no gradients; in
    bf16 it rounds once less)."""
    dim = cos.shape[-1]
    half = dim // 2
    x1, x2, c, s = x[..., :half], x[..., half:dim], cos[..., :half], sin[..., :half]
    if out is None:
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., dim:]), dim=-1)
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, c, out=out[..., half:dim]).addcmul_(x1, s)  # x2 cos + x1 sin
    out[..., dim:] = x[..., dim:]
    return out
