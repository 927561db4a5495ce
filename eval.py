"""Accuracy-vs-budget tables: Locret against the heuristic policies, all in one chunked engine.

    python eval.py                  # the default suite on the default model (under 15 min, CPU)
    python eval.py --suite quick    # smoke test
    python eval.py --suite heldout  # held-out needles and text (validation split; --split test)
    python eval.py --suite multiquestion --policies full,locret   # one context, four questions
    python eval.py --tasks passkey,vt --lengths 2048,4096 --budgets 1/8,1/16 --n 10

Each item is prefilled once per policy and budget; full attention is the reference for fidelity.
Accuracy carries a Wilson 95% interval. Results are appended to <out>/results.jsonl as they come, so
an interrupted run resumes where it stopped (the settings that change results are kept in
<out>/settings.json: a rerun with others is refused); then <out>/table.md, table.csv and
accuracy_vs_budget.png are written, and <out>/paired.md: the first policy named against each
other one and full attention on the same items (how many it scored higher and lower, a sign test).
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

from locret.devices import check_device, default_device, default_dtype
from locret.errors import run_script, seed
from locret.eval.report import (summarize, summarize_multi_question, write_by_kind, write_paired,
                                write_table)
from locret.eval.results import check_out_folder, heads_identity
from locret.eval.suite import (SUITES, Subject, SuiteConfig, budget_is_valid, check_choices,
                               check_window, record, run_multi_question, run_suite)
from locret.eval.tasks import TASKS
from locret.loading.official_heads import attach_heads
from locret.loading.tokenizer import Tokenizer
from locret.loading.weights import DTYPES, load_model, stop_token_ids
from locret.loading.zoo import DEFAULT_MODEL, has_heads, resolve_checkpoint
from locret.plan import chosen, default_settings, heads_eviction
from locret.policies import POLICIES
from locret.settings import EVICTIONS, POSITIONS


def main(args: argparse.Namespace) -> None:
    config = suite_config(args)
    device = check_device(args.device or default_device())
    folder, entry = resolve_checkpoint(args.ckpt)
    check_choices(entry, config)
    tokenizer = Tokenizer(folder)
    model = load_model(folder, device, DTYPES[args.dtype or default_dtype(device)])
    heads = None
    if "locret" in config.policies and has_heads(args.heads, entry):
        heads = attach_heads(model, args.heads, entry)
    elif "locret" in config.policies:
        print("no retaining heads for this model: skipping --policies locret (pass --heads)",
              file=sys.stderr)
        config = replace(config, policies=tuple(p for p in config.policies if p != "locret"))
    stop_ids = stop_token_ids(folder, tokenizer)
    subject = Subject(model, tokenizer, stop_ids, entry, heads_eviction(heads))
    check_window(config, model.config.max_position_embeddings)
    out = Path(args.out)
    defaults = default_settings(entry, "locret", subject.eviction)  # what settings left out take
    check_out_folder(out, record(config, defaults, ckpt=args.ckpt, heads_id=heads_identity(heads),
                                 dtype=args.dtype))
    if config.suite == "multiquestion":
        rows = run_multi_question(subject, config, out)
        written = write_table(summarize_multi_question(rows), out, plotted=False)
    else:
        rows = run_suite(subject, config, out)
        table = summarize(rows, config.tasks, by_length=config.suite == "heldout")
        written = write_table(table, out)
        written += write_paired(rows, config.policies, out) + write_by_kind(rows, out)
    print((out / "table.md").read_text())
    print(f"wrote {out / 'results.jsonl'}, {', '.join(written)}", file=sys.stderr)


def suite_config(args: argparse.Namespace) -> SuiteConfig:
    """The suite the flags ask for, its preset filling what they leave out; a ValueError names a bad
    flag."""
    preset = SUITES[args.suite]
    given = lambda name: preset.get(name) if getattr(args, name) is None else getattr(args, name)
    if args.split and "{split}" not in preset["tasks"]:
        raise ValueError("--split applies to --suite heldout or multiquestion, not to "
                         f"--suite {args.suite}")
    tasks = given("tasks").format(split=args.split or "val").split(",")
    policies = args.policies.split(",")
    for flag, names, known in (("--tasks", tasks, TASKS), ("--policies", policies, POLICIES)):
        if unknown := [name for name in names if name not in known]:
            raise ValueError(f"{flag}: unknown {', '.join(map(repr, unknown))} "
                             f"(choose from {', '.join(known)})")
    lengths, budgets = str(given("lengths")).split(","), str(given("budgets")).split(",")
    if not all(x.isdigit() for x in lengths) or not all(map(budget_is_valid, budgets)):
        raise ValueError("--lengths must be integers and --budgets fractions of the prompt in "
                         "(0, 1] (1/8) or positive integers (512): "
                         f"got {lengths!r} and {budgets!r}")
    chunk = 1 if args.chunk is None else args.chunk
    if min(*map(int, lengths), given("n"), args.max_new_tokens, chunk) < 1:
        raise ValueError("--lengths, --n, --max-new-tokens and --chunk must be positive")
    n_loc = given("n_loc")
    if n_loc not in (None, "question") and not n_loc.isdigit():
        raise ValueError(f"--n-loc must be a number of tokens or 'question' (got {n_loc!r})")
    if n_loc is not None:
        n_loc = n_loc if n_loc == "question" else int(n_loc)
    choices = chosen(args) | ({"n_loc": n_loc} if n_loc is not None else {})
    return SuiteConfig(args.suite, tuple(tasks), tuple(map(int, lengths)), tuple(budgets),
                       tuple(p for p in policies if p != "full"), given("n"), args.seed, args.form,
                       args.max_new_tokens, choices)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default = SUITES["default"]
    p.add_argument("--suite", choices=list(SUITES), default="default",
                   help="preset tasks, lengths, budgets and n; flags given override it "
                   "(default: default)")
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help="zoo name, HF folder or hub id")
    p.add_argument("--heads", help="retaining heads for --policies locret (default: the zoo's)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    p.add_argument("--tasks", help=f"comma-separated, from {', '.join(TASKS)} "
                   f"(default: {default['tasks']})")
    p.add_argument("--lengths", help=f"prompt lengths in tokens (default: {default['lengths']})")
    p.add_argument("--budgets", help="fractions of the prompt (1/8) or entries per KV head (512) "
                   f"(default: {default['budgets']})")
    p.add_argument("--n", type=int, help=f"items per task and length (default: {default['n']})")
    p.add_argument("--seed", type=seed, default=0, help="draws the items (default: 0)")
    p.add_argument("--split", choices=["val", "test"], help="heldout and multiquestion suites: val "
                   "(default) to choose settings and heads, test for published figures")
    p.add_argument("--form", choices=["completion", "chat"], default="completion",
                   help="completion: InfiniteBench's base-model form ending in the answer prefix "
                   "(default)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="cap on each task's generation budget from its recipe (default: 128)")
    p.add_argument("--kv-int8", action="store_true", default=None,
                   help="store K and V as int8, an fp16 scale per 16 values: 56%% of bf16's bytes")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=list(DTYPES))
    add_advanced(p.add_argument_group("advanced (research knobs; defaults: the zoo entry's)"))
    args = p.parse_args(argv)
    try:
        suite_config(args)
    except ValueError as e:
        p.error(str(e))
    return args


def add_advanced(g) -> None:
    """The cache's research knobs; dests are locret.settings.Settings fields (None: not chosen)."""
    g.add_argument("--chunk", type=int, help="prefill chunk length in tokens")
    g.add_argument("--stabilizers", type=int, help="most recent entries always kept (default: the "
                   "zoo's share of each budget: 1/8 for the default model)")
    g.add_argument("--n-loc", help="tokens kept out of eviction at the prompt's end, or 'question' "
                   "for each item's question (default: the zoo's; heldout suites: question)")
    g.add_argument("--positions", choices=POSITIONS, help="compact (default): kept tokens "
                   "re-indexed 0..n-1 (official); original: absolute positions")
    g.add_argument("--span", type=int, help="locret: each token scores the best of its span // 2 "
                   "neighbours either side, odd (default: the zoo's: 9 for the default model)")
    g.add_argument("--eviction", choices=EVICTIONS, help="per-head (the paper's) or shared: one "
                   "kept set for all layers and KV heads (default: locret as its heads were "
                   "trained; others per-head)")
    g.add_argument("--shared-layers", metavar="FIRST-LAST", help="shared eviction ranks tokens by "
                   "these layers' scores only, numbered among the global layers, or all "
                   "(default: the zoo's)")
    g.add_argument("--unprotected-final-eviction", dest="final_stabilizers", action="store_false",
                   default=None, help="stabilizers unprotected in the last eviction before the "
                   "n_loc tail (as the official code)")
    g.add_argument("--random-seed", type=seed, help="the random policy's seed (default: 0)")


if __name__ == "__main__":
    run_script(main, parse_args)
