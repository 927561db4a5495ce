"""The shared transformer: RMSNorm, GQA attention with an optional retaining head and QK-norm,
full or sliding-window layers, the decoder blocks and the causal LM. Families (llama.py, phi3.py,
gemma3.py) supply their q/k/v and MLP projections and, where they differ, norms and blocks."""
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

    def window_view(self, positions: torch.Tensor, window: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the sliding-window layers, given the new tokens' `positions` [T] in the global
        ones: their positions there [T] (their RoPE) and which of the keys update() returns each
        of them sees, [T, keys]; or None: the keys are the new tokens' own, at consecutive
        positions (sliding_window_attention)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # normalise in fp32, as the reference does
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalized(x).to(x.dtype)


# config.hidden_act -> the MLP's gate activation
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


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


def cached_then_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
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
    cached, cached_lse = flash(q.reshape(B, KVH, G * T, D), k[:, :, :past], v[:, :, :past],
                               scale=scale)
    own, own_lse = flash(q, k[:, :, past:].repeat_interleave(G, 1),
                         v[:, :, past:].repeat_interleave(G, 1),
                         is_causal=True, scale=scale)  # [B, H, T, D], [B, H, T]
    # the cache's share of each query's softmax mass
    cached_share = torch.sigmoid(cached_lse.reshape(B, H, T) - own_lse)[..., None]
    return own.float().lerp_(cached.reshape(B, H, T, D).float(), cached_share).to(q.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: CausalBias | None,
           causal: bool, scale: float | None = None) -> torch.Tensor:
    """sdpa with GQA and q.k scaled by `scale` (None: 1/sqrt(D)): q [B, H, T, D],
    k, v [B, KVH, S, D] -> [B, H, T, D]; `mask`: a chunk after cached keys
    (KVCache.attention_mask). CUDA takes that bias in its flash kernel; CPU splits the chunk's
    attention (cached_then_causal). One bf16 query on CPU (a decoding step) attends in fp32: CPU
    sdpa runs it about 4x slower in bf16 (README: Performance)."""
    on_cpu = q.device.type == "cpu"
    if q.shape[2] == 1 and q.dtype == torch.bfloat16 and on_cpu:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              scale=scale, enable_gqa=True).to(q.dtype)
    if mask is not None and on_cpu:
        return cached_then_causal(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=True)


def window_mask(queries: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """[T, S], True where query i sees key j: 0 <= queries[i] - keys[j] < window (positions)."""
    behind = queries[:, None] - keys[None, :]
    return (behind >= 0) & (behind < window)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             scale: float | None = None) -> torch.Tensor:
    """q [B, H, T, D] over k, v [B, KVH, T, D] of the same consecutive tokens, each query seeing
    itself and the window - 1 before it, in blocks of `window` queries over the keys they can see:
    O(T * window) time and memory, not O(T^2)."""
    T, blocks = q.shape[2], []
    for start in range(0, T, window):
        end, first = min(start + window, T), max(start - window + 1, 0)
        positions = torch.arange(first, end, device=q.device)
        mask = window_mask(positions[start - first:], positions, window)  # [end-start, end-first]
        blocks.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, first:end], v[:, :, first:end], attn_mask=mask,
            scale=scale, enable_gqa=True))
    return torch.cat(blocks, dim=2)


class Attention(nn.Module):
    """Causal GQA attention, over every earlier key or a sliding window of them. Subclasses define
    `project(x) -> q, k, v`, flat and before RoPE, and may set `q_norm`, `k_norm` (QK-norm: over
    each head's features, before RoPE)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale, self.window = config.attention_scale, config.window(layer_idx)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size,
                                bias=config.o_bias)
        self.retaining_head: RetainingHead | None = None  # attached by CausalLM.add_retaining_heads

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, mask: CausalBias | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)  # [B, T, H*D], [B, T, KVH*D], [B, T, KVH*D]
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        scoring = self.retaining_head is not None and cache is not None and cache.scoring
        scores = (self.retaining_head(torch.cat((q.flatten(2), k.flatten(2), v), dim=-1))
                  if scoring else None)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], [B, KVH, T, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, D]
        q = apply_rope(q, cos, sin)
        if cache is None:
            k = apply_rope(k, cos, sin)
        else:  # the cache decides how keys are stored; it returns them rotated
            # [B, KVH, S, D]: cached + these T
            k, v = cache.update(self.layer_idx, q, k, v, scores, (cos, sin))
        if self.window is not None and mask is None:  # no cache: k, v are these T tokens'
            y = sliding_window_attention(q, k, v, self.window, self.scale)
        elif self.window is not None:  # mask: which keys each query's window holds
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=True)
        else:  # no mask: causal among the new tokens; a single one sees every key
            y = attend(q, k, v, mask, mask is None and T > 1, self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). `family`: the CausalLM subclass."""

    def __init__(self, config: ModelConfig, layer_idx: int, family: type[CausalLM]):
        super().__init__()
        self.input_layernorm = family.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.self_attn = family.attention_cls(config, layer_idx)
        self.post_attention_layernorm = family.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.mlp = family.mlp_cls(config)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class SandwichBlock(Block):
    """Norms before and after both attention and the MLP (Gemma 2, 3). Here
    `post_attention_layernorm` normalises attention's output, not the MLP's input."""

    def __init__(self, config: ModelConfig, layer_idx: int, family: type[CausalLM]):
        super().__init__(config, layer_idx, family)
        self.pre_feedforward_layernorm = family.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = family.norm_cls(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, mask=None):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, family: type[CausalLM]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            family.block_cls(config, i, family) for i in range(config.num_hidden_layers))
        self.norm = family.norm_cls(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder-only LM with Hugging Face parameter names. Subclasses set `attention_cls`,
    `mlp_cls` and, where they differ, `norm_cls`, `block_cls`."""
    attention_cls: type
    mlp_cls: type
    norm_cls: type = RMSNorm
    block_cls: type = Block

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config, type(self))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.make_rope()
        self.tie_weights()

    def make_rope(self) -> None:
        """Build the RoPE tables. They are buffers no checkpoint holds: a model built on the meta
        device makes them again on its real one."""
        c = self.config
        self.model.rotary_emb = RotaryEmbedding(c.rope, c.head_dim)
        if c.has_windows:
            self.model.local_rotary_emb = RotaryEmbedding(c.local_rope or c.rope, c.head_dim)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                rope_length: int | None = None) -> torch.Tensor:
        """tokens [B, T] at `positions` [T] (default 0..T-1) -> logits [B, T, V]
        ([B, 1, V] if last_only).

        With a cache, the tokens attend to the cached entries plus themselves (causally); without,
        `positions` are consecutive (the sliding-window layers attend in blocks).
        `rope_length` picks longrope's frequencies (default: max position + 1); a generation
        passes one value throughout."""
        T, c = tokens.shape[1], self.config
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        x = self.embed(tokens)
        # each kind of layer's cos, sin, cache and mask, keyed by its window
        inputs = {None: (*self.rope(positions, x.dtype, rope_length), cache,
                         None if cache is None else cache.attention_mask(T))}
        if c.has_windows:
            local, mask = ((positions, None) if cache is None
                           else cache.window_view(positions, c.sliding_window))
            inputs[c.sliding_window] = (*self.rope(local, x.dtype, rope_length, local=True),
                                        cache, mask)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, *inputs[c.window(i)])
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype, rope_length: int | None = None,
             local: bool = False):
        """cos, sin [T, dim] for `positions` [T], in `dtype`, of the full-attention layers (of the
        sliding-window ones if `local`)."""
        rotary = self.model.local_rotary_emb if local else self.model.rotary_emb
        return tuple(t.to(dtype) for t in rotary(positions, rope_length))

    @property
    def global_attention(self) -> list[Attention]:
        """The attention of every layer that sees all earlier keys (config.global_layers)."""
        return [self.model.layers[i].self_attn for i in self.config.global_layers]

    @property
    def retaining_heads(self) -> list[RetainingHead | None]:
        """One per global layer (sliding-window layers evict nothing and have none)."""
        return [attention.retaining_head for attention in self.global_attention]

    def add_retaining_heads(self, hidden: int) -> None:
        """Attach a fresh retaining head (normal(0, 0.02) init) to every global layer."""
        p = self.lm_head.weight
        for attention in self.global_attention:
            head = RetainingHead(self.config.qkv_size, hidden, self.config.num_key_value_heads)
            attention.retaining_head = head.to(device=p.device, dtype=p.dtype)
