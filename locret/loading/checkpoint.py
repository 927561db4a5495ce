"""From a `--ckpt` (zoo name, folder or hub id) to its model on a device, with its tokenizer."""
from pathlib import Path
from typing import NamedTuple

from models import CausalLM

from ..devices import check_device, default_device, default_dtype
from .tokenizer import Tokenizer
from .weights import DTYPES, load_model
from .zoo import ZooEntry, resolve_checkpoint


class Checkpoint(NamedTuple):
    folder: Path
    entry: ZooEntry | None  # None: not a zoo model
    tokenizer: Tokenizer
    model: CausalLM


def open_checkpoint(ckpt: str, device: str | None = None, dtype: str | None = None) -> Checkpoint:
    """Resolve, load and place a model; `device` and `dtype` default to what runs fastest here."""
    folder, entry = resolve_checkpoint(ckpt)
    device = check_device(device or default_device())
    model = load_model(folder, device, DTYPES[dtype or default_dtype(device)])
    return Checkpoint(folder, entry, Tokenizer(folder), model)
