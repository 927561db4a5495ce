"""Gemma 3 (models/gemma3.py) against transformers on tiny random configs: logits equal to 1e-5 in
fp32 over a prompt longer than the sliding window, each kind of layer with its own RoPE base and
window, and the config keys of both transformers' and the hub's styles."""
import json
from pathlib import Path

import pytest
import torch

import transformers  # test-only oracle
from locret.errors import LocretError
from locret.heads import backbone_signature, load_heads
from locret.loading.weights import load_model
from locret.loading.zoo import ZOO
from locret.plan import heads_eviction
from models import MODEL_TYPES, config_from_hf
from models.base import sliding_window_attention, window_mask

LOCAL, GLOBAL = "sliding_attention", "full_attention"
PATTERN = [LOCAL, LOCAL, GLOBAL, LOCAL, LOCAL, GLOBAL]
WINDOW = 8


def tiny_gemma3_config(**overrides):
    """Six layers (four sliding, two global), window 8, RoPE bases 100 (local) and 5000 (global),
    2 query heads and 1 KV head of dim 16, attention scale 1/sqrt(24) (not 1/sqrt(head_dim)),
    hidden size 48 (whose square root, the embedding scale, bf16 rounds)."""
    return transformers.Gemma3TextConfig(**{
        **dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               max_position_embeddings=256, sliding_window=WINDOW, layer_types=PATTERN,
               rope_theta=5000.0, rope_local_base_freq=100.0, query_pre_attn_scalar=24,
               initializer_range=0.1, attn_implementation="eager"),
        **overrides})


def save_gemma3(folder, config, seed=0):
    """A random transformers Gemma 3, its norm weights random too (they start at zero: scale 1),
    saved as safetensors in `folder`."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    hf.save_pretrained(folder, safe_serialization=True)
    return hf


def prompt(length=40, batch=2, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


CONFIGS = {
    "pattern": lambda: tiny_gemma3_config(),
    "global-first": lambda: tiny_gemma3_config(layer_types=[GLOBAL] + PATTERN[1:]),
    "linear-global-rope": lambda: tiny_gemma3_config(rope_scaling={"rope_type": "linear",
                                                                   "factor": 4.0}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_past_the_window(tmp_path, name):
    hf = save_gemma3(tmp_path, CONFIGS[name]())
    ours = load_model(tmp_path)
    assert type(ours) is MODEL_TYPES["gemma3_text"]
    tokens = prompt()  # 40 tokens, five windows
    torch.testing.assert_close(logits(ours, tokens), logits(hf, tokens), atol=1e-5, rtol=0)


def classic_keys(cfg: dict) -> dict:
    """The hub's style of a Gemma 3 config.json: rope_theta, rope_local_base_freq, rope_scaling and
    sliding_window_pattern in place of rope_parameters and layer_types, with the keys that
    transformers defaults for Gemma 3 (tie_word_embeddings, rms_norm_eps, ...) left out."""
    params = cfg.pop("rope_parameters")
    full = dict(params["full_attention"])
    cfg["rope_theta"] = full.pop("rope_theta")
    cfg["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    cfg["rope_scaling"] = None if full["rope_type"] == "default" else full
    cfg["sliding_window_pattern"] = cfg.pop("layer_types").index(GLOBAL) + 1
    for key in ("tie_word_embeddings", "rms_norm_eps", "hidden_activation",
                "_sliding_window_pattern"):
        cfg.pop(key)
    return cfg


@pytest.mark.parametrize("name", ["linear-global-rope", "pattern"])
def test_classic_config_keys_read_the_same(tmp_path, name):
    config = CONFIGS[name]()
    config.layer_types = [LOCAL, LOCAL, GLOBAL] * 2  # what a pattern of 3 gives
    hf = save_gemma3(tmp_path, config)
    new_style = json.loads((tmp_path / "config.json").read_text())
    classic = classic_keys(dict(new_style))
    assert config_from_hf(classic) == config_from_hf(new_style)
    (tmp_path / "config.json").write_text(json.dumps(classic))
    tokens = prompt(batch=1)
    torch.testing.assert_close(logits(load_model(tmp_path), tokens), logits(hf, tokens),
                               atol=1e-5, rtol=0)


def test_each_kind_of_layer_rotates_with_its_own_base(tmp_path):
    save_gemma3(tmp_path, tiny_gemma3_config())
    model = load_model(tmp_path)
    local, glob = model.model.local_rotary_emb.inv_freq, model.model.rotary_emb.inv_freq
    torch.testing.assert_close(local[1], torch.tensor(100.0 ** (-2 / 16)), atol=0, rtol=1e-6)
    torch.testing.assert_close(glob[1], torch.tensor(5000.0 ** (-2 / 16)), atol=0, rtol=1e-6)
    tokens = prompt(batch=1)
    before = logits(model, tokens)
    # a local base equal to the global one: the reference moves, and so do we, the same way
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"]["sliding_attention"]["rope_theta"] = 5000.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                           attn_implementation="eager").eval()
    after = logits(load_model(tmp_path), tokens)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, logits(hf, tokens), atol=1e-5, rtol=0)


def test_sliding_layers_see_exactly_their_window(tmp_path):
    """Two sliding layers of window 8 only: position p hears tokens p-14..p, so changing token 0
    changes positions 0..14 and leaves every later one as it was."""
    hf = save_gemma3(tmp_path, tiny_gemma3_config(num_hidden_layers=2, layer_types=[LOCAL] * 2))
    model = load_model(tmp_path)
    tokens = prompt(batch=1)
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % 128
    a, b = logits(model, tokens), logits(model, changed)
    reach = 2 * (WINDOW - 1)
    assert (a[0, :reach + 1] - b[0, :reach + 1]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(a[0, reach + 1:], b[0, reach + 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(b, logits(hf, changed), atol=1e-5, rtol=0)


def test_window_mask_counts_the_query_itself():
    mask = window_mask(torch.arange(5), torch.arange(5), 2)
    assert mask.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                             [False, True, True, False, False], [False, False, True, True, False],
                             [False, False, False, True, True]]
    # queries at 3, 4 over keys 0..4
    assert window_mask(torch.arange(3, 5), torch.arange(5), 2).tolist() == mask[3:].tolist()


@pytest.mark.parametrize("T,window", [(37, 8), (16, 8), (5, 8), (9, 1)])
def test_blocked_sliding_window_attention_equals_one_masked_softmax(T, window):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=window_mask(torch.arange(T), torch.arange(T), window), enable_gqa=True)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window), dense,
                               atol=1e-6, rtol=1e-5)


def test_bf16_embedding_scale_and_norms_round_as_the_reference(tmp_path):
    hf = save_gemma3(tmp_path, tiny_gemma3_config()).to(torch.bfloat16)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    tokens = prompt()
    ours, theirs = model.model, hf.model
    with torch.no_grad():
        x = model.embed(tokens)
        torch.testing.assert_close(x, theirs.embed_tokens(tokens), atol=0, rtol=0)
        heads = x.view(2, 40, 3, 16)  # as QK-norm sees them
        torch.testing.assert_close(ours.norm(x), theirs.norm(x), atol=0, rtol=0)
        torch.testing.assert_close(ours.layers[0].self_attn.k_norm(heads),
                                   theirs.layers[0].self_attn.k_norm(heads), atol=0, rtol=0)


# Gemma 3 270M's config.json in the hub's classic style, tie_word_embeddings left out (transformers
# defaults it to true): 18 layers, global ones 5, 11, 17, window 512, RoPE bases 1M and 10K
GEMMA3_270M = {
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "sliding_window": 512, "_sliding_window_pattern": 6, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "use_bidirectional_attention": False,
    "layer_types": [GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(18)]}


def test_gemma3_270m_config_builds_its_268m_parameters():
    config = config_from_hf(GEMMA3_270M)
    assert [i for i in range(18) if config.window(i) is None] == [5, 11, 17]
    assert config.window(0) == 512 and config.tie_word_embeddings
    assert (config.rope.theta, config.local_rope.theta) == (1e6, 1e4)
    assert config.attention_scale == 1 / 16
    with torch.device("meta"):
        model = MODEL_TYPES["gemma3_text"](config)
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert backbone_signature(model) == {
        "model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "vocab_size": 262144}


def test_shipped_heads_fit_gemma_3_270m():
    """The zoo's heads load onto the 270M's shapes: one head on each layer transformers' default
    pattern makes global, none on a sliding-window one, small enough to ship."""
    path = Path(ZOO["gemma-3-270m"].heads)
    assert path.stat().st_size <= 20 * 2**20
    with torch.device("meta"):
        model = MODEL_TYPES["gemma3_text"](config_from_hf(GEMMA3_270M))
    load_heads(model, path)
    with_heads = [i for i, layer in enumerate(model.model.layers)
                  if layer.self_attn.retaining_head is not None]
    pattern = transformers.Gemma3TextConfig(num_hidden_layers=18).layer_types
    assert with_heads == [i for i, kind in enumerate(pattern) if kind == GLOBAL]
    assert heads_eviction(str(path)) == "shared"  # what they were trained for


@pytest.mark.parametrize("edit, message", [
    ({"attn_logit_softcapping": 50.0}, "unsupported attn_logit_softcapping 50.0"),
    ({"final_logit_softcapping": 30.0}, "unsupported final_logit_softcapping 30.0"),
    ({"use_bidirectional_attention": True}, "unsupported use_bidirectional_attention"),
    ({"hidden_activation": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"layer_types": [LOCAL] * 17}, "layer_types must list 18 of"),
    ({"layer_types": ["chunked_attention"] * 18}, "layer_types must list 18 of"),
    ({"sliding_window": None}, "sliding_window must be a positive integer, not None"),
])
def test_unsupported_or_broken_gemma3_configs_are_one_clear_error(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**GEMMA3_270M, **edit})
    (tmp_path / "config.json").write_text(json.dumps({**GEMMA3_270M, **edit}))
    with pytest.raises(LocretError, match=f"invalid config .*{message}"):
        load_model(tmp_path)
