"""Parity of models/ with transformers on tiny random configs: logits equal to 1e-5 in fp32."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from conftest import longrope, tiny_llama_config, tiny_phi3_config, tiny_qwen2_config
from locret.engine import PolicyCache
from locret.kv_pool import KVPool
from locret.loading.weights import load_model
from models import config_from_hf
from models.base import attend
from models.rope import apply_rope

CONFIGS = {
    "llama": lambda: tiny_llama_config(),
    "llama-tied": lambda: tiny_llama_config(tie_word_embeddings=True),
    "llama3-scaling": lambda: tiny_llama_config(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "linear-scaling": lambda: tiny_llama_config(rope_scaling={"rope_type": "linear",
                                                              "factor": 4.0}),
    "attention-bias": lambda: tiny_llama_config(attention_bias=True),
    "qwen2-qkv-bias": lambda: tiny_qwen2_config(tie_word_embeddings=False),
    "phi3": lambda: tiny_phi3_config(),
    "phi3-longrope": lambda: tiny_phi3_config(**longrope(original_max=32)),
}


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("length", [20, 48])  # the longrope model switches factors past 32 tokens
def test_logits_match_transformers(save_hf, name, length):
    hf, folder = save_hf(CONFIGS[name]())
    ours = load_model(folder)
    tokens = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(hf, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "phi3", "qwen2-qkv-bias"])
def test_prefill_then_decode_equals_one_forward(save_hf, name):
    _, folder = save_hf(CONFIGS[name]())
    model = load_model(folder)
    tokens = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    pool = KVPool(model.config, capacity=24)
    cache = PolicyCache(pool, policy=None)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :16], torch.arange(16), cache)]
        pool.advance(16)
        for t in range(16, 24):
            steps.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache))
            pool.advance(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def classic_config(cfg: dict) -> dict:
    """Rewrite transformers' newer `rope_parameters` into the hub's classic rope_theta +
    rope_scaling keys."""
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    params.pop("partial_rotary_factor", None)
    if cfg["model_type"] == "phi3":
        cfg["original_max_position_embeddings"] = params.pop("original_max_position_embeddings",
                                                             4096)
    rope_type = params.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
    return cfg


@pytest.mark.parametrize("name", ["llama3-scaling", "phi3-longrope", "llama"])
def test_classic_and_new_rope_config_styles_agree(save_hf, name):
    hf, folder = save_hf(CONFIGS[name]())
    new_style = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in new_style
    classic = classic_config(dict(new_style))
    assert config_from_hf(classic) == config_from_hf(new_style)
    (folder / "config.json").write_text(json.dumps(classic))
    tokens = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(tokens), hf_logits(hf, tokens),
                                   atol=1e-5, rtol=0)


def test_phi3_real_config_reads_longrope():
    """The hub's Phi-3-mini-128k config.json keys (classic style, values abridged)."""
    cfg = {"model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
           "intermediate_size": 8192,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
           "rope_theta": 10000.0,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                            "long_factor": [2.0] * 48}}
    config = config_from_hf(cfg)
    assert config.rope.rope_type == "longrope"
    assert config.rope.original_max_position_embeddings == 4096
    assert config.rope.factor == 32.0
    assert config.qkv_size == 9216  # the retaining head's input width in the paper


def test_retaining_heads_are_optional_and_score_each_kv_head(save_hf):
    _, folder = save_hf(CONFIGS["phi3"]())
    model = load_model(folder)
    assert model.retaining_heads == [None, None]
    model.add_retaining_heads(hidden=32)
    head = model.retaining_heads[0]
    assert head.fc1.weight.shape == (32, model.config.qkv_size) and head.fc2.weight.shape == (2, 32)
    # normal(0, 0.02), not the official Phi-3 zero init
    assert 0.015 < head.fc1.weight.std().item() < 0.025

    class Recorder:
        scores, scoring = {}, True

        def update(self, layer, q, k, v, scores, rope):
            self.scores[layer] = scores
            return apply_rope(k, *rope), v

        def attention_mask(self, n_new):
            return None

    tokens = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        logits_with_heads = model(tokens, cache=Recorder())
    assert Recorder.scores[1].shape == (1, 2, 10)  # [batch, kv_heads, tokens]
    for layer in model.model.layers:
        layer.self_attn.retaining_head = None
    with torch.no_grad():
        # heads never change logits
        torch.testing.assert_close(model(tokens), logits_with_heads, atol=0, rtol=0)


def test_one_bf16_query_on_cpu_attends_in_fp32():
    """A decoding step in bf16 on CPU attends in fp32 (CPU sdpa is slow in bf16 there): its output
    is the float64 reference rounded once to bf16, and multi-query chunks still use the model
    dtype's sdpa."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, False)
    assert out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.bfloat16().double(), k.bfloat16().double(),
                                           v.bfloat16().double(), enable_gqa=True)
    # one bf16 rounding of the exact result
    assert torch.allclose(out.double(), exact, rtol=2 ** -8, atol=1e-6)
    # and near the fp64 result of the unrounded inputs
    assert torch.allclose(out.double(), reference, atol=2e-2)
    chunk = attend(q.expand(1, 6, 3, 16).bfloat16(), k.bfloat16(), v.bfloat16(), None, True)
    assert torch.equal(chunk, F.scaled_dot_product_attention(q.expand(1, 6, 3, 16).bfloat16(),
                                                             k.bfloat16(), v.bfloat16(),
                                                             is_causal=True, enable_gqa=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_after_cached_keys_attends_without_a_dense_mask(dtype):
    """A chunk over cached entries gets a lower-right causal bias, never materialised: CUDA's flash
    kernel takes it, and on CPU the chunk's attention is split into the cached keys and its own,
    merged by log-sum-exp. Both give the attention of an explicit per-query-head softmax (in bf16,
    to within its rounding)."""
    torch.manual_seed(0)
    pool = KVPool(config_from_hf(tiny_llama_config().to_dict()), capacity=16)
    pool.advance(9)
    bias = pool.attention_mask(4)  # 4 new tokens after 9 cached
    assert isinstance(bias, CausalBias) and (bias.seq_len_q, bias.seq_len_kv) == (4, 13)
    q, k, v = torch.randn(1, 6, 4, 16), torch.randn(1, 2, 13, 16), torch.randn(1, 2, 13, 16)
    visible = torch.arange(13) <= 9 + torch.arange(4)[:, None]  # [4, 13]
    logits = q @ k.repeat_interleave(3, dim=1).transpose(-1, -2) / 4  # [1, 6, 4, 13]
    expected = (logits.masked_fill(~visible, float("-inf")).softmax(-1)
                @ v.repeat_interleave(3, dim=1))
    # the mask matters
    assert not torch.allclose(logits.softmax(-1) @ v.repeat_interleave(3, dim=1), expected,
                              atol=1e-3)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    # split (CPU)
    torch.testing.assert_close(attend(q, k, v, bias, False).float(), expected, **tolerance)
    # what CUDA runs
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(sdpa.float(), expected, **tolerance)


@pytest.mark.parametrize("rotary_dim", [16, 8])  # full and partial rotary (Phi-3 style)
def test_apply_rope_matches_transformers_and_writes_into_a_buffer(rotary_dim):
    """Our RoPE gives transformers' values (bitwise, fp32 and bf16); into a buffer it returns that
    buffer, with every value within one rounding (the dtype's epsilon, at the inputs' scale) of the
    float64 result."""
    from transformers.models.llama.modeling_llama import rotate_half
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 16)
    angles = torch.randn(10, rotary_dim // 2) * 3
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    for dtype in (torch.float32, torch.bfloat16):
        xd, c, s = x.to(dtype), cos.to(dtype), sin.to(dtype)
        x_rot, x_pass = xd[..., :rotary_dim], xd[..., rotary_dim:]
        theirs = torch.cat((x_rot * c + rotate_half(x_rot) * s, x_pass), dim=-1)
        assert torch.equal(apply_rope(xd, c, s), theirs)
        buffer = torch.full_like(xd, float("nan"))
        into = apply_rope(xd, c, s, out=buffer)
        assert into is buffer
        exact = apply_rope(xd.double(), c.double(), s.double())
        assert (into.double() - exact).abs().max() <= torch.finfo(dtype).eps * xd.abs().max()
