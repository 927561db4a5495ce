"""A compressed context: a document prefilled chunk by chunk as it arrives, under the fixed budget,
then asked any number of questions from the same compressed cache (each answer forgotten after it).

    context = Context(model, settings, capacity, rope_length, tokenizer)
    context.feed_text(piece)  # repeatedly; or feed(ids). A chunk runs (and evicts) once it is full
    answer, stats = context.ask(question_ids, max_new_tokens=32)
    context.save("doc.ctx.safetensors")  # Context.load(...) answers from it without the document

A full chunk runs only once a token after it arrives, so the document's last chunk is known when
the first question closes the context, and it is evicted as in the official code: stabilizers
protected unless `settings.final_stabilizers` is off. The question is the uncompressed n_loc
tail. Nothing kept grows with the document: neither its text nor its token ids."""
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from models import CausalLM

from . import context_file
from .engine import Engine, Mark
from .errors import LocretError
from .loading.text_stream import StreamEncoder
from .loading.tokenizer import Tokenizer
from .memory import format_bytes, peak_memory_bytes
from .sampling import Sampling, sample
from .settings import Settings, check_settings, pool_capacity


@dataclass
class GenerationStats:
    prompt_tokens: int  # the context's and the question's
    new_tokens: int
    chunks: int
    kept_after_prefill: int  # entries per KV head in the pool after prefill (the question included)
    prefill_seconds: float  # the context's prefill (0 when loaded) and the question's
    question_tokens: int
    question_seconds: float
    decode_seconds: float
    pool_bytes: int
    peak_memory_bytes: int

    @property
    def compression(self) -> float:
        """Prompt tokens per cache entry kept."""
        return self.prompt_tokens / self.kept_after_prefill

    def summary(self, s: Settings, loaded: bool = False) -> str:
        """One line: policy, prompt (or loaded context and question), pool, speed, memory."""
        layers = "" if s.shared_layers == "all" else f" by layers {s.shared_layers}"
        shared = f", shared eviction{layers}" if s.eviction == "shared" else ""
        span = f", span {s.span}" if s.policy == "locret" and s.span > 1 else ""
        budget = f"budget {s.budget}{shared}{span}" if s.evicts else "no eviction"
        per_s = lambda n, seconds: f"{n / max(seconds, 1e-9):.1f} tok/s"
        if loaded:
            prompt = [f"loaded context of {self.prompt_tokens - self.question_tokens} tokens",
                      f"question {self.question_tokens} tokens in {self.question_seconds:.2f} s"]
        else:
            prompt = [f"prompt tokens {self.prompt_tokens} in {self.chunks} chunks",
                      f"prefill {per_s(self.prompt_tokens, self.prefill_seconds)}"]
        return " | ".join([f"policy {s.policy} ({budget})", *prompt,
                           f"KV pool {format_bytes(self.pool_bytes)}{' (int8)' * s.kv_int8}",
                           f"compression {self.compression:.1f}x",
                           f"decode {self.new_tokens} tokens, "
                           f"{per_s(self.new_tokens, self.decode_seconds)}",
                           f"peak memory {format_bytes(self.peak_memory_bytes)}"])


class Context:
    """One document in one pool. `capacity`: entries per KV head (pool_capacity() of the
    settings); `rope_length`: the prompt length that picks the RoPE frequencies (for a stream of
    unknown length, the model's window); a `tokenizer` enables feed_text()."""

    def __init__(self, model: CausalLM, settings: Settings, capacity: int, rope_length: int,
                 tokenizer: Tokenizer | None = None, progress: bool = False,
                 total: int | None = None):
        self.engine = Engine(model, settings, capacity, rope_length)
        self.settings, self.pool = settings, self.engine.pool
        self.encoder = StreamEncoder(tokenizer) if tokenizer else None
        self.pending: list[int] = []  # fed ids not prefilled yet: at most one chunk
        self.tokens = self.chunks = 0  # prefilled so far, chunks run
        self.prefill_seconds, self.last_logits = 0.0, None
        self.closed_at: Mark | None = None  # where the pools stood once closed
        self.spent = False  # answering moved kept entries: the context cannot be rewound
        self.bar = tqdm(total=total, desc="prefill", unit="tok", disable=not progress, leave=False)

    def feed(self, ids: list[int]) -> None:
        """Append token ids to the document; every chunk that more ids follow runs now."""
        if self.closed_at:
            raise LocretError("the context is closed: "
                              "feed the whole document before the first question")
        ids, start, chunk = self.pending + list(ids), 0, self.settings.chunk
        while len(ids) - start > chunk:  # not the document's last chunk
            self.run_chunk(ids[start:start + chunk], protect=True)
            start += chunk
        self.pending = ids[start:]

    def feed_text(self, text: str) -> None:
        """Append text, tokenized incrementally (the same ids as tokenizing the whole document)."""
        if self.encoder is None:
            raise LocretError("feed_text needs a Context made with a tokenizer")
        self.feed(self.encoder.push(text))

    @torch.inference_mode()  # every forward and eviction: heads' parameters must not build a graph
    def run_chunk(self, tokens: list[int], protect: bool) -> None:
        s, t0 = self.settings, time.perf_counter()
        self.last_logits = self.engine.forward(tokens, scoring=s.evicts)
        if s.evicts and self.pool.length > s.budget:
            self.engine.evict(protect)
        self.prefill_seconds += time.perf_counter() - t0
        self.tokens, self.chunks = self.tokens + len(tokens), self.chunks + 1
        self.bar.update(len(tokens))
        self.bar.set_postfix(cache=self.pool.length, refresh=False)

    def close(self) -> None:
        """End the document: run its last chunk (on the first question, or before saving)."""
        if self.closed_at:
            return
        if self.encoder:
            self.feed(self.encoder.finish())
        if self.pending:
            self.run_chunk(self.pending, protect=self.settings.final_stabilizers)
        self.engine.settle_keys()
        self.pending, self.closed_at = [], self.engine.mark()
        self.bar.close()

    @torch.inference_mode()
    def start(self, tail: list[int]) -> torch.Tensor:
        """Close, then run `tail` (the question) without eviction; its last token's logits [V]."""
        self.close()
        if self.spent:
            raise LocretError("this context's cache moved on while answering (evictions while "
                              "decoding, or sliding-window layers past their room): "
                              "it answered its one question")
        self.engine.rewind(self.closed_at)
        if tail:
            s = self.settings
            scoring = s.evicts and (s.evict_during_decode or s.score_question)
            return self.engine.forward(tail, scoring=scoring)
        if self.last_logits is None:
            raise LocretError("nothing to answer from: the context and the question are both empty")
        return self.last_logits

    def feed_body(self, prompt: list[int]) -> list[int]:
        """Feed all but the prompt's last n_loc tokens; return those (the question, not evicted)."""
        body = len(prompt) - self.settings.n_loc
        self.feed(prompt[:body])
        return prompt[body:]

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """Feed the prompt's body, close, and run its n_loc tail: the last logits [V]."""
        return self.start(self.feed_body(prompt))

    @torch.inference_mode()
    def ask(self, tail: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset(),
            sampling: Sampling = Sampling(), on_token: Callable[[int], None] | None = None
            ) -> tuple[list[int], GenerationStats]:
        """Answer after the question `tail` (token ids): up to `max_new_tokens`, stopping at
        `stop_ids`. The context is as before afterwards, ready for another question."""
        self.close()
        t0 = time.perf_counter()
        logits = self.start(tail)
        question_seconds, kept = time.perf_counter() - t0, self.pool.length
        generator = torch.Generator(logits.device).manual_seed(sampling.seed)
        out, t1 = [], time.perf_counter()
        while len(out) < max_new_tokens:
            # one reduction per step: stop rather than print garbage
            if not torch.isfinite(logits).all():
                raise LocretError("the model produced NaN or inf logits (broken weights, "
                                  "or float16 overflow: try --dtype bfloat16 or float32)")
            out.append(sample(logits, sampling, generator))
            if on_token:
                on_token(out[-1])
            if out[-1] in stop_ids or len(out) == max_new_tokens:
                break
            logits = self.engine.decode_step(out[-1])
        self.spent = self.engine.moves > self.closed_at.moves  # no rewinding
        if not self.spent:
            self.engine.rewind(self.closed_at)
        stats = GenerationStats(
            prompt_tokens=self.tokens + len(tail), new_tokens=len(out),
            chunks=self.chunks + bool(tail), kept_after_prefill=kept,
            prefill_seconds=self.prefill_seconds + question_seconds, question_tokens=len(tail),
            question_seconds=question_seconds, decode_seconds=time.perf_counter() - t1,
            pool_bytes=self.engine.nbytes, peak_memory_bytes=peak_memory_bytes(logits.device))
        return out, stats

    @torch.inference_mode()
    def teacher_forced(self, tail: list[int], answer: list[int]) -> torch.Tensor:
        """Logits [len(answer), V] predicting each token of `answer` after the question `tail`."""
        logits = [self.start(tail)[None]]  # predicts the answer's first token
        if len(answer) > 1:
            logits.append(self.engine.forward(answer[:-1], scoring=False, all_logits=True))
        self.engine.rewind(self.closed_at)
        return torch.cat(logits)

    def save(self, path, **metadata: str) -> None:
        """Close, then write the compressed context with `metadata` strings (e.g. the prompt form).
        """
        self.close()
        if self.spent:
            raise LocretError("this context evicted while decoding: "
                              "it no longer holds the compressed document")
        context_file.write(self, path, metadata)

    @classmethod
    def load(cls, path, model: CausalLM, room: int,
             positions: str | None = None) -> tuple["Context", dict]:
        """(context, metadata): a closed context from `path`, with `room` entries free for a
        question and its answer. Refuses a file from another model, retaining heads, dtype or (if
        given) position mode."""
        tensors, meta, settings = context_file.read(path, model, positions)
        length = tensors["k"].shape[3]
        context = cls(model, settings, length + room, int(meta["rope_length"]))
        context.pool.load(tensors, seen=int(meta["seen"]))
        if context.engine.windows:
            context.engine.windows.load(tensors["window_k"], tensors["window_v"])
        context.engine.settle_keys(turn=meta["keys"] == "before-rope")
        if meta["keys"] == "rotated" and context.engine.raw_keys:  # they would be turned twice
            raise LocretError(f"{path}: damaged context file "
                              "(turned keys in a pool that keeps them before RoPE)")
        context.tokens, context.closed_at = int(meta["tokens"]), context.engine.mark()
        context.bar.close()
        return context, meta


@torch.inference_mode()
def generate(model: CausalLM, prompt: list[int], settings: Settings, max_new_tokens: int,
             stop_ids: set[int] = frozenset()) -> tuple[list[int], GenerationStats]:
    """Prefill `prompt` under `settings` (its last n_loc tokens as the question), then generate."""
    check_settings(settings, len(prompt))
    capacity = pool_capacity(settings, len(prompt), max_new_tokens)
    context = Context(model, settings, capacity, len(prompt), total=len(prompt))
    return context.ask(context.feed_body(prompt), max_new_tokens, stop_ids)
