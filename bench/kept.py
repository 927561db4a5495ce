"""What each policy keeps: after prefill, how the pool's entries split over the parts of the prompt
(the preamble before the context: instruction and any worked example; the needles; the rest of the
context) and the share of needle tokens kept, averaged over items, layers and KV heads. With --show,
the kept text of the first item, run by run, as the first layer's first KV head holds it.

    python bench/kept.py --task vt --budget 1/16 --policies locret,snapkv  # where vt's budget goes
    python bench/kept.py --task heldout_val --budget 1/8 --n 4 --show

Settings are eval.py's defaults: the zoo's chunk, stabilizer share and span, n_loc = the question,
Locret evicting as its heads were trained. Table to stdout (and --out as markdown)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch
from tqdm import tqdm

from locret.context import Context
from locret.errors import run_script
from locret.eval.evaluation import Encoded, encode_item
from locret.eval.suite import budget_is_valid, item_settings, parse_budget
from locret.eval.tasks import TASKS, make_item
from locret.loading.checkpoint import open_checkpoint
from locret.loading.official_heads import attach_heads
from locret.loading.tokenizer import Tokenizer
from locret.loading.weights import DTYPES
from locret.loading.zoo import DEFAULT_MODEL
from locret.plan import default_settings, heads_eviction
from locret.policies import POLICIES
from locret.settings import pool_capacity

PARTS = ["preamble", "needles", "rest of the context"]


def parts_of(encoded: Encoded, body: int) -> torch.Tensor:
    """[body] the part (an index into PARTS) each prompt token before the n_loc tail belongs to."""
    part = torch.full((body,), 2)
    part[:encoded.preamble_tokens] = 0
    for needle in encoded.needles:
        part[needle.start:min(needle.stop, body)] = 1
    return part


def kept_shares(pool, part: torch.Tensor) -> tuple[list[float], float]:
    """The pool's entries by part (shares of all it holds) and the share of needle tokens it holds,
    averaged over layers and KV heads."""
    kept = part[pool.index[..., :pool.length].cpu()]  # [L, B, KVH, n]: each entry's part
    by_part = [(kept == i).float().mean().item() for i in range(len(PARTS))]
    needles = (part == 1).sum().item()
    share = (kept == 1).sum(-1).float().mean().item() / needles if needles else float("nan")
    return by_part, share


def kept_text(pool, tokenizer: Tokenizer, prompt: list[int]) -> list[str]:
    """The first layer's first KV head's entries as runs of consecutive prompt tokens."""
    ids = sorted(pool.index[0, 0, 0, :pool.length].tolist())
    runs = [[ids[0]]]
    for i in ids[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    return [f"{r[0]:6d} +{len(r):<4d} {tokenizer.decode(prompt[r[0]:r[-1] + 1])!r}" for r in runs]


@torch.inference_mode()
def main(args: argparse.Namespace) -> None:
    folder, entry, tokenizer, model = open_checkpoint(args.ckpt, args.device, args.dtype)
    heads = attach_heads(model, args.heads, entry) if "locret" in args.policies else None
    defaults = {p: default_settings(entry, p, heads_eviction(heads)) for p in args.policies}
    budget = parse_budget(args.budget, args.length)
    choices = {"budget": budget, "n_loc": "question"}
    sums = {p: [0.0] * (len(PARTS) + 1) for p in args.policies}
    for index in tqdm(range(args.n), desc="items", file=sys.stderr):
        item = make_item(args.task, index, args.seed, tokenizer, args.length)
        encoded = encode_item(tokenizer, item, "completion")
        body = len(encoded.prompt) - encoded.question_tokens
        for policy in args.policies:
            settings = item_settings(defaults[policy], choices, encoded)
            capacity = pool_capacity(settings, len(encoded.prompt), 1)
            context = Context(model, settings, capacity, len(encoded.prompt))
            context.feed(encoded.prompt[:body])
            context.close()
            by_part, needles = kept_shares(context.pool, parts_of(encoded, body))
            sums[policy] = [s + x for s, x in zip(sums[policy], [*by_part, needles])]
            if args.show and index == 0:
                print(f"\n{policy}, item 0 (prompt {len(encoded.prompt)} tokens, {body} before the "
                      "question):")
                print("\n".join(kept_text(context.pool, tokenizer, encoded.prompt)))
    md = [f"\n{args.task}, {args.length} tokens, budget {budget}, {args.n} items: the pool's "
          "entries by part of the prompt", "",
          f"| policy | {' | '.join(PARTS)} | needle tokens kept |",
          "|---" * (len(PARTS) + 2) + "|"]
    md += [f"| {p} | {' | '.join(f'{s / args.n:.0%}' for s in sums[p])} |" for p in args.policies]
    table = "\n".join(md) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".md").write_text(table)
    print(table, end="")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help="zoo model or folder")
    p.add_argument("--heads", default=None, help="retaining heads (default: the zoo's)")
    p.add_argument("--task", default="vt", choices=sorted(TASKS))
    p.add_argument("--length", type=int, default=2048, help="prompt tokens")
    p.add_argument("--budget", default="1/16",
                   help="a fraction of the prompt (1/8) or entries per KV head (512)")
    p.add_argument("--policies", type=lambda t: t.split(","), default=["locret", "snapkv"])
    p.add_argument("--n", type=int, default=24, help="items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", action="store_true",
                   help="print the first item's kept text for each policy")
    p.add_argument("--out", default=None, help="also write the table to OUT.md")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    args = p.parse_args(argv)
    evicting = [x for x in POLICIES if x != "full"]
    if unknown := [x for x in args.policies if x not in evicting]:
        p.error(f"unknown --policies {', '.join(unknown)} (choose from {', '.join(evicting)})")
    if args.n < 1 or args.length < 1:
        p.error("--n and --length must be positive")
    if not budget_is_valid(args.budget):
        p.error(f"--budget must be a fraction (1/8) or an integer (512), got {args.budget!r}")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
