"""Writing files safely: a path check before long work, and safetensors written atomically."""
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import LocretError


def writable_file_path(path: str | Path) -> bool:
    """Whether a file can be written at `path`: not a folder, in an existing folder we can write."""
    path = Path(path)
    return not path.is_dir() and path.parent.is_dir() and os.access(path.parent, os.W_OK)


def save_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str],
                what: str) -> None:
    """Write `tensors` as safetensors to a temporary file renamed into place (never half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports a missing folder as its own error
        reason = getattr(e, "strerror", None) or e
        raise LocretError(f"cannot write {what} {path}: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Delete what `save_atomic` left next to `path` when its process was killed while writing."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
