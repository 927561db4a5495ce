"""Accuracy-vs-budget tables: Locret against the heuristic policies, all in one chunked engine.

    python eval.py                      # the default suite on the default model (under 15 min on a laptop CPU)
    python eval.py --quick              # smoke test
    python eval.py --suite heldout      # held-out needles and text (validation split; --split test for reports)
    python eval.py --suite multiquestion --policies full,locret   # one compressed context, four questions
    python eval.py --tasks passkey,vt --lengths 2048,4096 --budgets 1/8,1/16 --n 10

Each item is prefilled once per policy and budget; full attention is the reference for fidelity.
Accuracy carries a Wilson 95% interval. Results are appended to <out>/results.jsonl as they
come, so an interrupted run resumes where it stopped (the settings that change results are kept in
<out>/settings.json: a rerun with others is refused); then <out>/table.md, <out>/table.csv and
<out>/accuracy_vs_budget.png are written, and <out>/paired.md: the first policy named against each other one
and full attention on the same items (how many it scored higher and lower, and an exact sign test's p)."""
import argparse
import csv
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from locret.devices import check_device, default_device, default_dtype
from locret.settings import EVICTIONS, Settings
from locret.errors import LocretError, run_script, seed
from locret.eval.evaluation import Reference, ask_together, encode_item, evaluate
from locret.heads import load_heads, trained_eviction
from locret.loading.weights import DTYPES, load_model, stop_token_ids
from locret.loading.official_heads import find_heads
from locret.policies import POLICIES
from locret.eval.stats import budget_share, paired, wilson
from locret.eval.tasks import TASKS, make_item, not_scored, questions_of
from locret.loading.tokenizer import Tokenizer
from locret.loading.zoo import DEFAULT_MODEL, resolve_checkpoint
from locret.settings import GENERIC

SUITES = {
    "default": dict(tasks="passkey,niah_single_1,vt", lengths="2048", budgets="1/4,1/8,1/16", n=2),
    "quick": dict(tasks="passkey", lengths="256", budgets="1/4", n=1),
    # Needles phrased unlike any benchmark or training template, in text training never reads;
    # n_loc holds just the question, so every needle is before the uncompressed tail.
    "heldout": dict(tasks="heldout_{split},heldout_text_{split}", lengths="2048,4096,7168", budgets="1/8,1/16", n=24,
                    n_loc="question"),
    # Four held-out facts per document, asked of one compressed context and, against it, each with a
    # compression of its own (eval.py --suite multiquestion; see run_multi_question).
    "multiquestion": dict(tasks="heldout_multi_{split}", lengths="2048", budgets="1/8", n=24, n_loc="question"),
}
RESULT_SETTINGS = ("suite", "ckpt", "heads_id", "seed", "form", "chunk", "stabilizers", "n_loc", "positions", "dtype",
                   "max_new_tokens", "unprotected_final_eviction", "span", "eviction", "shared_layers", "kv_int8", "defaults")


def parse_budget(text: str, length: int) -> int:
    """'1/8' -> a fraction of the prompt length; '512' -> absolute entries per KV head."""
    return round(length * Fraction(text)) if "/" in text else int(text)


def budget_is_valid(text: str) -> bool:
    """A fraction in (0, 1] ('1/8') or a positive whole number of entries ('512')."""
    return 0 < Fraction(text) <= 1 if "/" in text else text.isdigit() and int(text) > 0


def result_key(row: dict) -> tuple:
    return row["task"], row["length"], row["index"], row["policy"], row["budget"], row.get("mode")


def read_results(path: Path) -> dict[tuple, dict]:
    """Rows written so far; a last line cut short by a kill is dropped (and rewritten on resume)."""
    rows = []
    lines = path.read_text().splitlines() if path.is_file() else []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise LocretError(f"{path}: line {i + 1} is not JSON") from None
    if lines and rows and len(rows) < len(lines):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {result_key(r): r for r in rows}


def settings_for(policy: str, budget: int, args, base, question_tokens: int) -> Settings:
    """Stabilizers default to the zoo's share of the budget, so small budgets stay valid; --n-loc question
    keeps just the item's question (and answer cue) out of eviction."""
    stabilizers = args.stabilizers if args.stabilizers is not None else budget * base.stabilizers // base.budget
    n_loc = base.n_loc if args.n_loc is None else question_tokens if args.n_loc == "question" else int(args.n_loc)
    chunk = base.chunk if args.chunk is None else args.chunk
    return Settings(policy=policy, budget=budget, chunk=chunk, stabilizers=stabilizers,
                          n_loc=n_loc, positions=args.positions, final_stabilizers=not args.unprotected_final_eviction,
                          random_seed=args.seed, span=base.span if args.span is None else args.span,
                          eviction=args.eviction or (args.heads_eviction if policy == "locret" else "per-head"),
                          shared_layers=args.shared_layers or base.shared_layers, kv_int8=bool(args.kv_int8))


def check_out_folder(out: Path, args) -> None:
    """Results in `out` must come from the same settings: record them on the first run, refuse others."""
    if out.exists() and not out.is_dir():
        raise LocretError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocretError(f"cannot create --out {out}: {e.strerror}") from None
    mine = {k: getattr(args, k) for k in RESULT_SETTINGS}
    path = out / "settings.json"
    if path.is_file():
        theirs = read_settings(path)
        changed = [k for k in RESULT_SETTINGS if theirs.get(k) != mine[k]]
        if changed:
            raise LocretError(f"{out} holds results of other settings ({', '.join(changed)} differ): "
                              "choose another --out or remove it")
    elif (out / "results.jsonl").is_file():
        raise LocretError(f"{out} holds results of unknown settings: choose another --out or remove it")
    else:
        try:
            path.write_text(json.dumps(mine, indent=1) + "\n")
        except OSError as e:
            raise LocretError(f"cannot write {path}: {e.strerror}") from None


def read_settings(path: Path) -> dict:
    """The settings an --out folder's results were made with, or one clear error."""
    try:
        theirs = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LocretError(f"{path} is unreadable ({type(e).__name__}): remove it, or choose another --out") from None
    if not isinstance(theirs, dict):
        raise LocretError(f"{path} is not a settings object: remove it, or choose another --out")
    return theirs


def max_new_tokens(task: str, args) -> int:
    """Tokens generated for an item of `task`: its recipe's answer length, capped by --max-new-tokens."""
    return min(TASKS[task].gen_tokens, args.max_new_tokens)


def check_window(args, window: int) -> None:
    """Every item runs with full attention first (the reference): prompt and answer must fit the model's context."""
    answer = max(max_new_tokens(task, args) for task in args.tasks)
    if max(args.lengths) + answer > window:
        raise LocretError(f"--lengths {max(args.lengths)}: with its answer (up to {answer} tokens) past the model's "
                          f"{window}-token context, where full attention, the reference, cannot run "
                          f"(at most {window - answer} here)")


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
            key = (task, length, index, policy, budget, None)
            if key in done and policy != "full":
                continue
            if policy == "full":  # a new item: build it and its full-attention reference
                item = make_item(task, index, args.seed, tokenizer, length)
                encoded = encode_item(tokenizer, item, args.form)
                if key in done:
                    reference = Reference(torch.tensor(done[key]["answer_log_probs"]), torch.tensor(done[key]["answer_top1"]))
                    continue
                reference = None
            settings = settings_for(policy, budget, args, base, encoded.question_tokens)
            max_new = max_new_tokens(task, args)
            result, reference = evaluate(model, tokenizer, item, encoded, settings, max_new, stop_ids, reference)
            row = {"task": task, "length": length, "index": index, "kind": item.kind, **asdict(result)}
            if policy == "full":
                row |= {"answer_log_probs": reference.log_probs.tolist(), "answer_top1": reference.top1.tolist()}
            log.write(json.dumps(row) + "\n")
            log.flush()
            done[key] = row
    return [done[k + (None,)] for k in runs(args, policies) if k + (None,) in done]


def run_multi_question(model, tokenizer, stop_ids, args, base, policies: list[str], out: Path) -> list[dict]:
    """--suite multiquestion: per document, policy and budget, its questions asked of one compressed
    context ("shared") and each with its own compression of the document and question ("separate").
    One row per mode, with each question's score and the mode's wall time for all of them."""
    done = read_results(out / "results.jsonl")
    todo = [(run, mode) for run in runs(args, policies) for mode in ("separate", "shared")]
    with open(out / "results.jsonl", "a") as log:
        for (task, length, index, policy, budget), mode in tqdm(todo, desc="eval", unit="run", file=sys.stderr):
            if (task, length, index, policy, budget, mode) in done:
                continue
            items = questions_of(make_item(task, index, args.seed, tokenizer, length))
            encoded = [encode_item(tokenizer, item, args.form) for item in items]
            settings = [settings_for(policy, budget, args, base, e.question_tokens) for e in encoded]
            max_new = max_new_tokens(task, args)
            t0 = time.perf_counter()
            if mode == "shared":
                results = ask_together(model, tokenizer, items, encoded, settings[0], max_new, stop_ids)
            else:
                results = [evaluate(model, tokenizer, item, e, s, max_new, stop_ids, None)[0]
                           for item, e, s in zip(items, encoded, settings)]
            row = {"task": task, "length": length, "index": index, "policy": policy, "budget": budget, "mode": mode,
                   "seconds": time.perf_counter() - t0, "scores": [r.score for r in results],
                   "needle_kept": [r.needle_retention for r in results], "predictions": [r.prediction for r in results]}
            log.write(json.dumps(row) + "\n")
            log.flush()
            done[result_key(row)] = row
    return [done[run + (mode,)] for run, mode in todo]


def summarize_multi_question(rows: list[dict]) -> list[dict]:
    """One line per (policy, budget fraction, mode): accuracy over all questions with its Wilson interval,
    seconds per document, and how much faster shared is than separate."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        fraction = budget_fraction(r)
        groups.setdefault((r["policy"], fraction, r["mode"]), []).append(r)
    table = []
    for (policy, fraction, mode), group in groups.items():
        scores = [x for r in group for x in r["scores"]]
        seconds = sum(r["seconds"] for r in group) / len(group)
        separate = groups[(policy, fraction, "separate")]
        line = {"policy": policy, "budget": fraction, "mode": mode, "n": len(scores),
                "accuracy": 100 * sum(scores) / len(scores), "ci95": ci95(scores),
                "needle_kept": float(np.nanmean([x for r in group for x in r["needle_kept"]])),
                "seconds_per_doc": seconds, "speedup": sum(r["seconds"] for r in separate) / len(separate) / seconds}
        table.append(line)
    return table


def budget_fraction(row: dict) -> str:
    """A result row's budget as a share of its prompt ("-" for full attention, which keeps everything)."""
    return "-" if row["policy"] == "full" else budget_share(row["budget"], row["length"])


def ci95(scores: list[float]) -> str:
    """The Wilson 95% interval of the scores' mean, in percent: "lo-hi"."""
    return "{:.0f}-{:.0f}".format(*wilson(sum(scores), len(scores)))


def is_text_task(task: str) -> bool:
    """Natural-text tasks are measured by perplexity and fidelity, not scored."""
    return TASKS[task].score is not_scored


def summarize(rows: list[dict], tasks: list[str], by_length: bool = False) -> list[dict]:
    """One line per (policy, budget fraction[, length]): per-task accuracy (perplexity for text tasks), the
    mean accuracy with its Wilson interval and n, fidelity, cost."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        fraction = budget_fraction(r)
        groups.setdefault((r["policy"], fraction) + ((r["length"],) if by_length else ()), []).append(r)
    table = []
    for key, group in groups.items():
        line = {"policy": key[0], "budget": key[1]} | ({"length": key[2]} if by_length else {})
        for task in tasks:
            of_task = [r for r in group if r["task"] == task]
            if is_text_task(task):
                tokens = sum(r["answer_tokens"] for r in of_task)
                line[task] = math.exp(-sum(r["log_likelihood"] for r in of_task) / tokens) if of_task else float("nan")
            else:
                line[task] = 100 * sum(r["score"] for r in of_task) / len(of_task) if of_task else float("nan")
        scored = [r["score"] for r in group if not is_text_task(r["task"])]
        line["n"] = len(scored)
        line["mean"] = 100 * sum(scored) / len(scored) if scored else float("nan")
        line["ci95"] = ci95(scored) if scored else "-"
        for name, key in (("ll_gap", "ll_gap"), ("top1_agree", "top1_agreement"), ("needle_kept", "needle_retention"),
                          ("compression", "compression"), ("prefill_tok_s", "prefill_tps"), ("decode_tok_s", "decode_tps")):
            values = [r[key] for r in group if not math.isnan(r[key])]
            line[name] = sum(values) / len(values) if values else float("nan")
        line["pool_mib"] = max(r["pool_bytes"] for r in group) / 2**20
        table.append(line)
    return table


def summarize_by_kind(rows: list[dict]) -> list[dict]:
    """One line per (length, kind of value asked, policy, budget fraction), over the rows that name a kind
    (the held-out suite's): accuracy with its Wilson interval and n, needle tokens kept."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("kind"):
            groups.setdefault((r["length"], r["kind"], r["policy"], budget_fraction(r)), []).append(r)
    table = []
    for (length, kind, policy, fraction), group in sorted(groups.items(), key=lambda g: g[0][:2]):
        scores = [r["score"] for r in group]
        kept = [r["needle_retention"] for r in group if not math.isnan(r["needle_retention"])]
        table.append({"length": length, "kind": kind, "policy": policy, "budget": fraction, "n": len(scores),
                      "accuracy": 100 * sum(scores) / len(scores), "ci95": ci95(scores),
                      "needle_kept": sum(kept) / len(kept) if kept else float("nan")})
    return table


def markdown(table: list[dict]) -> str:
    columns = list(table[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(line[c]) for c in columns) + " |" for line in table]
    return "\n".join(md) + "\n"


def write_reports(table: list[dict], out: Path, plotted: bool = True) -> None:
    columns = list(table[0])
    (out / "table.md").write_text(markdown(table))
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    if plotted:
        plot(table, out / "accuracy_vs_budget.png")


def write_paired(rows: list[dict], policies: list[str], out: Path) -> bool:
    """<out>/paired.md: the first of the evicting `policies` against the others and full attention, item by
    item (sign tests); False when there is nothing to pair."""
    table = paired([r for r in rows if not is_text_task(r["task"])], policies[0]) if policies else []
    if table:
        (out / "paired.md").write_text(markdown(table))
    return bool(table)


def write_by_kind(rows: list[dict], out: Path) -> bool:
    """<out>/by_kind.md (summarize_by_kind); False when no row names a kind."""
    table = summarize_by_kind(rows)
    if table:
        (out / "by_kind.md").write_text(markdown(table))
    return bool(table)


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


def heads_identity(path) -> str:
    """A heads file by name and content, so that new heads at the same path are not mistaken for old ones."""
    return f"{Path(path).name}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


def main(args: argparse.Namespace) -> None:
    device = check_device(args.device or default_device())
    folder, entry = resolve_checkpoint(args.ckpt)
    base = entry.settings if entry else GENERIC
    tokenizer = Tokenizer(folder)
    model = load_model(folder, device, DTYPES[args.dtype or default_dtype(device)])
    heads = find_heads(args.heads, entry, model) if "locret" in args.policies else None
    policies = [p for p in args.policies if p != "full" and (p != "locret" or heads)]
    args.heads_eviction = trained_eviction(load_heads(model, heads)) if heads else "per-head"  # checks the file
    args.heads_id = heads_identity(heads) if heads else None
    if not heads and "locret" in args.policies:
        print("no retaining heads for this model: skipping --policies locret (pass --heads)", file=sys.stderr)
    check_window(args, model.config.max_position_embeddings)
    args.defaults = asdict(base)  # what "the zoo's" means for every setting left out: recorded with the results
    out = Path(args.out)
    check_out_folder(out, args)
    if args.suite == "multiquestion":
        rows = run_multi_question(model, tokenizer, stop_token_ids(folder, tokenizer), args, base, policies, out)
        write_reports(summarize_multi_question(rows), out, plotted=False)
    else:
        rows = run_suite(model, tokenizer, stop_token_ids(folder, tokenizer), args, base, policies, out)
        write_reports(summarize(rows, args.tasks, by_length=args.suite == "heldout"), out)
    print((out / "table.md").read_text())
    plotted = ", accuracy_vs_budget.png" if args.suite != "multiquestion" else ""
    pairs = ", paired.md" if args.suite != "multiquestion" and write_paired(rows, policies, out) else ""
    kinds = ", by_kind.md" if args.suite != "multiquestion" and write_by_kind(rows, out) else ""
    print(f"wrote {out / 'results.jsonl'}, table.md, table.csv{plotted}{pairs}{kinds}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help="zoo name, HF folder or hub id")
    p.add_argument("--heads", default=None, help="retaining heads for --policies locret (default: the zoo's)")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from {', '.join(TASKS)} "
                   f"(default: {SUITES['default']['tasks']})")
    p.add_argument("--lengths", default=None, help=f"prompt lengths in tokens (default: {SUITES['default']['lengths']})")
    p.add_argument("--budgets", default=None, help="fractions of the prompt (1/8) or entries per KV head (512) "
                   f"(default: {SUITES['default']['budgets']})")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    p.add_argument("--n", type=int, default=None, help=f"items per task and length (default: {SUITES['default']['n']})")
    p.add_argument("--seed", type=seed, default=0, help="item draw and random policy seed (default: 0)")
    p.add_argument("--form", choices=["completion", "chat"], default="completion",
                   help="completion: InfiniteBench's base-model form ending in the answer prefix (default)")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the zoo's)")
    p.add_argument("--stabilizers", type=int, default=None,
                   help="most recent entries always kept (default: the zoo's share of each budget: 1/8 for the default model)")
    p.add_argument("--n-loc", default=None,
                   help="tokens kept out of eviction at the prompt's end, or 'question' for each item's question "
                        "(default: the zoo's; the heldout suite: question)")
    p.add_argument("--positions", choices=["compact", "original"], default="compact")
    p.add_argument("--span", type=int, default=None,
                   help="locret: each token scores the best of its span // 2 neighbours either side, odd "
                        "(default: the zoo's: 9 for the default model, else 1)")
    p.add_argument("--eviction", choices=EVICTIONS, default=None,
                   help="per-head (the paper's) or shared: one kept set for all layers and KV heads (default: locret "
                        "as its heads were trained, train.py --target; other policies per-head)")
    p.add_argument("--shared-layers", default=None, metavar="FIRST-LAST",
                   help="shared eviction ranks tokens by these layers' scores only, or all (default: the zoo's)")
    p.add_argument("--unprotected-final-eviction", action="store_true",
                   help="stabilizers unprotected in the last eviction before the n_loc tail (as the official code)")
    # None when not given, as in folders from before the flag (their settings.json lacks it)
    p.add_argument("--kv-int8", action="store_true", default=None,
                   help="store K and V as int8, an fp16 scale per 16 values: 56%% of bf16's bytes")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="cap on each task's generation budget from its recipe (default: 128)")
    p.add_argument("--suite", choices=list(SUITES), default="default",
                   help="preset tasks, lengths, budgets and n; flags given override it (default: default)")
    p.add_argument("--split", choices=["val", "test"], default=None,
                   help="heldout and multiquestion suites: val (default) to choose settings and heads, test for "
                   "published figures")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (--suite quick)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill what the suite presets, parse the lists, and refuse what cannot run (argparse's one-line errors)."""
    args.suite = "quick" if args.quick else args.suite
    for name, value in SUITES[args.suite].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.split and "{split}" not in SUITES[args.suite].get("tasks", ""):
        p.error(f"--split applies to --suite heldout or multiquestion, not to --suite {args.suite}")
    args.tasks = str(args.tasks).format(split=args.split or "val").split(",")
    args.policies = args.policies.split(",")
    for flag, names, known in (("--tasks", args.tasks, TASKS), ("--policies", args.policies, POLICIES)):
        if unknown := [name for name in names if name not in known]:
            p.error(f"{flag}: unknown {', '.join(map(repr, unknown))} (choose from {', '.join(known)})")
    try:
        args.lengths = [int(x) for x in str(args.lengths).split(",")]
        args.budgets = str(args.budgets).split(",")
        parsed = all(budget_is_valid(b) for b in args.budgets)
    except (ValueError, ZeroDivisionError):
        parsed = False
    if not parsed:
        p.error(f"--lengths must be integers and --budgets fractions of the prompt in (0, 1] (1/8) or positive "
                f"integers (512): got {args.lengths!r} and {args.budgets!r}")
    if min(args.lengths) < 1 or int(args.n) < 1 or args.max_new_tokens < 1 or (args.chunk is not None and args.chunk < 1):
        p.error("--lengths, --n, --max-new-tokens and --chunk must be positive")
    if args.n_loc not in (None, "question") and not str(args.n_loc).isdigit():
        p.error(f"--n-loc must be a number of tokens or 'question' (got {args.n_loc!r})")
    args.n = int(args.n)


if __name__ == "__main__":
    run_script(main, parse_args)
