"""The paper authors' trained retaining heads (pickled `.bin` state dicts on the Hugging Face hub),
read safely (tensors only, never arbitrary unpickling), checked against the backbone and converted
once into this project's safetensors heads format (`locret.heads`)."""
import re
from pathlib import Path

import torch

from models import CausalLM

from ..errors import LocretError
from ..heads import load_heads, save_heads
from ..settings import NEEDS_HEADS
from .cache import cache_root
from .zoo import ZooEntry, hub_error, local_heads

# `model.layers.3.self_attn.fc1.weight`, with any prefix before `layers` and `self_attn.` optional.
KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.)?(fc1|fc2)\.weight$")


def _load_reason(e: Exception) -> str:
    """The informative part of torch.load's long, multi-line complaint."""
    text = str(e).strip()
    m = re.search(r"Unsupported[^.\n]*", text)
    return m[0] if m else (text.splitlines()[0] if text else type(e).__name__)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's str -> Tensor dict, loaded with weights_only=True, or one clear error."""
    if not path.is_file():
        raise LocretError(f"official heads file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for unsafe or corrupt files
        raise LocretError(f"{path}: not loadable as plain tensors by torch.load(weights_only=True) "
                          f"({_load_reason(e)}); it is not unpickled any further") from None
    if not isinstance(obj, dict):
        raise LocretError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise LocretError(f"{path}: key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            raise LocretError(f"{path}: entry {k!r} is {type(v).__name__}, expected a tensor")
    return obj


def read_official_heads(path: str | Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (fc1 [hidden, qkv_size], fc2 [n_kv_heads, hidden]) from an official heads file."""
    path = Path(path)
    found = {}
    for key, tensor in _load_tensors(path).items():
        m = KEY.search(key)
        if m is None:
            raise LocretError(f"{path}: unrecognised key {key!r} "
                              "(expected ...layers.N.self_attn.fc1/fc2.weight)")
        slot = (int(m[1]), m[2])
        if slot in found:
            raise LocretError(f"{path}: layer {slot[0]} has two {slot[1]} weights "
                              f"(second: {key!r})")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise LocretError(f"{path}: {key!r} is a {tensor.dim()}-d {tensor.dtype} tensor, "
                              "expected 2-d floating point")
        found[slot] = tensor
    if not found:
        raise LocretError(f"{path}: holds no retaining-head weights")
    layers = sorted({layer for layer, _ in found})
    if layers != list(range(len(layers))):
        more = "..." if len(layers) > 8 else ""
        raise LocretError(f"{path}: layers must be numbered 0..N-1, found {layers[:8]}{more}")
    for layer in layers:
        for name in ("fc1", "fc2"):
            if (layer, name) not in found:
                raise LocretError(f"{path}: layer {layer} has no {name} weight")
    return {layer: (found[layer, "fc1"], found[layer, "fc2"]) for layer in layers}


def check_fit(heads: dict[int, tuple[torch.Tensor, torch.Tensor]], model: CausalLM,
              path: Path) -> None:
    """Layer count and every weight's shape must match the backbone: else one clear error."""
    cfg = model.config
    if len(heads) != len(cfg.global_layers):
        raise LocretError(f"{path}: heads have {len(heads)} layers, "
                          f"the backbone {len(cfg.global_layers)} global layers")
    hidden = heads[0][0].shape[0]
    for layer, (fc1, fc2) in heads.items():
        for name, w, want in (("fc1", fc1, [hidden, cfg.qkv_size]),
                              ("fc2", fc2, [cfg.num_key_value_heads, hidden])):
            if list(w.shape) != want:
                raise LocretError(f"{path}: layer {layer} {name} has shape {list(w.shape)}, "
                                  f"the backbone needs {want}")


def convert_official_heads(bin_path: str | Path, model: CausalLM, out_path: str | Path,
                           backbone: str) -> None:
    """Attach the official heads in `bin_path` to `model` and write them to `out_path`
    (safetensors), in the file's own dtype so the values stay exact. The model keeps the heads,
    in its own dtype."""
    bin_path = Path(bin_path)
    heads = read_official_heads(bin_path)
    check_fit(heads, model, bin_path)
    model.add_retaining_heads(heads[0][0].shape[0])
    with torch.no_grad():
        for head, (fc1, fc2) in zip(model.retaining_heads, heads.values()):
            head.to(fc1.dtype)  # in place: hold the file's values unrounded while saving
            head.fc1.weight.copy_(fc1)
            head.fc2.weight.copy_(fc2)
    save_heads(model, out_path, backbone, training={"source": "official", "file": bin_path.name})
    for head in model.retaining_heads:
        head.to(model.lm_head.weight.dtype)


def download_official(repo: str, filename: str) -> Path:
    """Fetch one official heads file with huggingface-hub (cached)."""
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:
        raise hub_error(f"{filename} from {repo!r}", e,
                        "without network, pass --heads /path/to/heads.safetensors") from None


def ensure_official_heads(entry: ZooEntry, model: CausalLM) -> Path:
    """The converted official heads of `entry` (`<cache>/heads/<name>.safetensors`); downloads and
    converts them for `model` on first use."""
    if entry.official_heads is None:
        raise LocretError(f"{entry.name} has no official retaining heads; "
                          "pass --heads /path/to/heads.safetensors")
    out = cache_root() / "heads" / f"{entry.name}.safetensors"
    if out.is_file():
        return out
    bin_path = download_official(*entry.official_heads)
    out.parent.mkdir(parents=True, exist_ok=True)
    convert_official_heads(bin_path, model, out, backbone=entry.hub_id)
    return out


def find_heads(heads: str | None, entry: ZooEntry | None, model: CausalLM) -> str | Path | None:
    """`--heads`, else the heads shipped in the zoo, else the paper's official heads (fetched once).
    """
    given = local_heads(heads, entry)
    if given:
        return given
    if entry is not None and entry.official_heads:
        return ensure_official_heads(entry, model)
    return None


def attach_heads(model: CausalLM, heads: str | None, entry: ZooEntry | None) -> Path:
    """Load the heads find_heads picks onto `model` and return their file; none: one clear error."""
    path = find_heads(heads, entry, model)
    if path is None:
        raise LocretError(NEEDS_HEADS)
    load_heads(model, path)
    return Path(path)
