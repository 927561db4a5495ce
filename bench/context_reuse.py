"""What a saved context saves: time to the first answer token from a loaded compressed context
against re-prefilling the document, and the answers agree token for token.

    python bench/context_reuse.py                       # an 8K-token document on the default model
    python bench/context_reuse.py --tokens 4096 --repeats 5

The document is seeded pseudo-English (as in bench/stream.py), the settings generate.py's for the
model and its heads. Per repeat: prefill the document and ask (the cost a new question pays
without reuse); save the context; load it and ask (the cost with reuse). Medians."""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as a script

import torch

from locret.context import Context
from locret.errors import LocretError, run_script
from locret.eval.synthetic import QUESTION, text_blocks
from locret.heads import load_heads
from locret.loading.checkpoint import open_checkpoint
from locret.loading.official_heads import find_heads
from locret.loading.weights import DTYPES
from locret.loading.zoo import DEFAULT_MODEL
from locret.plan import default_settings, fit, heads_eviction
from locret.settings import NEEDS_HEADS

ANSWER_TOKENS = 16  # compared between the fresh and the loaded context


def first_token(context: Context, question: list[int]) -> tuple[int, float]:
    t0 = time.perf_counter()
    out, _ = context.ask(question, max_new_tokens=1)
    return out[0], time.perf_counter() - t0


@torch.inference_mode()
def main(args: argparse.Namespace) -> None:
    folder, entry, tokenizer, model = open_checkpoint(args.ckpt, args.device, args.dtype)
    heads = find_heads(None, entry, model)
    if heads is None:
        raise LocretError(NEEDS_HEADS)
    load_heads(model, heads)
    document = tokenizer.encode_plain("".join(text_blocks(args.tokens * 6, seed=0)))[:args.tokens]
    question = tokenizer.encode_plain("\n\n" + QUESTION)
    room = len(question) + ANSWER_TOKENS
    defaults = default_settings(entry, "locret", heads_eviction(heads))
    plan = fit(model, defaults, {}, len(document), room)
    fresh, reused, saved_answers, fresh_answers = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ctx.safetensors"
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            context = Context(model, plan.settings, plan.capacity, len(document) + len(question))
            context.feed(document)
            token, _ = first_token(context, question)
            fresh.append(time.perf_counter() - t0)
            fresh_answers.append(context.ask(question, ANSWER_TOKENS)[0])
            context.save(path)
            t0 = time.perf_counter()
            loaded, _ = Context.load(path, model, room=room)
            token_loaded, _ = first_token(loaded, question)
            reused.append(time.perf_counter() - t0)
            saved_answers.append(loaded.ask(question, ANSWER_TOKENS)[0])
            if token_loaded != token:
                raise LocretError("the loaded context answered differently")
        size = path.stat().st_size
    same = saved_answers == fresh_answers
    f, r = statistics.median(fresh), statistics.median(reused)
    print("| document tokens | re-prefill + question (s) | load + question (s) | ratio | "
          f"file (MiB) | same {ANSWER_TOKENS} tokens |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(document)} | {f:.2f} | {r:.3f} | {100 * r / f:.1f}% | {size / 2**20:.1f} | "
          f"{same} |")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help=f"zoo model with retaining heads (default: {DEFAULT_MODEL})")
    p.add_argument("--tokens", type=int, default=8192, help="document tokens (default: 8192)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per measurement; medians are reported")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        p.error("--tokens must be at least 2 and --repeats at least 1")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
