"""Int8 storage for the KV pool: each entry (one token's vector in one KV head) is split into
groups of up to 16 values, each group scaled by its own absolute maximum (an fp16 scale), so an
outlier channel or token costs only its own group precision. 1.125 bytes per value: 56% of bf16."""
import math

import torch

GROUP = 16  # values per scale, at most
SCALE_DTYPE = torch.float16
SMALLEST_SCALE = torch.finfo(SCALE_DTYPE).smallest_normal


def group_size(head_dim: int) -> int:
    return math.gcd(head_dim, GROUP)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 values [..., D], fp16 scales [..., D // group]); x = values * scale to
    within scale / 2 (a scale is at least fp16's smallest normal, so an all-zero group stays zero).
    """
    D = x.shape[-1]
    groups = x.float().unflatten(-1, (D // group_size(D), group_size(D)))  # [..., D // g, g]
    largest = torch.finfo(SCALE_DTYPE).max
    scale = (groups.abs().amax(dim=-1) / 127).clamp(SMALLEST_SCALE, largest).to(SCALE_DTYPE)
    values = (groups / scale[..., None].float()).round().clamp(-127, 127).to(torch.int8)
    return values.flatten(-2), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, work: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `quantize`: int8 [..., D] and fp16 scales [..., D // g] -> values x scale,
    computed in `work` (fp32, the values' shape) and copied into `out` (any dtype) if given, with
    no cache-sized temporaries."""
    work.copy_(values)
    # [..., D // g, g] x [..., D // g, 1]
    work.unflatten(-1, (scale.shape[-1], -1)).mul_(scale[..., None].float())
    return work if out is None else out.copy_(work)
