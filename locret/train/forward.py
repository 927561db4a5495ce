"""One training sample through the frozen backbone: its token ids, then the heads' predictions and
the labels they fit, and the loss between them."""
import torch

from ..loading.tokenizer import Tokenizer
from ..settings import Settings
from .config import TrainConfig
from .data import Sample, make_sample
from .head_inputs import chunked_head_inputs, evicted_settings
from .labels import LabelRecorder
from .loss import keep_loss, retaining_loss
from .targets import SHARED_TARGETS, target_eviction

LOSSES = {"cis": retaining_loss} | dict.fromkeys(SHARED_TARGETS, keep_loss)


def encode_sample(tokenizer: Tokenizer, sample: Sample) -> tuple[list[int], int]:
    """Prompt followed by the answer -> (token ids, prompt length). A chat sample is a user turn the
    assistant answers; a completion sample is plain text the answer continues after a space."""
    if sample.form == "chat":
        prompt = tokenizer.encode_chat([{"role": "user", "content": sample.prompt}])
        answer = tokenizer.encode(sample.answer, add_special_tokens=False)
    else:
        prompt = tokenizer.encode(sample.prompt, add_special_tokens=True)
        answer = tokenizer.encode(" " + sample.answer, add_special_tokens=False)
    return prompt + answer, len(prompt)


def heads_forward(model, ids: list[int], prompt_len: int, target: str = "cis",
                  evicted: tuple[Settings, float] | None = None, layers: slice = slice(None)):
    """One causal forward over prompt + answer -> (predictions, labels), each
    [L, 1, KVH, prompt_len]: per-layer CIS labels, or one target for all layers and heads
    (SHARED_TARGETS[target]; `joint` and `joint-rank` rank tokens by `layers`). With `evicted`
    (the model's default settings, a budget fraction), the predictions come from the head inputs
    of a chunked prefill of the prompt under that budget (head_inputs.py), as at inference."""
    recorder = LabelRecorder(model.config, prompt_len)
    with torch.set_grad_enabled(torch.is_grad_enabled() and evicted is None):
        ids_tensor = torch.tensor([ids], device=model.lm_head.weight.device)
        model(ids_tensor, cache=recorder, last_only=True)
    pred, label = recorder.stacked()
    if evicted:
        settings = evicted_settings(*evicted, prompt_len, target_eviction(target))
        inputs = chunked_head_inputs(model, ids[:prompt_len], settings)
        pred = torch.stack([head(x) for head, x in zip(model.retaining_heads, inputs)])
    if target in SHARED_TARGETS:
        label = SHARED_TARGETS[target](label, layers)
    return pred, label


def training_ids(tokenizer: Tokenizer, config: TrainConfig, index: int, seed: int):
    """The `index`-th generated sample of `seed` as (token ids, prompt length)."""
    sample = make_sample(index, seed, tokenizer, config.min_tokens, config.max_tokens,
                         config.worked_examples, chat=bool(tokenizer.chat_template))
    return encode_sample(tokenizer, sample)
