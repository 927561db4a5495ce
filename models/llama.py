"""Llama 2 / 3 / 3.1 / 3.2 and relatives of its layout (SmolLM2, Mistral, Qwen2: q/k/v bias)."""
from torch import nn

from .base import ACTIVATIONS, Attention, CausalLM
from .config import ModelConfig


class LlamaAttention(Attention):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=config.qkv_bias)

    def project(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Llama(CausalLM):
    attention_cls = LlamaAttention
    mlp_cls = LlamaMLP
