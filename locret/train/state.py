"""The resumable training state next to the heads file: heads, AdamW moments and the step, as
safetensors (no pickle), written atomically, so that a killed run continues exactly."""
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LocretError
from ..files import save_atomic
from .config import TrainConfig

# What shapes the heads and the data: a resumed run must keep it (--steps, validation and saving
# may change).
SAME_ON_RESUME = ("ckpt", "target", "head_hidden", "seed", "lr", "min_tokens", "max_tokens",
                  "alpha", "weight_decay", "dtype", "evicted", "init", "worked_examples")


def state_path(out: Path) -> Path:
    return out.with_name(out.stem + ".train-state.safetensors")


def head_parameters(model) -> list[torch.nn.Parameter]:
    return [p for head in model.retaining_heads for p in head.parameters()]


def run_settings(config: TrainConfig, dtype: str) -> dict:
    return asdict(config) | {"dtype": dtype}


def save_state(path: Path, model, optimizer, step: int, config: TrainConfig, dtype: str) -> None:
    tensors = {f"param.{i}": p.detach() for i, p in enumerate(head_parameters(model))}
    for i, p in enumerate(head_parameters(model)):
        for name, value in optimizer.state[p].items():
            tensors[f"adam.{i}.{name}"] = value
    metadata = {"step": str(step), "run": json.dumps(run_settings(config, dtype))}
    save_atomic(tensors, path, metadata, "training state")


def load_state(path: Path, model, optimizer, config: TrainConfig, dtype: str) -> int:
    """Restore heads and AdamW moments from `path`; return the step to continue from."""
    if not path.is_file():
        raise LocretError(f"--resume: no training state at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            check_same_run(json.loads(f.metadata()["run"]), run_settings(config, dtype))
            for i, p in enumerate(head_parameters(model)):
                p.data.copy_(f.get_tensor(f"param.{i}"))
                optimizer.state[p] = {name: f.get_tensor(f"adam.{i}.{name}").to(p.device)
                                      for name in ("step", "exp_avg", "exp_avg_sq")}
            return int(f.metadata()["step"])
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as e:  # cut, foreign
        raise LocretError(f"--resume: unreadable training state {path} "
                          f"({type(e).__name__}: {e})") from None


def check_same_run(saved, now: dict) -> None:
    if not isinstance(saved, dict):
        raise ValueError("its run settings are not a settings object")
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in SAME_ON_RESUME
               if k in saved and saved[k] != now[k]]
    if changed:
        raise LocretError(f"--resume: the saved run used other settings ({'; '.join(changed)}); "
                          "resume with the same ones, or start a new --out")
