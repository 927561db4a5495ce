"""Load an HF-layout model folder: config.json + safetensors (single or sharded), built on the meta
device and filled with memory-mapped tensors (`load_state_dict(assign=True)`), strictly."""
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models import MODEL_TYPES, CausalLM, config_from_hf

from ..errors import LocretError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # safetensors'
BLOCK_BYTES = 16 * 2**20  # of a file read at once when a tensor changes dtype


def read_json(path: Path) -> dict:
    """A JSON object file ({} where it is missing), or one clear error."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocretError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LocretError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise LocretError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    cfg = read_json(path)
    if cfg.get("model_type") not in MODEL_TYPES:
        raise LocretError(f"{path}: unsupported model_type {cfg.get('model_type')!r} "
                          f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    return cfg


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if (not isinstance(weight_map, dict)
                or not all(isinstance(s, str) for s in weight_map.values())):
            raise LocretError(f"{index}: no weight_map of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if not (folder / s).resolve().is_relative_to(folder.resolve())]
        if outside:
            raise LocretError(f"{index}: shard path {outside[0]!r} leaves the model folder: "
                              "refused")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise LocretError(f"{folder}: shard {missing[0]} named in {index.name} is missing")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise LocretError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_tensors(files: list[Path], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of `files` in `dtype`. The file is memory-mapped and reopened for each tensor,
    so its pages are let go as we go: the peak is the weights plus one block of one tensor."""
    tensors = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device=device) as f:
                shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
            for name, shape in shapes.items():
                tensors[name] = read_tensor(path, name, shape, device, dtype)
        except (SafetensorError, OSError) as e:
            raise LocretError(f"{path}: unreadable safetensors file ({e})") from None
    return tensors


def read_tensor(path: Path, name: str, shape: list[int], device: str,
                dtype: torch.dtype) -> torch.Tensor:
    """One tensor in `dtype`. One that changes dtype is converted a block of rows at a time (an fp32
    embedding of 671 MB loaded in bf16 would otherwise sit in memory whole beside its copy)."""
    with safe_open(path, framework="pt", device=device) as f:
        if f.get_slice(name).get_dtype() == DTYPE_NAMES.get(dtype) or len(shape) < 2:
            return f.get_tensor(name).to(dtype)
    out = torch.empty(shape, dtype=dtype, device=device)
    rows = max(1, BLOCK_BYTES // (4 * math.prod(shape[1:]) or 1))  # 4: the widest source, fp32
    for start in range(0, shape[0], rows):
        with safe_open(path, framework="pt", device=device) as f:
            out[start:start + rows] = f.get_slice(name)[start:start + rows]
    return out


def check_tensors(model: CausalLM, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Every expected tensor present with its shape, nothing unexpected: else one clear error."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise LocretError(f"{source}: missing tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(tensors.keys() - expected.keys())
    if unexpected:
        raise LocretError(f"{source}: unexpected tensor {unexpected[0]}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise LocretError(f"{source}: tensor {name} has shape {list(tensors[name].shape)}, "
                              f"expected {list(shape)}")


def check_finite(tensors: dict[str, torch.Tensor], source: Path, samples: int = 64) -> None:
    """A cheap look at `samples` evenly spaced values of each tensor: catches a NaN- or inf-filled
    one."""
    for name, t in tensors.items():
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        if flat.numel() and not torch.isfinite(flat[::step].float()).all():
            raise LocretError(f"{source}: tensor {name} holds NaN or inf values")


def load_model(folder: str | Path, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> CausalLM:
    """Build the model of `folder`'s config.json and load its safetensors weights, strictly."""
    folder = Path(folder)
    cfg = read_config(folder)
    try:
        config = config_from_hf(cfg)
        with torch.device("meta"):
            model = MODEL_TYPES[cfg["model_type"]](config)
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        raise LocretError(f"{folder / 'config.json'}: invalid config "
                          f"({type(e).__name__}: {e})") from None
    tensors = read_tensors(safetensors_files(folder), device, dtype)
    check_tensors(model, tensors, folder)
    check_finite(tensors, folder)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    with torch.device(device):  # buffers are not in the checkpoint: compute them on the real device
        model.make_rope()
    return model.eval().requires_grad_(False)


def stop_token_ids(folder: Path, tokenizer) -> set[int]:
    """End-of-turn ids: config.json and generation_config.json `eos_token_id`s plus the tokenizer's
    eos token."""
    ids = set()
    for name in ("config.json", "generation_config.json"):
        eos = read_json(folder / name).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    eos_id = tokenizer.token_to_id(tokenizer.eos_token)
    return ids | ({eos_id} if eos_id is not None else set())

