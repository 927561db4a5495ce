"""Planning a run before anything is allocated: the settings (the model's defaults, its heads' and
the user's choices, met by one rule) and a pool that fits the model's context and the memory.

    defaults = default_settings(entry, policy, heads_eviction(heads))
    settings = resolve(defaults, chosen(args), prompt_tokens)      # what the run will do
    plan = fit(model, defaults, chosen(args), prompt_tokens, max_new_tokens, max_memory_gib)
"""
import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path

from models import CausalLM

from .errors import LocretError
from .heads import read_heads, trained_eviction
from .loading.zoo import ZooEntry
from .memory import available_bytes, estimate, format_bytes, largest_budget, peak_memory_bytes
from .settings import GENERIC, Settings, check_settings, pool_capacity, turns_keys


def heads_eviction(heads: str | Path | None) -> str:
    """The eviction mode a heads file was trained for (per-head without one)."""
    return trained_eviction(read_heads(Path(heads), tensors=False)[1]) if heads else "per-head"


def default_settings(entry: ZooEntry | None, policy: str, eviction: str = "per-head") -> Settings:
    """The zoo entry's settings (GENERIC for other models) for `policy`; `eviction` is locret's
    (the mode its heads were trained for); every other policy evicts per head."""
    base = entry.settings if entry else GENERIC
    return replace(base, policy=policy, eviction=eviction if policy == "locret" else "per-head")


def chosen(args: argparse.Namespace) -> dict:
    """The settings a script's flags set: every Settings field whose flag was given (not None)."""
    return {f.name: getattr(args, f.name) for f in fields(Settings)
            if getattr(args, f.name, None) is not None}


def resolve(defaults: Settings, choices: dict, prompt_tokens: int | None = None) -> Settings:
    """`defaults` with `choices` laid over them, checked. The one defaulting rule: stabilizers
    not chosen are the defaults' share of the budget (as the official code scales them); n_loc
    not chosen stays below a short prompt. `prompt_tokens` None: a stream of unknown length."""
    s = replace(defaults, **choices)
    if "stabilizers" not in choices:
        s.stabilizers = s.budget * defaults.stabilizers // defaults.budget
    if "n_loc" not in choices and prompt_tokens is not None:
        s.n_loc = min(s.n_loc, prompt_tokens - 1)
    check_settings(s, prompt_tokens)
    return s


@dataclass
class Plan:
    settings: Settings
    capacity: int  # pool entries per KV head


def fit(model: CausalLM, defaults: Settings, choices: dict, prompt_tokens: int | None,
        max_new_tokens: int, max_memory_gib: float | None = None) -> Plan:
    """The run's settings and pool, checked against the model's context and the machine's memory.
    With `max_memory_gib` and no budget chosen, the largest budget whose estimate fits."""
    window = model.config.max_position_embeddings
    capacity_of = lambda s: pool_capacity(s, prompt_tokens or window, max_new_tokens)
    settings = resolve(defaults, choices, prompt_tokens)
    if max_memory_gib is not None:
        at_budget = lambda budget: resolve(defaults, choices | {"budget": budget}, prompt_tokens)
        settings = fit_memory(model, at_budget, choices.get("budget"),
                              choices.get("stabilizers", 0), max_memory_gib, capacity_of,
                              upper=prompt_tokens or window)
    capacity = capacity_of(settings)
    compact_positions = turns_keys(settings)  # they stay within the pool, whatever the prompt
    last = (capacity if compact_positions else
            None if prompt_tokens is None else prompt_tokens + max_new_tokens)
    check_fits(model, settings, capacity, last)
    return Plan(settings, capacity)


def fit_memory(model: CausalLM, at_budget, budget: int | None, chosen_stabilizers: int,
               max_memory_gib: float, capacity_of, upper: int) -> Settings:
    """--max-memory: the largest budget (up to `upper`) whose estimate fits: what the process
    holds at its peak so far (runtime, weights as loaded and converted), the pool, the
    activations. A chosen `budget` must fit; chosen stabilizers stay fixed (else each budget
    keeps its share)."""
    limit, held = int(max_memory_gib * 2**30), peak_memory_bytes(model.lm_head.weight.device)
    low = chosen_stabilizers + 1  # the smallest budget with room beyond the stabilizers
    best = largest_budget(model, at_budget, limit, capacity_of, low, upper, held)
    if budget is not None and budget > best:
        need = estimate(model, at_budget(budget), capacity_of(at_budget(budget)), held).total
        raise LocretError(f"--budget {budget} needs {format_bytes(need)}, above --max-memory "
                          f"{max_memory_gib} GiB (the largest budget that fits is {best})")
    return at_budget(budget or best)


def check_fits(model: CausalLM, settings: Settings, capacity: int,
               last_position: int | None) -> None:
    """Positions within the model's context (`last_position`: the largest the run reaches; None
    for a stream, checked as it goes), memory within the machine's."""
    window = model.config.max_position_embeddings
    if last_position is not None and last_position > window:
        fix = ("fewer --max-new-tokens, --evict-during-decode or a smaller --budget"
               if turns_keys(settings) else
               "fewer --max-new-tokens, or a policy that evicts with --positions compact")
        raise LocretError(f"positions would reach {last_position}, past the model's "
                          f"{window}-token context: the answer would be garbage; use {fix}")
    need = estimate(model, settings, capacity).total
    have = available_bytes(model.lm_head.weight.device)
    if have is not None and need > have:
        raise LocretError(f"this run needs about {format_bytes(need)} (weights, KV pool of "
                          f"{capacity} entries, activations) and {format_bytes(have)} is "
                          "available: lower --max-new-tokens or --budget, or pass --max-memory")
