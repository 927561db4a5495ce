"""Phi-3 / Phi-3.5 mini: Llama's block with fused `qkv_proj` and `gate_up_proj`, longrope RoPE."""
from torch import nn

from .base import ACTIVATIONS, Attention, CausalLM
from .config import ModelConfig


class Phi3Attention(Attention):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.qkv_proj = nn.Linear(config.hidden_size, config.qkv_size, bias=False)
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim

    def project(self, x):
        return self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class Phi3MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3(CausalLM):
    attention_cls = Phi3Attention
    mlp_cls = Phi3MLP
