"""A saved context: the pool's filled entries (K, V, scores, token indices) and, for a model with
sliding-window layers, the last window - 1 entries of those layers (window_k, window_v), as
safetensors, with metadata naming what made them (model, retaining heads, dtype, settings): only the
same load it."""
import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models import CausalLM

from .errors import LocretError
from .files import save_atomic
from .heads import head_tensors
from .int8 import group_size
from .kv_pool import POOL_TENSORS, SCALE_TENSORS
from .settings import Settings

FORMAT = "locret-context/1"
WINDOW_TENSORS = ("window_k", "window_v")  # [sliding-window layers, B, KVH, n, D]


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A cheap identity of weights: each tensor's name, shape and 192 of its values."""
    digest = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        flat = t.detach().reshape(-1)
        spread = flat[::max(1, flat.numel() // 64)][:64]
        sample = torch.cat((flat[:64], flat[-64:], spread)).float().cpu()
        digest.update(f"{name}{tuple(t.shape)}".encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def identities(model: CausalLM) -> tuple[str, str]:
    """(backbone, retaining heads) fingerprints of `model`; heads "" when it has none."""
    heads = head_tensors(model)
    backbone = {k: v for k, v in model.state_dict().items() if k not in heads}
    return fingerprint(backbone), fingerprint(heads) if heads else ""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write(context, path: str | Path, extra: dict[str, str]) -> None:
    """Write a closed context atomically."""
    pool, n, settings = context.pool, context.pool.length, context.settings
    backbone, heads = identities(context.engine.model)
    metadata = {**extra, "format": FORMAT, "model": backbone,
                "heads": heads if settings.policy == "locret" else "",
                "dtype": dtype_name(pool.dtype), "settings": json.dumps(asdict(settings)),
                "rope_length": str(context.engine.rope_length), "seen": str(pool.seen),
                "tokens": str(context.tokens),
                "keys": "before-rope" if context.engine.raw_keys else "rotated"}
    filled = {name: t[:, :, :, :n] for name, t in pool.stored().items()}
    windows = context.engine.windows
    if windows:  # what their next query can see
        visible = slice(max(windows.length - windows.keep, 0), windows.length)
        filled |= {name: t[:, :, :, visible]
                   for name, t in zip(WINDOW_TENSORS, (windows.k, windows.v))}
    save_atomic(filled, path, metadata, "context")


def read(path: str | Path, model: CausalLM, positions: str | None) -> tuple[dict, dict, Settings]:
    """(pool tensors, metadata, settings) of a context file made by this model, heads and dtype."""
    path = Path(path)
    if not path.is_file():
        raise LocretError(f"context file {path} not found")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise LocretError(f"{path}: not a locret context file (no {FORMAT} metadata)")
            settings = read_settings(path, meta)
            names = (POOL_TENSORS + SCALE_TENSORS * settings.kv_int8
                     + WINDOW_TENSORS * model.config.has_windows)
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise LocretError(f"{path}: unreadable context file ({type(e).__name__}: {e})") from None
    required = {"dtype", "model", "heads", "rope_length", "seen", "tokens", "keys"}
    missing = sorted(required - meta.keys())
    if meta.get("keys") not in ("before-rope", "rotated") and "keys" not in missing:
        missing.append("keys")
    if missing or not all(meta[k].isdigit() for k in ("rope_length", "seen", "tokens")):
        raise LocretError(f"{path}: unreadable context file "
                          f"(metadata {', '.join(missing) or 'numbers'} missing or wrong)")
    check_fits(path, meta, settings, model, positions)
    check_shapes(path, tensors, model)
    return tensors, meta, settings


def read_settings(path: Path, meta: dict) -> Settings:
    """The settings a context was compressed with, or one clear error for another version's file."""
    stored = json.loads(meta["settings"])
    names = {f.name for f in fields(Settings)}
    if not isinstance(stored, dict) or stored.keys() != names:
        raise LocretError(f"{path}: a context file of another locret version "
                          "(its settings differ): compress the document again")
    return Settings(**stored)


def check_fits(path: Path, meta: dict, settings: Settings, model: CausalLM,
               positions: str | None) -> None:
    dtype = dtype_name(model.lm_head.weight.dtype)
    if meta["dtype"] != dtype:
        raise LocretError(f"{path} was saved in {meta['dtype']}, the model is loaded in {dtype}: "
                          f"pass --dtype {meta['dtype']}")
    backbone, heads = identities(model)
    if meta["model"] != backbone:
        raise LocretError(f"{path} was made with another model: load the model that compressed it")
    if meta["heads"] and meta["heads"] != heads:
        raise LocretError(f"{path} was compressed by other retaining heads: "
                          "load the heads that made it (--heads)")
    if positions and positions != settings.positions:
        raise LocretError(f"{path} holds --positions {settings.positions} entries, not {positions}")


def check_shapes(path: Path, tensors: dict, model: CausalLM) -> None:
    c = model.config
    L, H, D = len(c.global_layers), c.num_key_value_heads, c.head_dim
    n = tensors["k"].shape[3] if tensors["k"].dim() == 5 else -1
    # int8 pools also hold scales
    scales = {name: (L, 1, H, n, D // group_size(D)) for name in SCALE_TENSORS if name in tensors}
    expected = {"k": (L, 1, H, n, D), "v": (L, 1, H, n, D),
                "scores": (L, 1, H, n), "index": (L, 1, H, n)} | scales
    if c.has_windows:
        w = tensors["window_k"].shape[3] if tensors["window_k"].dim() == 5 else -1
        w = w if 0 <= w < c.sliding_window else -1
        expected |= dict.fromkeys(WINDOW_TENSORS, (len(c.sliding_layers), 1, H, w, D))
    if n < 1 or any(tuple(tensors[k].shape) != shape for k, shape in expected.items()):
        raise LocretError(f"{path}: pool tensors do not fit this model "
                          f"({L} global layers, {H} KV heads of {D})")
    stored = torch.int8 if "k_scale" in tensors else model.lm_head.weight.dtype
    if tensors["k"].dtype != stored or tensors["v"].dtype != stored:
        raise LocretError(f"{path}: K and V are stored as {dtype_name(tensors['k'].dtype)}, "
                          f"expected {dtype_name(stored)}")
    if any(tensors[k].dtype != model.lm_head.weight.dtype for k in WINDOW_TENSORS if k in tensors):
        raise LocretError(f"{path}: the sliding-window layers' K and V are not stored in "
                          f"{dtype_name(model.lm_head.weight.dtype)}")
