"""Retaining-head checkpoints: safetensors holding only the heads' weights, with metadata naming the
backbone they were trained for. Loading heads onto a different backbone is a clear error."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models import CausalLM

from .errors import LocretError
from .files import save_atomic

SIGNATURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size")


def backbone_signature(model: CausalLM) -> dict:
    """The backbone facts heads depend on: their input width, their count, their outputs."""
    return {k: getattr(model.config, k) for k in SIGNATURE_KEYS}


def head_tensors(model: CausalLM) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".retaining_head." in k}


def save_heads(model: CausalLM, path: str | Path, backbone: str, training: dict | None = None,
               dtype: torch.dtype | None = None, eviction: str = "per-head") -> None:
    """Write the heads (in `dtype`, default theirs) atomically, naming the eviction mode they fit.
    """
    heads = [h for h in model.retaining_heads if h is not None]
    if len(heads) != len(model.retaining_heads):
        raise LocretError("the model has no retaining heads to save")
    metadata = {"format": "pt", "locret_heads": "1", "backbone": backbone,
                "backbone_config": json.dumps(backbone_signature(model)),
                "head_hidden": str(heads[0].fc1.out_features),
                "training": json.dumps(training or {}), "eviction": eviction}
    tensors = {k: v.to(dtype or v.dtype) for k, v in head_tensors(model).items()}
    save_atomic(tensors, path, metadata, "heads")


def read_heads(path: Path, tensors: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of a heads file (no tensors unless `tensors`), or one clear error."""
    if path.is_dir():
        raise LocretError(f"heads file {path} is a directory, not a .safetensors file")
    if not path.is_file():
        raise LocretError(f"heads file {path} not found")
    try:
        with safe_open(path, framework="pt") as f:
            found, meta = {k: f.get_tensor(k) for k in f.keys() if tensors}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise LocretError(f"{path}: unreadable safetensors file ({e})") from None
    check_metadata(meta, path)
    return found, meta


def check_metadata(meta: dict, path: Path) -> None:
    """What the rest of this module reads from a heads file's metadata is there and well formed."""
    if meta.get("locret_heads") != "1":
        raise LocretError(f"{path}: not a retaining-heads file (no locret_heads metadata)")
    try:
        backbone = json.loads(meta["backbone_config"])
        training = json.loads(meta.get("training") or "{}")
        hidden = int(meta["head_hidden"])
    except (KeyError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise LocretError(f"{path}: broken retaining-heads metadata "
                          f"({type(e).__name__}: {e})") from None
    if not isinstance(backbone, dict) or not isinstance(training, dict) or hidden < 1:
        raise LocretError(f"{path}: broken retaining-heads metadata "
                          "(backbone_config, training or head_hidden)")


def trained_eviction(meta: dict) -> str:
    """The eviction mode heads were trained for (file metadata; unnamed: per-head, the paper's)."""
    return meta.get("eviction", "per-head")


def load_heads(model: CausalLM, path: str | Path) -> dict:
    """Attach the heads in `path` to `model` (checking they fit it); return the file's metadata."""
    path = Path(path)
    tensors, meta = read_heads(path)
    theirs, ours = json.loads(meta["backbone_config"]), backbone_signature(model)
    wrong = [k for k in SIGNATURE_KEYS if theirs.get(k) != ours[k]]
    if wrong:
        diffs = ", ".join(f"{k} {theirs.get(k)} vs {ours[k]}" for k in wrong)
        raise LocretError(f"{path}: heads were trained for another backbone "
                          f"({meta.get('backbone')}: {diffs})")
    model.add_retaining_heads(int(meta["head_hidden"]))
    expected = head_tensors(model)
    if (tensors.keys() != expected.keys()
            or any(tensors[k].shape != v.shape for k, v in expected.items())):
        raise LocretError(f"{path}: head tensors do not match the "
                          f"backbone's {len(model.retaining_heads)} global layers")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise LocretError(f"{path}: tensor {bad[0]} holds NaN or inf values")
    p = model.lm_head.weight
    model.load_state_dict({k: v.to(p.device, p.dtype) for k, v in tensors.items()}, strict=False)
    return meta
