"""One policy on one item: the task's score, fidelity to full attention, needle retention, speed.

Fidelity compares the compressed cache with the full one on the gold answer, teacher-forced: the
log-likelihood gap and how often the next-token argmax agrees. It is informative even where a
small model fails the task outright."""
import time
from dataclasses import dataclass

import torch

from models import CausalLM

from .engine import Engine, EngineSettings, check_settings, pool_capacity
from .memory import peak_memory_bytes
from .tasks import Item, chat_messages, completion_prompt, score
from .tokenizer import Tokenizer


@dataclass
class Encoded:
    prompt: list[int]
    answer: list[int]  # gold continuation, teacher-forced for fidelity
    needles: list[range]  # token positions of each needle in the prompt (special tokens counted)
    question_tokens: int  # prompt tokens after the context: the question, the answer cue


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
    needle_retention: float  # share of needle tokens kept after prefill, over layers and KV heads (nan: none)
    needle_in_tail: bool  # a needle token lies in the n_loc tail, which is never evicted
    compression: float  # prompt tokens / entries held after prefill (the n_loc tail included)
    pool_bytes: int
    prefill_tps: float
    decode_tps: float
    peak_memory: int
    prediction: str


def encode_item(tokenizer: Tokenizer, item: Item, form: str) -> Encoded:
    """Tokenize the prompt as one string (the join matters for small models), find the needles in it,
    and tokenize the gold answer as it continues the prompt."""
    text = completion_prompt(item) if form == "completion" else tokenizer.render_chat(chat_messages(item))
    gold = ", ".join(item.answers)
    if form == "completion" and not (text[-1:].isspace() or gold[:1].isspace()):
        gold = " " + gold  # the answer prefix ends in a word: the answer follows after a space
    special = form == "completion"
    count = lambda upto: len(tokenizer.encode(text[:upto], add_special_tokens=special))  # a BOS counts too
    prompt = tokenizer.encode(text, add_special_tokens=special)
    joined = tokenizer.encode(text + gold, add_special_tokens=special)
    answer = joined[len(prompt):] if joined[:len(prompt)] == prompt else tokenizer.encode(gold, add_special_tokens=False)
    needles = []
    for needle in item.needles:
        start = text.find(needle)
        if start >= 0:  # from the token holding its first character to the one holding its last
            needles.append(range(count(start + 1) - 1, count(start + len(needle))))
    context_end = text.rfind(item.context) + len(item.context) if item.context else 0
    return Encoded(prompt, answer, needles, len(prompt) - count(context_end))


def needle_retention(engine: Engine, needles: list[range], body: int) -> float:
    """Share of the needles' tokens before the n_loc tail (prompt index < `body`) still in the pool,
    averaged over layers and KV heads; nan if there are none."""
    wanted = [i for r in needles for i in r if i < body]
    if not wanted:
        return float("nan")
    kept = engine.pool.index[..., :engine.pool.length]  # [L, B, KVH, n]
    return torch.isin(kept, torch.tensor(wanted, device=kept.device)).sum(dim=-1).float().mean().item() / len(wanted)


@torch.inference_mode()
def evaluate(model: CausalLM, tokenizer: Tokenizer, item: Item, encoded: Encoded, settings: EngineSettings,
             max_new_tokens: int, stop_ids: set[int], reference: Reference | None) -> tuple[ItemResult, Reference]:
    """Prefill, generate greedily and score; then teacher-force the gold answer for fidelity."""
    prompt, answer = encoded.prompt, encoded.answer
    check_settings(settings, len(prompt))
    engine = Engine(model, settings, pool_capacity(settings, len(prompt), max(max_new_tokens, len(answer))), len(prompt))
    t0 = time.perf_counter()
    last, _ = engine.prefill(prompt)
    t1 = time.perf_counter()
    body = len(prompt) - settings.n_loc
    retention = needle_retention(engine, encoded.needles, body)
    after_prefill = engine.pool.length, engine.pool.seen
    out, logits = [], last
    while len(out) < max_new_tokens:
        out.append(int(logits.argmax()))
        if out[-1] in stop_ids:
            break
        logits = engine.forward([out[-1]], scoring=False)
    t2 = time.perf_counter()
    engine.rewind(*after_prefill)  # decoding never evicts: the prefilled cache is intact
    answer_logits = torch.cat((last[None], engine.forward(answer[:-1], scoring=False, all_logits=True)))
    log_probs = answer_logits.float().log_softmax(-1).gather(-1, torch.tensor(answer)[:, None].to(last.device))[:, 0]
    top1 = answer_logits.argmax(-1)
    reference = reference or Reference(log_probs, top1)
    prediction = tokenizer.decode([t for t in out if t not in stop_ids])
    result = ItemResult(
        policy=settings.policy, budget=settings.budget if settings.evicts else 0, prompt_tokens=len(prompt),
        score=score(item, prediction), answer_tokens=len(answer), log_likelihood=log_probs.sum().item(), ll_gap=(log_probs.sum() - reference.log_probs.sum()).item(),
        top1_agreement=(top1 == reference.top1).float().mean().item(), needle_retention=retention,
        needle_in_tail=any(r.stop > body for r in encoded.needles),
        compression=len(prompt) / after_prefill[0], pool_bytes=engine.pool.nbytes,
        prefill_tps=len(prompt) / (t1 - t0), decode_tps=len(out) / max(t2 - t1, 1e-9),
        peak_memory=peak_memory_bytes(last.device), prediction=prediction)
    return result, reference
