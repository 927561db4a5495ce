"""Which layers' retaining heads find held-out needles: for each global layer (those that evict
and have heads; all of them but a hybrid model's sliding-window layers), and for ranges of them, the
share of needle tokens among the prompt's top eighth when tokens are ranked as a shared eviction
ranks them (mean percentile rank over the layers' KV heads), in one full forward per item of the
held-out suite's validation split (never the test split) or of another task. What `--shared-layers`
is chosen from.

    python bench/layers.py                          # default model and heads, 2K tokens, n = 24
    python bench/layers.py --ranges all,13-22 --n 8 --out runs/layers
    python bench/layers.py --task vt --ranges 13-22 --share 0.0625 --n 12     # vt's chain at 1/16

The last row is the training labels' own ranking (a token's best rank in any layer: train.py
--target shared), what perfect heads would reach. Besides the whole needle, the share of its value
tokens (those that are also tokens of the gold answer), and for the held-out suite that share by the
kind of value asked (number, words, name, code, date) for the rows `--ranges` names. Tables to
stdout and OUT.md."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch
from tqdm import tqdm

from locret.errors import LocretError, run_script
from locret.eval.evaluation import encode_item
from locret.eval.heldout import ATTRIBUTES
from locret.eval.tasks import TASKS, is_text_task, make_item
from locret.heads import load_heads
from locret.loading.checkpoint import open_checkpoint
from locret.loading.official_heads import find_heads
from locret.loading.weights import DTYPES
from locret.loading.zoo import DEFAULT_MODEL
from locret.ranking import percentile_rank, shared_rank
from locret.settings import layer_slice
from locret.train.labels import LabelRecorder
from locret.train.targets import best_rank

LABELS = "labels (best rank in any layer)"  # the last row: the training target's own ranking


def needle_share(score: torch.Tensor, needle: list[int], share: float) -> float:
    """score [P]: the share of `needle` positions among the prompt's top `share` by it."""
    return (percentile_rank(score)[needle] >= 1 - share).float().mean().item()


def value_kind(question: str) -> str:
    """The kind of value a held-out question asks for (its attribute names it); "-" elsewhere."""
    kinds = (kind for kind, attrs in ATTRIBUTES.items() if any(a in question for a in attrs))
    return next(kinds, "-")


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


@torch.inference_mode()
def main(args: argparse.Namespace) -> None:
    folder, entry, tokenizer, model = open_checkpoint(args.ckpt, args.device, args.dtype)
    heads = find_heads(args.heads, entry, model)
    if heads is None:
        raise LocretError(f"{args.ckpt} has no retaining heads: pass --heads FILE.safetensors")
    load_heads(model, heads)
    global_layers = model.config.global_layers  # one score row each (a hybrid model's few)
    rows = {f"layer {layer}": slice(row, row + 1) for row, layer in enumerate(global_layers)}
    rows |= {name: layer_slice(name, len(global_layers), "--ranges") for name in args.ranges}
    shares = {row: [] for row in [*rows, LABELS]}  # per item: (needle share, value share)
    kinds = []
    for index in tqdm(range(args.n), desc="items", file=sys.stderr):
        item = make_item(args.task, index, args.seed, tokenizer, args.length)
        encoded = encode_item(tokenizer, item, "completion")
        body = len(encoded.prompt) - encoded.question_tokens  # the question is never evicted
        needle = [i for span in encoded.needles for i in span if i < body]
        if not needle:
            continue
        answer_ids = set(encoded.answer)
        # the whole needle where none of its tokens is in the answer
        value = [i for i in needle if encoded.prompt[i] in answer_ids] or needle
        recorder = LabelRecorder(model.config, len(encoded.prompt))
        ids = torch.tensor([encoded.prompt + encoded.answer], device=model.lm_head.weight.device)
        model(ids, cache=recorder, last_only=True)
        scores, labels = (t[..., :body].float() for t in recorder.stacked())  # [L, 1, KVH, body]
        ranked = {row: shared_rank(scores[layers])[0] for row, layers in rows.items()}
        ranked[LABELS] = best_rank(labels)[0]
        for row, score in ranked.items():
            shares[row].append((needle_share(score, needle, args.share),
                                needle_share(score, value, args.share)))
        kinds.append(value_kind(item.question))
    table = "\n".join(share_table(shares, args)) + "\n"
    if set(kinds) - {"-"}:
        by_kind = kind_table(shares, kinds, [*args.ranges, LABELS], args.share)
        table += "\n" + "\n".join(by_kind) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".md").write_text(table)
    print(table, end="")


def share_table(shares: dict, args: argparse.Namespace) -> list[str]:
    items = len(shares[LABELS])
    md = [f"| ranked by | needle tokens in the top {args.share:g} ({items} {args.task} items) "
          "| value tokens |",
          "|---|---|---|"]
    return md + [f"| {row} | {mean([n for n, _ in v]):.2f} | {mean([x for _, x in v]):.2f} |"
                 for row, v in shares.items()]


def kind_table(shares: dict, kinds: list[str], rows: list[str], share: float) -> list[str]:
    """Value tokens in the top `share` by the kind of value asked, for `rows`."""
    names = sorted(set(kinds))
    md = [f"| value tokens in the top {share:g}, ranked by | " + " | ".join(
        f"{k} ({kinds.count(k)})" for k in names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        by_kind = [mean([x for (_, x), k in zip(shares[row], kinds) if k == name])
                   for name in names]
        md.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in by_kind) + " |")
    return md


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help="zoo model or folder")
    p.add_argument("--heads", default=None, help="retaining heads (default: the zoo's)")
    p.add_argument("--task", default="heldout_val",
                   choices=[t for t in TASKS if not is_text_task(t)],
                   help="items to rank (default: heldout_val, the held-out suite's validation "
                   "split)")
    p.add_argument("--ranges", type=lambda t: t.split(","), default=["all", "13-22"],
                   help="layer ranges to rank together, as --shared-layers takes them "
                   "(numbered among the global layers; default: all,13-22)")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens")
    p.add_argument("--share", type=float, default=1 / 8,
                   help="the top share of the prompt counted (default: 1/8)")
    p.add_argument("--n", type=int, default=24, help="items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/layers", help="writes OUT.md")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    args = p.parse_args(argv)
    if args.n < 1 or not 0 < args.share < 1:
        p.error("need --n >= 1 and 0 < --share < 1")
    for name in args.ranges:
        layer_slice(name, flag="--ranges")  # one clear line for a malformed range
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
