"""Needles in streams past the model's window: each document is compressed once, as
`generate.py --prompt - --question` streams it, then asked one question per needle.

    python bench/needle_stream.py                                       # default model (8K window)
    python bench/needle_stream.py --ckpt gemma-3-270m --heads H.safetensors   # 32K window
    python bench/needle_stream.py --lengths 16384 --streams 1 --policies locret,last-window

Per length, --streams documents of held-out prose (R's manuals, the held-out suite's test split,
wrapping round past its end) sized to the length in the model's tokens (within 1%), one held-out
needle (statement, question, answer cue, value) at each of --depths, distinct subjects, in
completion form. Each evicting policy prefills the stream in chunks under --budget (the zoo's other
defaults, stabilizers their share of it, n_loc the longest question), then answers each question
(the suite's completion tail: question, then answer cue) greedily from the same compressed context.
last-window is the obvious user baseline: full attention over the stream's last window - (question
+ --max-new-tokens) tokens. An answer is correct when it holds the value (the suite's scorer).

One JSON line per (length, stream, policy) is appended to --out as it finishes (a rerun skips
those recorded): the prefill (context tokens, seconds, tok/s), the pool's bytes, the process's
peak RSS so far (VmHWM: process-wide, so the peak over every run before it too), and per needle
its depth, first token's position, question tokens, value, answer and correct (0/1). The table
(stdout and --out as .md): recall at each depth, overall recall with its exact (Clopper-Pearson)
95% interval, prefill tok/s and pool MiB, per policy and length. CPU, 2 cores: the default grid
took 52 minutes (Gemma 3 270M's 37)."""
import argparse
import bisect
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as a script

from locret.context import Context
from locret.errors import LocretError, run_script, seed
from locret.eval import heldout
from locret.eval.results import append, heads_identity
from locret.eval.stats import exact_interval
from locret.eval.task_base import Item, insert, words_of
from locret.eval.tasks import completion_prompt, score
from locret.heads import load_heads
from locret.loading.checkpoint import open_checkpoint
from locret.loading.official_heads import find_heads
from locret.loading.text_stream import BLOCK
from locret.loading.weights import DTYPES, stop_token_ids
from locret.loading.zoo import DEFAULT_MODEL
from locret.memory import rss_bytes
from locret.plan import default_settings, fit, heads_eviction
from locret.policies import EVICTING
from locret.prompt import document_head, question_ids

LAST_WINDOW = "last-window"
TASK = "heldout_test"  # the held-out suite's completion form and scorer
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")  # where heldout.needle_task cuts its prose
TOLERANCE = 0.01  # a document's tokens within 1% of its length
GRID = dict(lengths="65536,131072", depths=",".join(f"{0.05 + 0.1 * i:.2f}" for i in range(10)),
            budget=2048, chunk=None, max_new_tokens=16)
QUICK = dict(lengths="600,1200", depths="0.2,0.5,0.8", budget=64, chunk=32, max_new_tokens=8)


@dataclass
class Document:
    text: str
    head: list[int]  # what the stream starts with (document_head: BOS in completion form)
    ids: list[int]  # the text's tokens, as feed_text makes them
    facts: list[Item]  # one per depth
    positions: list[int]  # each needle's first token in head + ids

    @property
    def tokens(self) -> int:
        return len(self.head) + len(self.ids)


def haystack_with_needles(words: list[str], start: int, n_words: int, facts: list[Item]) -> str:
    """`n_words` words from `start` (wrapping round), a needle at each fact's depth."""
    hay = " ".join(words[(start + i) % len(words)] for i in range(n_words))
    needles, depths = [f.needles[0] for f in facts], [f.depth for f in facts]
    return " ".join(insert(SENTENCE_END.split(hay), needles, depths))


def make_document(tokenizer, length: int, depths: list[float], stream_seed: int) -> Document:
    """A seeded document of about `length` tokens: its word count rescaled until it fits."""
    rng, subjects = random.Random(stream_seed), []
    words = words_of(heldout.text("test"))
    start = rng.randrange(len(words))
    facts = []
    for depth in depths:
        fact = heldout.random_fact(rng, subjects)
        facts.append(Item(TASK, "", needles=[fact.pop("needle")], depth=depth, **fact))
    head, n_words = document_head(tokenizer, chat=False), length
    for _ in range(8):
        text = haystack_with_needles(words, start, n_words, facts)
        ids, offsets = tokenizer.encode_plain_with_offsets(text)
        if abs(len(head) + len(ids) - length) <= TOLERANCE * length:
            break
        n_words = max(1, round(n_words * (length - len(head)) / len(ids)))
    ends = [end for _, end in offsets]
    positions = [len(head) + bisect.bisect_right(ends, text.find(f.needles[0])) for f in facts]
    return Document(text, head, ids, facts, positions)


def use_heads(model, heads: Path | None) -> None:
    """Retaining heads on for locret, off for the others (their prefill would pay for them)."""
    if heads:
        load_heads(model, heads)
    else:
        for attention in model.global_attention:
            attention.retaining_head = None


def compressed(model, tokenizer, entry, policy: str, heads, doc: Document, args,
               question: int) -> Context:
    """The stream as generate.py --question prefills it: RoPE of the window, text in pieces."""
    eviction = heads_eviction(heads) if policy == "locret" else "per-head"
    choices = {"budget": args.budget, "n_loc": question} | chunk_choice(args)
    plan = fit(model, default_settings(entry, policy, eviction), choices, None,
               args.max_new_tokens)
    window = model.config.max_position_embeddings
    context = Context(model, plan.settings, plan.capacity, window, tokenizer,
                      progress=sys.stderr.isatty())
    context.feed(doc.head)
    for i in range(0, len(doc.text), BLOCK):
        context.feed_text(doc.text[i:i + BLOCK])
    return context


def last_window(model, entry, doc: Document, args, question: int) -> Context:
    """Full attention over the stream's last tokens that leave room in the window for the question
    and the answer (after the document's head, as generate.py would feed them)."""
    room = question + args.max_new_tokens
    kept = min(model.config.max_position_embeddings - room, doc.tokens)
    defaults = default_settings(entry, "full")
    # sliding-window layers keep one chunk of room: the question and answer must fit it to rewind
    chunk = max(chunk_choice(args).get("chunk", defaults.chunk), room)
    plan = fit(model, defaults, {"n_loc": question, "chunk": chunk}, kept + question,
               args.max_new_tokens)
    context = Context(model, plan.settings, plan.capacity, model.config.max_position_embeddings,
                      progress=sys.stderr.isatty())
    context.feed(doc.head + doc.ids[len(doc.ids) - (kept - len(doc.head)):])
    return context


def chunk_choice(args) -> dict:
    return {"chunk": args.chunk} if args.chunk else {}


def run_policy(model, tokenizer, entry, stops: set[int], policy: str, heads, doc: Document,
               args) -> dict:
    """Compress `doc` once under `policy`, then ask each needle's question of it."""
    tails = [question_ids(tokenizer, completion_prompt(f), chat=False) for f in doc.facts]
    question = max(map(len, tails))
    use_heads(model, heads if policy == "locret" else None)
    context = (last_window(model, entry, doc, args, question) if policy == LAST_WINDOW else
               compressed(model, tokenizer, entry, policy, heads, doc, args, question))
    context.close()
    needles = []
    for fact, tail, position in zip(doc.facts, tails, doc.positions):
        out, stats = context.ask(tail, args.max_new_tokens, stops)
        answer = tokenizer.decode([t for t in out if t not in stops])
        needles.append(dict(depth=fact.depth, position=position, question_tokens=len(tail),
                            kind=fact.kind, value=fact.answers[0], answer=answer,
                            correct=int(score(fact, answer) == 1)))
    return dict(context_tokens=context.tokens, prefill_seconds=context.prefill_seconds,
                prefill_tok_s=context.tokens / context.prefill_seconds,
                pool_bytes=stats.pool_bytes, peak_rss_so_far_bytes=rss_bytes("VmHWM"),
                needles=needles)


def run_key(row: dict) -> tuple:
    return row["ckpt"], row["heads"], row["budget"], row["seed"], row["length"], row["policy"]


def read_rows(path: Path) -> list[dict]:
    """The runs recorded so far; a last line cut short by a kill is left out (done again)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise LocretError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def summarize(rows: list[dict], policies: list[str], depths: list[float]) -> list[dict]:
    """Per policy and length: correct answers and questions at each depth and overall."""
    out = []
    for policy in policies:
        for length in sorted({r["length"] for r in rows}):
            runs = [r for r in rows if (r["policy"], r["length"]) == (policy, length)]
            needles = [n for r in runs for n in r["needles"]]
            at = lambda d: [n["correct"] for n in needles if n["depth"] == d]
            correct = sum(n["correct"] for n in needles)
            out.append(dict(policy=policy, length=length, correct=correct, n=len(needles),
                            by_depth=[(sum(at(d)), len(at(d))) for d in depths],
                            interval=exact_interval(correct, len(needles)),
                            prefill_tok_s=sum(r["prefill_tok_s"] for r in runs) / len(runs),
                            pool_bytes=max(r["pool_bytes"] for r in runs)))
    return out


def table(summary: list[dict], depths: list[float], note: str) -> str:
    lines = ["| policy | tokens | " + " | ".join(f"{d:g}" for d in depths)
             + " | recall (exact 95%) | prefill tok/s | pool MiB |",
             "|---|---|" + "---|" * len(depths) + "---|---|---|"]
    for s in summary:
        low, high = s["interval"]
        cells = [f"{c}/{n}" for c, n in s["by_depth"]]
        lines.append(f"| {s['policy']} | {s['length']} | {' | '.join(cells)} | {s['correct']}/"
                     f"{s['n']} = {100 * s['correct'] / s['n']:.0f}% ({low:.0f}-{high:.0f}) | "
                     f"{s['prefill_tok_s']:.1f} | {s['pool_bytes'] / 2**20:.1f} |")
    return "\n".join(lines + ["", note])


def main(args: argparse.Namespace) -> None:
    folder, entry, tokenizer, model = open_checkpoint(args.ckpt, args.device, args.dtype)
    heads = find_heads(args.heads, entry, model) if "locret" in args.policies else None
    if "locret" in args.policies and heads is None:
        raise LocretError(f"locret needs retaining heads and {args.ckpt} ships none: pass --heads "
                          "FILE.safetensors (or leave locret out of --policies)")
    if heads:
        load_heads(model, heads)  # a heads file that does not fit fails now, not hours in
    stops, window = stop_token_ids(folder, tokenizer), model.config.max_position_embeddings
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {run_key(r): r for r in read_rows(out)}
    rows = []
    with open(out, "a") as log:
        for length in args.lengths:
            for stream_seed in range(args.seed, args.seed + args.streams):
                doc = None  # built only if a run is left to do
                for policy in args.policies:
                    meta = dict(ckpt=args.ckpt, budget=args.budget, seed=stream_seed,
                                length=length, policy=policy,
                                heads=heads_identity(heads) if policy == "locret" else None)
                    if run_key(meta) not in done:
                        doc = doc or make_document(tokenizer, length, args.depths, stream_seed)
                        row = meta | dict(window=window, document_tokens=doc.tokens, **run_policy(
                            model, tokenizer, entry, stops, policy, heads, doc, args))
                        append(log, row)
                        done[run_key(row)] = row
                        print(f"{length} tokens, seed {stream_seed}, {policy}: "
                              f"{sum(n['correct'] for n in row['needles'])}/{len(args.depths)}, "
                              f"prefill {row['prefill_tok_s']:.1f} tok/s", file=sys.stderr)
                    rows.append(done[run_key(meta)])
    note = (f"{args.ckpt} ({window}-token window), budget {args.budget}, {args.streams} stream(s) "
            f"per length, greedy {args.max_new_tokens} new tokens; {LAST_WINDOW}: full attention "
            f"over the last {window} - (question + {args.max_new_tokens}) tokens")
    report = table(summarize(rows, args.policies, args.depths), args.depths, note)
    print(report)
    out.with_suffix(".md").write_text(report + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help=f"zoo name or HF-layout folder (default: {DEFAULT_MODEL})")
    p.add_argument("--heads", help="retaining heads for locret (default: the zoo's shipped heads)")
    p.add_argument("--lengths", help=f"stream lengths in tokens, comma-separated (default: "
                   f"{GRID['lengths']}; --quick: {QUICK['lengths']})")
    p.add_argument("--streams", type=int, default=2,
                   help="documents per length, seeded --seed, --seed + 1, ... (default: 2)")
    p.add_argument("--depths", help=f"needle depths in [0, 1], one needle each (default: "
                   f"{GRID['depths']}; --quick: {QUICK['depths']})")
    p.add_argument("--policies", default=f"locret,streamingllm,snapkv,{LAST_WINDOW}",
                   help="evicting policies and last-window, comma-separated (default: "
                   "%(default)s)")
    p.add_argument("--budget", type=int, help=f"cache entries kept per KV head (default: "
                   f"{GRID['budget']}; --quick: {QUICK['budget']})")
    p.add_argument("--chunk", type=int,
                   help=f"prefill chunk in tokens (default: the zoo's; --quick: {QUICK['chunk']})")
    p.add_argument("--max-new-tokens", type=int, help=f"answer tokens, greedy (default: "
                   f"{GRID['max_new_tokens']}; --quick: {QUICK['max_new_tokens']})")
    p.add_argument("--seed", type=seed, default=0, help="first stream's seed (default: 0)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 where native, "
                   "else float32")
    p.add_argument("--out", default="bench/results/needle_stream.jsonl",
                   help="JSON lines, resumed; the table goes next to it as .md (default: "
                   "%(default)s)")
    p.add_argument("--quick", action="store_true", help="a tiny grid, for tests")
    args = p.parse_args(argv)
    grid = QUICK if args.quick else GRID
    for name, value in grid.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        args.depths = [float(x) for x in args.depths.split(",")]
    except ValueError:
        p.error("--lengths must be integers and --depths numbers, comma-separated")
    args.policies = args.policies.split(",")
    if unknown := [x for x in args.policies if x not in [*EVICTING, LAST_WINDOW]]:
        p.error(f"unknown policy: {', '.join(unknown)} (choose from {', '.join(EVICTING)}, "
                f"{LAST_WINDOW}; full attention past the window is {LAST_WINDOW})")
    if not all(0 <= d <= 1 for d in args.depths) or len(set(args.depths)) < len(args.depths):
        p.error("--depths must be distinct numbers in [0, 1]")
    if len(args.depths) > len(heldout.SUBJECTS):
        p.error(f"at most {len(heldout.SUBJECTS)} --depths (one subject each)")
    if min(args.lengths + [args.streams, args.budget, args.max_new_tokens]) < 1:
        p.error("--lengths, --streams, --budget and --max-new-tokens must be positive")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
