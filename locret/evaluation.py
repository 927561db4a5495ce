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
    needles: list[range]  # token positions of each needle in the prompt


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
    needle_retention: float  # share of needle tokens kept after prefill, over layers and KV heads
    compression: float  # prompt tokens / budget
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
    prompt = tokenizer.encode(text, add_special_tokens=form == "completion")
    joined = tokenizer.encode(text + gold, add_special_tokens=form == "completion")
    answer = joined[len(prompt):] if joined[:len(prompt)] == prompt else tokenizer.encode(gold, add_special_tokens=False)
    needles = []
    for needle in item.needles:
        start = text.find(needle)
        if start >= 0:
            first = len(tokenizer.encode(text[:start], add_special_tokens=False))
            needles.append(range(first, len(tokenizer.encode(text[:start + len(needle)], add_special_tokens=False))))
    return Encoded(prompt, answer, needles)


def needle_retention(engine: Engine, needles: list[range]) -> float:
    """Share of needle tokens still in the pool, averaged over layers and KV heads."""
    if not needles:
        return float("nan")
    kept = engine.pool.index[..., :engine.pool.length]  # [L, B, KVH, n]
    wanted = torch.tensor([i for r in needles for i in r], device=kept.device)
    return torch.isin(kept, wanted).sum(dim=-1).float().mean().item() / len(wanted)


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
    retention = needle_retention(engine, encoded.needles)
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
        compression=len(prompt) / settings.budget if settings.evicts else 1.0, pool_bytes=engine.pool.nbytes,
        prefill_tps=len(prompt) / (t1 - t0), decode_tps=len(out) / max(t2 - t1, 1e-9),
        peak_memory=peak_memory_bytes(last.device), prediction=prediction)
    return result, reference
