"""Gemma 3 text models (`gemma3_text`, e.g. Gemma 3 270M): Llama's projections and GeGLU MLP with
QK-norm, norms before and after attention and the MLP, RMSNorm scaling by (1 + weight), embeddings
scaled by sqrt(hidden_size), and sliding-window layers with their own RoPE base between the global
ones (config.layer_types)."""
import torch

from .base import CausalLM, RMSNorm, SandwichBlock
from .config import ModelConfig
from .llama import LlamaAttention, LlamaMLP


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaling by (1 + weight), in fp32: checkpoints store the scale minus one."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalized(x) * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.q_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps)


class Gemma3(CausalLM):
    attention_cls = Gemma3Attention
    mlp_cls = LlamaMLP  # its activation is config.hidden_act: gelu_pytorch_tanh
    norm_cls = GemmaRMSNorm
    block_cls = SandwichBlock

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(tokens)
        # the scale is rounded to the model's dtype first, as in the reference
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(x.dtype)
