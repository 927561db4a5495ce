"""What one generation's cache keeps and how: the one settings type every script and bench uses.

Defaults come from the model's zoo entry (or GENERIC for other models) and the retaining heads'
metadata; plan.resolve() lays the user's choices over them by one rule."""
from dataclasses import dataclass

from .errors import LocretError
from .policies import POLICIES

EVICTIONS = ("per-head", "shared")
POSITIONS = ("compact", "original")
NEEDS_HEADS = "--policy locret needs retaining heads: pass --heads FILE.safetensors"


@dataclass
class Settings:
    policy: str = "full"
    budget: int = 1024  # entries kept per KV head after each chunk (stabilizers included)
    chunk: int = 512  # prefill chunk length
    stabilizers: int = 128  # last entries always kept through an eviction (n_s)
    n_loc: int = 100  # final prompt tokens prefilled without eviction (the question)
    # compact: kept tokens re-indexed 0..n-1 (official) | original: absolute
    positions: str = "compact"
    # per-head: each layer and KV head keeps its best (the paper's) | shared: one set
    eviction: str = "per-head"
    # shared eviction ranks by these layers' scores: all or FIRST-LAST (e.g. 13-22)
    shared_layers: str = "all"
    span: int = 1  # locret: a token's score is the best within span // 2 neighbours (1: paper's)
    kv_int8: bool = False  # store K and V as int8, an fp16 scale per group of 16 values (int8.py)
    evict_during_decode: bool = False
    # protect them in the last eviction before the n_loc tail too (official: no)
    final_stabilizers: bool = True
    # the policy scores the question's entries too (training records them)
    score_question: bool = False
    random_seed: int = 0  # the random policy's draws

    @property
    def evicts(self) -> bool:
        return self.policy != "full"


# Models outside the zoo: the paper's chunk and n_loc, a small GPU's budget and stabilizer share.
GENERIC = Settings(budget=2048, chunk=1024, stabilizers=512, n_loc=100)


def layer_slice(text: str, n_layers: int | None = None, flag: str = "--shared-layers") -> slice:
    """'13-22' -> slice(13, 23), 'all' -> every layer; one clear error for a malformed range or
    (given `n_layers`, the global layers' count: a hybrid model's are numbered among themselves)
    one beyond the model."""
    if text == "all":
        return slice(None)
    first, sep, last = text.partition("-")
    if not (sep and first.isdigit() and last.isdigit() and int(first) <= int(last)):
        raise LocretError(f"{flag} must be FIRST-LAST (e.g. 13-22) or all, not {text!r}")
    if n_layers is not None and int(last) >= n_layers:
        raise LocretError(f"{flag} {text}: layers are numbered among the model's {n_layers} "
                          f"global layers, 0-{n_layers - 1}")
    return slice(int(first), int(last) + 1)


def check_settings(s: Settings, prompt_tokens: int | None = None) -> None:
    """Impossible settings become one clear error before any work starts (`prompt_tokens` None: a
    stream of unknown length)."""
    choices = (("--policy", s.policy, POLICIES), ("--positions", s.positions, POSITIONS),
               ("--eviction", s.eviction, EVICTIONS))
    for flag, value, known in choices:
        if value not in known:
            raise LocretError(f"unknown {flag.lstrip('-')} {value!r} "
                              f"(choose from {', '.join(known)})")
    layer_slice(s.shared_layers)
    if s.span < 1 or s.span % 2 == 0:
        raise LocretError(f"--span must be an odd number >= 1 (got {s.span})")
    if s.chunk < 1:
        raise LocretError(f"--chunk must be at least 1 (got {s.chunk})")
    if s.n_loc < 0 or (prompt_tokens is not None and s.n_loc >= prompt_tokens):
        raise LocretError(f"--n-loc must be in [0, prompt tokens) = [0, {prompt_tokens}) "
                          f"(got {s.n_loc})")
    if s.evicts and s.budget < 1:
        raise LocretError(f"--budget must be at least 1 entry per KV head (got {s.budget})")
    if s.evicts and s.stabilizers < 0:
        raise LocretError(f"--stabilizers must be >= 0 (got {s.stabilizers})")
    if s.evicts and s.budget <= s.stabilizers:
        raise LocretError(f"--budget ({s.budget}) must be larger than "
                          f"--stabilizers ({s.stabilizers})")


def turns_keys(s: Settings) -> bool:
    """Compact mode: the pool holds keys before RoPE and turns them to their slots each forward."""
    return s.evicts and s.positions == "compact"


def pool_capacity(s: Settings, prompt_tokens: int, max_new_tokens: int) -> int:
    """Entries per KV head the pool must hold: bounded by the settings, however long the prompt."""
    everything = prompt_tokens + max_new_tokens
    if not s.evicts:
        return everything
    if s.evict_during_decode:
        return min(everything, s.budget + max(s.chunk, s.n_loc + 1))
    return min(everything, s.budget + max(s.chunk, s.n_loc + max_new_tokens))
