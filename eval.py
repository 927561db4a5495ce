"""Accuracy-vs-budget tables: Locret against the heuristic policies, all in one chunked engine.

    python eval.py                      # the default suite on the default model (under 15 min on a laptop CPU)
    python eval.py --quick              # smoke test
    python eval.py --tasks passkey,vt --lengths 2048,4096 --budgets 1/8,1/16 --n 10

Each item is prefilled once per policy and budget; full attention is the reference for fidelity.
Results are appended to <out>/results.jsonl as they come, so an interrupted run resumes where it
stopped; then <out>/table.md, <out>/table.csv and <out>/accuracy_vs_budget.png are written."""
import argparse
import csv
import json
import math
import sys
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from locret.devices import default_device, default_dtype
from locret.engine import EngineSettings
from locret.errors import run_script
from locret.evaluation import Reference, encode_item, evaluate
from locret.heads import load_heads
from locret.loading import DTYPES, load_model, stop_token_ids
from locret.official_heads import find_heads
from locret.policies import POLICIES
from locret.tasks import TASKS, make_item
from locret.tokenizer import Tokenizer
from locret.zoo import DEFAULT_MODEL, GENERIC_SETTINGS, resolve_checkpoint

DEFAULT_SUITE = dict(tasks="passkey,niah_single_1,vt", lengths="2048", budgets="1/4,1/8,1/16", n=2)
QUICK_SUITE = dict(tasks="passkey", lengths="256", budgets="1/4", n=1)


def parse_budget(text: str, length: int) -> int:
    """'1/8' -> a fraction of the prompt length; '512' -> absolute entries per KV head."""
    return round(length * Fraction(text)) if "/" in text else int(text)


def result_key(row: dict) -> tuple:
    return row["task"], row["length"], row["index"], row["policy"], row["budget"]


def read_results(path: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {result_key(r): r for r in rows}


def settings_for(policy: str, budget: int, args, base) -> EngineSettings:
    """Stabilizers default to a quarter of the budget, so small budgets stay valid."""
    stabilizers = args.stabilizers if args.stabilizers is not None else budget // 4
    return EngineSettings(policy=policy, budget=budget, chunk=args.chunk or base.chunk, stabilizers=stabilizers,
                          n_loc=args.n_loc if args.n_loc is not None else base.n_loc, positions=args.positions,
                          seed=args.seed)


def runs(args, policies: list[str]):
    """Every (task, length, item, policy, budget) the suite asks for; full attention first per item."""
    for length in args.lengths:
        for task in args.tasks:
            for index in range(args.n):
                yield task, length, index, "full", 0
                for policy in policies:
                    for budget in args.budgets:
                        yield task, length, index, policy, parse_budget(budget, length)


def run_suite(model, tokenizer, stop_ids, args, base, policies: list[str], out: Path) -> list[dict]:
    done = read_results(out / "results.jsonl")
    todo = list(runs(args, policies))
    item = encoded = reference = None
    with open(out / "results.jsonl", "a") as log:
        for task, length, index, policy, budget in tqdm(todo, desc="eval", unit="run", file=sys.stderr):
            key = (task, length, index, policy, budget)
            if key in done and policy != "full":
                continue
            if policy == "full":  # a new item: build it and its full-attention reference
                item = make_item(task, index, args.seed, tokenizer, length)
                encoded = encode_item(tokenizer, item, args.form)
                if key in done:
                    reference = Reference(torch.tensor(done[key]["answer_log_probs"]), torch.tensor(done[key]["answer_top1"]))
                    continue
                reference = None
            settings = settings_for(policy, budget, args, base)
            max_new = min(TASKS[task].gen_tokens, args.max_new_tokens)
            result, reference = evaluate(model, tokenizer, item, encoded, settings, max_new, stop_ids, reference)
            row = {"task": task, "length": length, "index": index, **asdict(result)}
            if policy == "full":
                row |= {"answer_log_probs": reference.log_probs.tolist(), "answer_top1": reference.top1.tolist()}
            log.write(json.dumps(row) + "\n")
            log.flush()
            done[key] = row
    return [done[k] for k in runs(args, policies) if k in done]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, 1.96 * sd / math.sqrt(n)


def summarize(rows: list[dict], tasks: list[str]) -> list[dict]:
    """One line per (policy, budget fraction): per-task accuracy (perplexity for that task), mean, fidelity, cost."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        fraction = "-" if r["policy"] == "full" else f"{r['budget'] / r['length']:.4g}"
        groups.setdefault((r["policy"], fraction), []).append(r)
    table = []
    for (policy, fraction), group in groups.items():
        line = {"policy": policy, "budget": fraction}
        for task in tasks:
            of_task = [r for r in group if r["task"] == task]
            if task == "perplexity":
                tokens = sum(r["answer_tokens"] for r in of_task)
                line[task] = math.exp(-sum(r["log_likelihood"] for r in of_task) / tokens) if of_task else float("nan")
            else:
                line[task] = 100 * sum(r["score"] for r in of_task) / len(of_task) if of_task else float("nan")
        scored = [100 * r["score"] for r in group if r["task"] != "perplexity"]
        line["mean"], line["ci95"] = mean_ci(scored) if scored else (float("nan"), float("nan"))
        for name, key in (("ll_gap", "ll_gap"), ("top1_agree", "top1_agreement"), ("needle_kept", "needle_retention"),
                          ("compression", "compression"), ("prefill_tok_s", "prefill_tps"), ("decode_tok_s", "decode_tps")):
            values = [r[key] for r in group if not math.isnan(r[key])]
            line[name] = sum(values) / len(values) if values else float("nan")
        line["pool_mib"] = max(r["pool_bytes"] for r in group) / 2**20
        table.append(line)
    return table


def write_reports(table: list[dict], out: Path) -> None:
    columns = list(table[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(line[c]) for c in columns) + " |" for line in table]
    (out / "table.md").write_text("\n".join(md) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    plot(table, out / "accuracy_vs_budget.png")


def plot(table: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(line["policy"] for line in table):
        lines = sorted((float(l["budget"]), l["mean"]) for l in table if l["policy"] == policy and l["budget"] != "-")
        if policy == "full":
            ax.axhline(next(l["mean"] for l in table if l["policy"] == "full"), color="black", linestyle="--", label="full")
        elif lines:
            ax.plot(*zip(*lines), marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget / prompt length")
    ax.set_ylabel("mean accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    device = args.device or default_device()
    folder, entry = resolve_checkpoint(args.ckpt)
    base = entry.settings if entry else GENERIC_SETTINGS
    tokenizer = Tokenizer(folder)
    model = load_model(folder, device, DTYPES[args.dtype or default_dtype(device)])
    heads = find_heads(args.heads, entry, model) if "locret" in args.policies else None
    policies = [p for p in args.policies if p != "full" and (p != "locret" or heads)]
    if heads:
        load_heads(model, heads)
    elif "locret" in args.policies:
        print("no retaining heads for this model: skipping --policies locret (pass --heads)", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_suite(model, tokenizer, stop_token_ids(folder, tokenizer), args, base, policies, out)
    table = summarize(rows, args.tasks)
    write_reports(table, out)
    print((out / "table.md").read_text())
    print(f"wrote {out / 'results.jsonl'}, table.md, table.csv, accuracy_vs_budget.png", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help="zoo name, HF folder or hub id")
    p.add_argument("--heads", default=None, help="retaining heads for --policies locret (default: the zoo's)")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from {', '.join(TASKS)} "
                   f"(default: {DEFAULT_SUITE['tasks']})")
    p.add_argument("--lengths", default=None, help=f"prompt lengths in tokens (default: {DEFAULT_SUITE['lengths']})")
    p.add_argument("--budgets", default=None, help="fractions of the prompt (1/8) or entries per KV head (512) "
                   f"(default: {DEFAULT_SUITE['budgets']})")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    p.add_argument("--n", type=int, default=None, help=f"items per task and length (default: {DEFAULT_SUITE['n']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--form", choices=["completion", "chat"], default="completion",
                   help="completion: InfiniteBench's base-model form ending in the answer prefix (default)")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the zoo's)")
    p.add_argument("--stabilizers", type=int, default=None, help="default: a quarter of each budget")
    p.add_argument("--n-loc", type=int, default=None, help="default: the zoo's")
    p.add_argument("--positions", choices=["compact", "original"], default="compact")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="cap on each task's generation budget from its recipe (default: 128)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    args = p.parse_args(argv)
    suite = QUICK_SUITE if args.quick else DEFAULT_SUITE
    for name, value in suite.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.tasks = args.tasks.split(",") if isinstance(args.tasks, str) else args.tasks
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.budgets = str(args.budgets).split(",")
    args.policies = args.policies.split(",")
    unknown = [t for t in args.tasks if t not in TASKS] + [x for x in args.policies if x not in POLICIES]
    if unknown:
        p.error(f"unknown task or policy: {', '.join(unknown)}")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
