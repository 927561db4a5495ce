"""Int8 storage for the KV pool: each entry (one token's vector in one KV head) is scaled by its own
absolute maximum, so one outlier token costs no other entry precision. 1 byte per value plus one fp32
scale per entry: about half the bytes of bf16 at head_dim 64 and more."""
import torch


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 values [..., D], fp32 scales [...]); x = values * scale to within scale / 2."""
    scale = x.float().abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    values = (x.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return values, scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`: int8 [..., D] and fp32 scales [...] -> [..., D] in `dtype`."""
    return (values.float() * scale[..., None]).to(dtype)
