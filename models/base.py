"""The shared transformer: RMSNorm, GQA attention with an optional retaining head, the decoder block
and the causal LM. Families (llama.py, phi3.py) supply only their q/k/v and MLP projections."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # importing it loads torch._dynamo (~1.5 s at every start)
    from torch.nn.attention.bias import CausalBias

from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rope


class KVCache(Protocol):
    """What attention needs from a cache: store the new keys/values, return all to attend over."""
    # whether update() may use the retaining heads' scores this forward (if not, none are computed)
    scoring: bool

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scores: torch.Tensor | None,
               rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q rotated, k before RoPE (`rope` = the new tokens' cos, sin) -> every key, rotated, and
        value."""

    def attention_mask(self, n_new: int) -> CausalBias | None:
        """A lower-right causal bias over [n_new, keys] (never materialised: the new tokens, the
        last n_new keys, see every key before them and, causally, each other), or None (plain
        causal attention, or one new token seeing every key)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # normalise in fp32, as the reference does
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RetainingHead(nn.Module):
    """Locret's scorer: fc2(silu(fc1(cat(q, k, v)))) -> a score per KV head and token."""

    def __init__(self, in_features: int, hidden: int, n_kv_heads: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, n_kv_heads, bias=False)
        for w in (self.fc1.weight, self.fc2.weight):
            nn.init.normal_(w, mean=0.0, std=0.02)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [B, T, in_features] (before RoPE) -> scores [B, KVH, T]."""
        return self.fc2(F.silu(self.fc1(qkv))).transpose(1, 2)


def cached_then_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A chunk's attention on CPU, with no mask: q [B, H, T, D] sees the first S - T of
    k, v [B, KVH, S, D] (the cache) all and the last T (its own) causally. Each part runs in sdpa's
    CPU flash kernel, merged by their log-sum-exps. No [T, S] mask is made, and at 512 queries over
    2048 entries it runs 6% faster than sdpa with one (docs/performance.md)."""
    (B, H, T, D), KVH = q.shape, k.shape[1]
    G, past = H // KVH, k.shape[2] - T
    # sdpa's CPU kernel, with its log-sum-exp
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # every query sees the whole cache: a KV head's G query heads run as one block of G*T queries
    # -> [B, KVH, G*T, D], [B, KVH, G*T]
    cached, cached_lse = flash(q.reshape(B, KVH, G * T, D), k[:, :, :past], v[:, :, :past])
    own, own_lse = flash(q, k[:, :, past:].repeat_interleave(G, 1),
                         v[:, :, past:].repeat_interleave(G, 1),
                         is_causal=True)  # [B, H, T, D], [B, H, T]
    # the cache's share of each query's softmax mass
    cached_share = torch.sigmoid(cached_lse.reshape(B, H, T) - own_lse)[..., None]
    return own.float().lerp_(cached.reshape(B, H, T, D).float(), cached_share).to(q.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: CausalBias | None,
           causal: bool) -> torch.Tensor:
    """sdpa with GQA: q [B, H, T, D], k, v [B, KVH, S, D] -> [B, H, T, D]; `mask`: a chunk after
    cached keys (KVCache.attention_mask). CUDA takes that bias in its flash kernel; CPU splits
    the chunk's attention (cached_then_causal). One bf16 query on CPU (a decoding step) attends
    in fp32: CPU sdpa runs it about 4x slower in bf16 (README: Performance)."""
    on_cpu = q.device.type == "cpu"
    if q.shape[2] == 1 and q.dtype == torch.bfloat16 and on_cpu:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=True).to(q.dtype)
    if mask is not None and on_cpu:
        return cached_then_causal(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=True)


class Attention(nn.Module):
    """Causal GQA attention. Subclasses define `project(x) -> q, k, v`, flat and before RoPE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size,
                                bias=config.o_bias)
        self.retaining_head: RetainingHead | None = None  # attached by CausalLM.add_retaining_heads

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, mask: CausalBias | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)  # [B, T, H*D], [B, T, KVH*D], [B, T, KVH*D]
        scoring = self.retaining_head is not None and cache is not None and cache.scoring
        scores = self.retaining_head(torch.cat((q, k, v), dim=-1)) if scoring else None
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        q = apply_rope(q, cos, sin)
        if cache is None:
            k = apply_rope(k, cos, sin)
        else:  # the cache decides how keys are stored; it returns them rotated
            # [B, KVH, S, D]: cached + these T
            k, v = cache.update(self.layer_idx, q, k, v, scores, (cos, sin))
        # no mask: causal among the new tokens; a single one sees every key
        causal = mask is None and T > 1
        y = attend(q, k, v, mask, causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, attention_cls: type, mlp_cls: type):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_cls(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp_cls(config)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, attention_cls: type, mlp_cls: type):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, i, attention_cls, mlp_cls) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim)


class CausalLM(nn.Module):
    """Decoder-only LM with Hugging Face parameter names. Subclasses set `attention_cls`,
    `mlp_cls`."""
    attention_cls: type
    mlp_cls: type

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config, self.attention_cls, self.mlp_cls)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                rope_length: int | None = None) -> torch.Tensor:
        """tokens [B, T] at `positions` [T] (default 0..T-1) -> logits [B, T, V]
        ([B, 1, V] if last_only).

        With a cache, the tokens attend to the cached entries plus themselves (causally).
        `rope_length` picks longrope's frequencies (default: max position + 1); a generation
        passes one value throughout."""
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        mask = None if cache is None else cache.attention_mask(T)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(positions, x.dtype, rope_length)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype, rope_length: int | None = None):
        """cos, sin [T, dim] for `positions` [T], in `dtype`."""
        return tuple(t.to(dtype) for t in self.model.rotary_emb(positions, rope_length))

    @property
    def retaining_heads(self) -> list[RetainingHead | None]:
        return [layer.self_attn.retaining_head for layer in self.model.layers]

    def add_retaining_heads(self, hidden: int) -> None:
        """Attach a fresh retaining head (normal(0, 0.02) init) to every attention layer."""
        p = self.lm_head.weight
        for layer in self.model.layers:
            head = RetainingHead(self.config.qkv_size, hidden, self.config.num_key_value_heads)
            layer.self_attn.retaining_head = head.to(device=p.device, dtype=p.dtype)
