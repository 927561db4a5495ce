"""Locret's settings against held-out accuracy: stabilizer share of the budget, prefill chunk, score
span, eviction mode and the layers that rank a shared eviction, one at a time around the zoo's
defaults, on the held-out suite's validation split (never the test split), or on any scored task;
with --oracle, also what perfect heads would do (the exact training labels in their place).

    python bench/sensitivity.py           # 2K tokens, budget 1/8, n = 24 (25 min, 2-core CPU)
    python bench/sensitivity.py --stabilizers 0,1/4 --chunks 512 --spans 1 --n 8 --out runs/sens
    python bench/sensitivity.py --stabilizers 1/4 --chunks 512 --spans 1 --evictions per-head \
        --oracle
    python bench/sensitivity.py --task vt --budget 1/16 --stabilizers 1/8 --chunks 256 --spans 9 \
        --evictions shared --oracle

Each item and its full-attention reference are built once and shared by every setting. Rows are
appended to OUT.jsonl as they come (a rerun resumes); the table (accuracy with its Wilson 95%
interval, needle tokens kept, top-1 agreement and log-likelihood gap against full attention) goes to
stdout and OUT.md."""
import argparse
import json
import math
import sys
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch
from tqdm import tqdm

from locret.errors import run_script
from locret.eval.evaluation import Encoded, encode_item, evaluate
from locret.eval.results import append, read_results
from locret.eval.stats import wilson
from locret.eval.suite import item_settings, parse_budget, saved_reference
from locret.eval.tasks import TASKS, is_text_task, make_item
from locret.loading.checkpoint import open_checkpoint
from locret.loading.official_heads import attach_heads
from locret.loading.weights import DTYPES, stop_token_ids
from locret.loading.zoo import DEFAULT_MODEL
from locret.plan import default_settings, heads_eviction
from locret.policies import Precomputed
from locret.ranking import percentile_rank
from locret.settings import EVICTIONS, Settings, layer_slice
from locret.train.labels import LabelRecorder
from locret.train.targets import best_rank

# (scores, eviction)
ORACLES = [("labels", "per-head"), ("labels", "shared"), ("shared labels", "shared"),
           ("joint labels", "shared")]


def grid(args, base: Settings) -> list[dict]:
    """Locret's defaults `base` (evicting as its heads were trained), then each setting varied alone
    (stabilizers as a share of the budget); with --oracle, the training labels in place of the heads
    (ORACLES)."""
    default = {"stabilizers": Fraction(base.stabilizers, base.budget), "chunk": base.chunk,
               "span": base.span, "eviction": base.eviction, "layers": base.shared_layers,
               "scorer": "heads"}
    points = [default]
    varied = (("stabilizers", args.stabilizers), ("chunk", args.chunks), ("span", args.spans),
              ("eviction", args.evictions), ("layers", args.shared_layers))
    for name, values in varied:
        points += [default | {name: v} for v in values if v != default[name]]
    if args.oracle:
        points += [default | {"scorer": scorer, "eviction": mode} for scorer, mode in ORACLES]
    return points


def settings_of(entry, eviction: str, point: dict | None, budget: int,
                encoded: Encoded) -> Settings:
    """A grid point's settings (None: full attention's), n_loc just the item's question."""
    choices = {"n_loc": "question"}
    if point:
        choices |= {"budget": budget, "stabilizers": int(budget * point["stabilizers"]),
                    "chunk": point["chunk"], "span": point["span"], "eviction": point["eviction"],
                    "shared_layers": point["layers"]}
    defaults = default_settings(entry, "locret" if point else "full", eviction)
    return item_settings(defaults, choices, encoded)


def label(point: dict) -> dict:
    return point | {"stabilizers": str(point["stabilizers"])}


def oracle_scores(model, encoded, ranking_layers: slice) -> dict[str, torch.Tensor]:
    """The item's training labels from one frozen forward over prompt + gold answer, [L, 1, KVH, P]:
    each layer's own (`labels`) and, the same for all, each token's best rank in any layer
    (`shared labels`: the graded form of train.py --target shared) or its mean rank over the
    `ranking_layers` (`joint labels`, of --target joint)."""
    recorder = LabelRecorder(model.config, len(encoded.prompt))
    ids = torch.tensor([encoded.prompt + encoded.answer], device=model.lm_head.weight.device)
    model(ids, cache=recorder, last_only=True)
    labels = recorder.stacked()[1]
    everywhere = lambda scores: scores[None, :, None].expand_as(labels)  # [B, P] -> [L, B, KVH, P]
    return {"labels": labels, "shared labels": everywhere(best_rank(labels)),
            "joint labels": everywhere(percentile_rank(labels[ranking_layers]).mean(dim=(0, 2)))}


def summarize(rows: list[dict], points: list[dict]) -> list[str]:
    md = ["| stabilizers (share of budget) | chunk | span | eviction | layers | scores | correct "
          "| % (95% CI) | needle kept | top-1 agree | log-lik gap |", "|---" * 11 + "|"]
    for point in [None, *points]:
        mine = [r for r in rows if r["point"] == (label(point) if point else None)]
        if not mine:
            continue
        right, n = sum(r["score"] for r in mine), len(mine)
        kept = [r["needle_retention"] for r in mine if not math.isnan(r["needle_retention"])]
        mean = lambda key: sum(r[key] for r in mine) / n
        low, high = wilson(right, n)
        name = ("full attention",) + ("-",) * 5 if point is None else tuple(label(point).values())
        md.append(f"| {' | '.join(map(str, name))} | {right:g}/{n} | {100 * right / n:.0f} "
                  f"({low:.0f}-{high:.0f}) | {sum(kept) / max(len(kept), 1):.2f} | "
                  f"{mean('top1_agreement'):.2f} | {mean('ll_gap'):+.1f} |")
    return md


@torch.inference_mode()
def main(args: argparse.Namespace) -> None:
    folder, entry, tokenizer, model = open_checkpoint(args.ckpt, args.device, args.dtype)
    eviction = heads_eviction(attach_heads(model, args.heads, entry))
    stops = stop_token_ids(folder, tokenizer)
    points = grid(args, default_settings(entry, "locret", eviction))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(out.with_suffix(".jsonl"))  # by (task, length, index, policy, budget, mode)
    budget = parse_budget(args.budget, args.length)
    with open(out.with_suffix(".jsonl"), "a") as log:
        for index in tqdm(range(args.n), desc="items", file=sys.stderr):
            item = make_item(args.task, index, args.seed, tokenizer, args.length)
            encoded = encode_item(tokenizer, item, "completion")
            max_new = min(TASKS[args.task].gen_tokens, 128)
            reference, oracle = None, None
            for point in [None, *points]:
                mode = json.dumps(point and label(point))
                key = (args.task, args.length, index, "locret" if point else "full", budget, mode)
                if key in done:
                    if point is None:  # the full-attention reference, as saved
                        reference = saved_reference(done[key])
                    continue
                settings = settings_of(entry, eviction, point, budget, encoded)
                scorer = None
                if point and point["scorer"] != "heads":
                    oracle = oracle or oracle_scores(model, encoded, layer_slice(point["layers"]))
                    scorer = Precomputed(oracle[point["scorer"]], point["span"])
                result, reference = evaluate(model, tokenizer, item, encoded, settings, max_new,
                                             stops, reference, scorer)
                row = {"task": args.task, "length": args.length, "index": index, **asdict(result),
                       "budget": budget, "mode": mode, "point": point and label(point)}
                if point is None:
                    row |= {"answer_log_probs": reference.log_probs.tolist(),
                            "answer_top1": reference.top1.tolist()}
                append(log, row)
                done[key] = row
    table = "\n".join(summarize(list(done.values()), points)) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table, end="")


def fractions(text: str) -> list[Fraction]:
    try:
        return [Fraction(x) for x in text.split(",")]
    except ZeroDivisionError:
        raise ValueError(text) from None  # argparse reports a ValueError as one line


def integers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help="zoo model with retaining heads")
    p.add_argument("--heads", default=None, help="retaining heads (default: the zoo's)")
    p.add_argument("--task", default="heldout_val",
                   choices=[t for t in TASKS if not is_text_task(t)],
                   help="settings are chosen on heldout_val; other scored tasks show where their "
                   "budget goes")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens")
    p.add_argument("--budget", default="1/8",
                   help="a fraction of the prompt (1/8) or entries per KV head (512)")
    p.add_argument("--stabilizers", type=fractions, default=fractions("0,1/8,1/4,1/2"),
                   help="shares of the budget")
    p.add_argument("--chunks", type=integers, default=integers("256,512,1024,2048"))
    p.add_argument("--spans", type=integers, default=integers("1,5,9,15"),
                   help="odd; see eval.py --span")
    p.add_argument("--evictions", type=lambda t: t.split(","), default=["per-head", "shared"],
                   help=f"from {', '.join(EVICTIONS)}")
    p.add_argument("--shared-layers", type=lambda t: t.split(","), default=[],
                   help="layer ranges that rank shared eviction (e.g. all,13-22; see eval.py "
                   "--shared-layers)")
    p.add_argument("--oracle", action="store_true",
                   help="add rows where each item's exact training labels stand in for the heads "
                   "(per layer, and shared across layers by best or mean rank), pooled by the same "
                   "span: what perfect heads for each target would keep")
    p.add_argument("--n", type=int, default=24, help="items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sensitivity", help="writes OUT.jsonl and OUT.md")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    args = p.parse_args(argv)
    unknown = [e for e in args.evictions if e not in EVICTIONS]
    if unknown:
        p.error(f"unknown --evictions {', '.join(unknown)} (choose from {', '.join(EVICTIONS)})")
    for layers in args.shared_layers:
        layer_slice(layers)  # one clear line for a malformed range
    if args.length < 1 or args.n < 1:
        p.error("need --length >= 1 and --n >= 1")
    try:
        if parse_budget(args.budget, args.length) < 1:
            p.error(f"--budget {args.budget} keeps no entries of a {args.length}-token prompt")
    except (ValueError, ZeroDivisionError):
        p.error("--budget must be a fraction of the prompt (1/8) or entries per KV head (512), "
                f"not {args.budget!r}")
    if not all(0 <= share < 1 for share in args.stabilizers):
        p.error("--stabilizers are shares of the budget, each in [0, 1) (e.g. 0,1/8,1/4)")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
