"""The retaining heads' inputs as inference produces them, for eviction-aware training (train.py --evicted).

At inference a prompt token is scored once, when its chunk runs over the cache that earlier evictions
left (compacted, re-indexed); a full forward over the prompt shows the heads other q, k, v. Here the
prompt is prefilled in chunks under a budget, the heads being trained choosing what is kept, and every
layer's head input is recorded for each prompt token."""
from dataclasses import replace

import torch

from models import CausalLM

from ..context import Context
from ..engine import EngineSettings, check_settings, pool_capacity
from ..loading.zoo import LocretSettings


def evicted_settings(zoo: LocretSettings, fraction: float, prompt_len: int, eviction: str) -> EngineSettings:
    """Locret under `fraction` of the prompt as its budget, with the zoo's chunk, stabilizer share of the
    budget, score span and ranking layers; `n_loc` as the zoo's (less for a short prompt)."""
    budget = max(2, round(prompt_len * fraction))
    return EngineSettings(policy="locret", budget=budget, chunk=zoo.chunk, stabilizers=zoo.stabilizers_for(budget),
                          n_loc=min(zoo.n_loc, prompt_len - 1), span=zoo.span, eviction=eviction,
                          shared_layers=zoo.shared_layers)


@torch.no_grad()
def chunked_head_inputs(model: CausalLM, prompt: list[int], settings: EngineSettings) -> list[torch.Tensor]:
    """Prefill `prompt` under `settings` -> per layer, the head input cat(q, k, v) [1, P, qkv_size] that
    each prompt token had when its chunk ran (ordinary tensors: they can feed a head with gradients)."""
    check_settings(settings, len(prompt))
    settings = replace(settings, evict_during_decode=True)  # so the n_loc tail is scored too: training wants every token
    captured: list[list[torch.Tensor]] = [[] for _ in model.retaining_heads]
    hooks = [head.register_forward_hook(lambda _head, inputs, _out, parts=parts: parts.append(inputs[0]))
             for head, parts in zip(model.retaining_heads, captured)]
    try:
        context = Context(model, settings, pool_capacity(settings, len(prompt), 1), len(prompt))
        context.prefill(prompt)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts, dim=1) for parts in captured]  # outside inference mode: a normal tensor
