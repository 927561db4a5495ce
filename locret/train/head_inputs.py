"""The retaining heads' inputs as inference produces them, for eviction-aware training
(train.py --evicted).

At inference a prompt token is scored once, when its chunk runs over the cache that earlier
evictions left (compacted, re-indexed); a full forward over the prompt shows the heads other q, k,
v. Here the prompt is prefilled in chunks under a budget, the heads being trained choosing what is
kept, and every layer's head input is recorded for each prompt token."""
from dataclasses import replace

import torch

from models import CausalLM

from ..context import Context
from ..plan import resolve
from ..settings import Settings, check_settings, pool_capacity


def evicted_settings(defaults: Settings, fraction: float, prompt_len: int,
                     eviction: str) -> Settings:
    """Locret under `fraction` of the prompt as its budget, the model's other defaults as inference
    takes them; the question is scored too, so that every prompt token has a head input."""
    budget = max(2, round(prompt_len * fraction))
    defaults = replace(defaults, policy="locret", eviction=eviction, score_question=True)
    return resolve(defaults, {"budget": budget}, prompt_len)


@torch.no_grad()
def chunked_head_inputs(model: CausalLM, prompt: list[int],
                        settings: Settings) -> list[torch.Tensor]:
    """Prefill `prompt` under `settings` -> per layer, the head input cat(q, k, v) [1, P, qkv_size]
    that each prompt token had when its chunk ran (ordinary tensors: they can feed a head with
    gradients)."""
    check_settings(settings, len(prompt))
    captured: list[list[torch.Tensor]] = [[] for _ in model.retaining_heads]
    hooks = [head.register_forward_hook(lambda _head, inputs, _out, parts=parts:
                                        parts.append(inputs[0]))
             for head, parts in zip(model.retaining_heads, captured)]
    try:
        context = Context(model, settings, pool_capacity(settings, len(prompt), 1), len(prompt))
        context.prefill(prompt)
    finally:
        for hook in hooks:
            hook.remove()
    # outside inference mode: a normal tensor
    return [torch.cat(parts, dim=1) for parts in captured]
