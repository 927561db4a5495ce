"""One policy on one item: the task's score, fidelity to full attention, needle retention, speed.

Fidelity compares the compressed cache with the full one on the gold answer, teacher-forced: the
log-likelihood gap and how often the next-token argmax agrees. It is informative even where a
small model fails the task outright."""
from dataclasses import dataclass, replace

import torch

from models import CausalLM

from ..context import Context
from ..errors import LocretError
from ..kv_pool import KVPool
from ..loading.tokenizer import Tokenizer
from ..settings import Settings, check_settings, pool_capacity
from .tasks import Item, chat_messages, completion_prompt, score


@dataclass
class Encoded:
    prompt: list[int]
    answer: list[int]  # gold continuation, teacher-forced for fidelity
    needles: list[range]  # token positions of each needle in the prompt (special tokens counted)
    question_tokens: int  # prompt tokens after the context: the question, the answer cue
    # prompt tokens before the context: the instruction (and a task's worked example)
    preamble_tokens: int


@dataclass
class Reference:
    """Full attention on the gold answer, computed once per item and shared by every policy."""
    log_probs: torch.Tensor  # [A] log p(gold token)
    top1: torch.Tensor  # [A] argmax token at each answer position


@dataclass
class ItemResult:
    policy: str
    budget: int  # 0: full attention
    prompt_tokens: int
    score: float
    answer_tokens: int
    log_likelihood: float  # of the gold answer, summed over its tokens
    ll_gap: float  # log-likelihood minus full attention's (0 for full)
    top1_agreement: float  # share of answer positions where the argmax matches full attention's
    # share of needle tokens kept after prefill, over layers and KV heads (nan: none)
    needle_retention: float
    needle_in_tail: bool  # a needle token lies in the n_loc tail, which is never evicted
    compression: float  # prompt tokens / entries held after prefill (the n_loc tail included)
    pool_bytes: int
    prefill_tps: float
    decode_tps: float
    peak_memory: int
    prediction: str


def encode_item(tokenizer: Tokenizer, item: Item, form: str) -> Encoded:
    """Tokenize the prompt as one string (the join matters for small models), find the needles in
    it, and tokenize the gold answer as it continues the prompt."""
    text = (completion_prompt(item) if form == "completion"
            else tokenizer.render_chat(chat_messages(item)))
    gold = ", ".join(item.answers)
    if form == "completion" and not (text[-1:].isspace() or gold[:1].isspace()):
        gold = " " + gold  # the answer prefix ends in a word: the answer follows after a space
    special = form == "completion"
    # a BOS counts too
    count = lambda upto: len(tokenizer.encode(text[:upto], add_special_tokens=special))
    prompt = tokenizer.encode(text, add_special_tokens=special)
    joined = tokenizer.encode(text + gold, add_special_tokens=special)
    answer = (joined[len(prompt):] if joined[:len(prompt)] == prompt
              else tokenizer.encode(gold, add_special_tokens=False))
    needles = []
    for needle in item.needles:
        start = text.find(needle)
        if start >= 0:  # from the token holding its first character to the one holding its last
            needles.append(range(count(start + 1) - 1, count(start + len(needle))))
    context_start = text.rfind(item.context) if item.context else 0
    context_end = context_start + len(item.context)
    return Encoded(prompt, answer, needles, len(prompt) - count(context_end),
                   count(context_start + 1) - 1)


def needle_retention(pool: KVPool, needles: list[range], body: int) -> float:
    """Share of the needles' tokens before the n_loc tail (prompt index < `body`) still in the pool,
    averaged over layers and KV heads; nan if there are none."""
    wanted = [i for r in needles for i in r if i < body]
    if not wanted:
        return float("nan")
    kept = pool.index[..., :pool.length]  # [L, B, KVH, n]
    hits = torch.isin(kept, torch.tensor(wanted, device=kept.device)).sum(dim=-1)
    return hits.float().mean().item() / len(wanted)


@torch.inference_mode()
def evaluate(model: CausalLM, tokenizer: Tokenizer, item: Item, encoded: Encoded,
             settings: Settings, max_new_tokens: int, stop_ids: set[int],
             reference: Reference | None, scorer=None) -> tuple[ItemResult, Reference]:
    """Prefill, generate greedily and score; then teacher-force the gold answer for fidelity. A
    `scorer` (a policy function) replaces the settings' policy, e.g. policies.Precomputed."""
    prompt, answer = encoded.prompt, encoded.answer
    check_settings(settings, len(prompt))
    capacity = pool_capacity(settings, len(prompt), max(max_new_tokens, len(answer)))
    context = Context(model, settings, capacity, len(prompt))
    if scorer is not None:
        context.engine.cache.policy = scorer
    tail = context.feed_body(prompt)
    context.close()
    body = len(prompt) - len(tail)
    retention = needle_retention(context.pool, encoded.needles, body)
    return judge(context, tokenizer, item, tail, answer, max_new_tokens, stop_ids, reference,
                 retention, needle_in_tail=any(r.stop > body for r in encoded.needles))


@torch.inference_mode()
def ask_together(model: CausalLM, tokenizer: Tokenizer, items: list[Item], encoded: list[Encoded],
                 settings: Settings, max_new_tokens: int, stop_ids: set[int]
                 ) -> list[ItemResult]:
    """Questions on one context: compress it once, then ask each item's question of the same
    cache."""
    body = len(encoded[0].prompt) - encoded[0].question_tokens
    if any(e.prompt[:body] != encoded[0].prompt[:body] for e in encoded):
        raise LocretError("these items do not share their context's tokens")
    tails = [e.prompt[body:] for e in encoded]
    room = max(map(len, tails)) + max(max_new_tokens, *(len(e.answer) for e in encoded))
    capacity = pool_capacity(replace(settings, n_loc=0), body, room)
    context = Context(model, settings, capacity, len(encoded[0].prompt))
    context.feed(encoded[0].prompt[:body])
    context.close()
    return [judge(context, tokenizer, item, tail, e.answer, max_new_tokens, stop_ids, None,
                  needle_retention(context.pool, e.needles, body),
                  any(r.stop > body for r in e.needles))[0]
            for item, e, tail in zip(items, encoded, tails)]


def judge(context: Context, tokenizer: Tokenizer, item: Item, tail: list[int], answer: list[int],
          max_new_tokens: int, stop_ids: set[int], reference: Reference | None, retention: float,
          needle_in_tail: bool) -> tuple[ItemResult, Reference]:
    """Ask a closed context the question `tail`, score the answer and its fidelity to
    `reference`."""
    out, stats = context.ask(tail, max_new_tokens, stop_ids)
    answer_logits = context.teacher_forced(tail, answer)
    gold = torch.tensor(answer)[:, None].to(answer_logits.device)
    log_probs = answer_logits.float().log_softmax(-1).gather(-1, gold)[:, 0]
    top1 = answer_logits.argmax(-1)
    reference = reference or Reference(log_probs, top1)
    prediction = tokenizer.decode([t for t in out if t not in stop_ids])
    s = context.settings
    result = ItemResult(
        policy=s.policy, budget=s.budget if s.evicts else 0, prompt_tokens=stats.prompt_tokens,
        score=score(item, prediction), answer_tokens=len(answer),
        log_likelihood=log_probs.sum().item(),
        ll_gap=(log_probs.sum() - reference.log_probs.sum()).item(),
        top1_agreement=(top1 == reference.top1).float().mean().item(),
        needle_retention=retention, needle_in_tail=needle_in_tail,
        compression=stats.compression, pool_bytes=stats.pool_bytes,
        prefill_tps=stats.prompt_tokens / stats.prefill_seconds,
        decode_tps=stats.new_tokens / max(stats.decode_seconds, 1e-9),
        peak_memory=stats.peak_memory_bytes, prediction=prediction)
    return result, reference
