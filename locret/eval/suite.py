"""An eval suite: its items (tasks, lengths, n, seed), the runs on each (full attention first, then
every policy at every budget), each run's settings by plan.resolve, and the runs into an --out
folder's results.jsonl (resumed where a previous run stopped)."""
import sys
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from models import CausalLM

from ..errors import LocretError
from ..loading.tokenizer import Tokenizer
from ..loading.zoo import ZooEntry
from ..plan import default_settings, resolve
from ..settings import Settings
from .evaluation import Encoded, Reference, ask_together, encode_item, evaluate
from .results import append, read_results, result_key
from .tasks import TASKS, make_item, questions_of

SUITES = {
    "default": dict(tasks="passkey,niah_single_1,vt", lengths="2048", budgets="1/4,1/8,1/16", n=2),
    "quick": dict(tasks="passkey", lengths="256", budgets="1/4", n=1),
    # Needles phrased unlike any benchmark or training template, in text training never reads;
    # n_loc holds just the question, so every needle is before the uncompressed tail.
    "heldout": dict(tasks="heldout_{split},heldout_text_{split}", lengths="2048,4096,7168",
                    budgets="1/8,1/16", n=24, n_loc="question"),
    # Four held-out facts per document, asked of one compressed context and, against it, each with
    # a compression of its own (run_multi_question).
    "multiquestion": dict(tasks="heldout_multi_{split}", lengths="2048", budgets="1/8", n=24,
                          n_loc="question"),
}


@dataclass(frozen=True)
class SuiteConfig:
    suite: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    budgets: tuple[str, ...]  # "1/8": a share of the prompt; "512": entries per KV head
    policies: tuple[str, ...]  # the evicting policies; full attention runs first on every item
    n: int  # items per task and length
    seed: int = 0  # draws the items
    form: str = "completion"
    max_new_tokens: int = 128  # cap on each task's answer length
    choices: dict = field(default_factory=dict)  # Settings fields chosen; n_loc may be "question"


@dataclass
class Subject:
    """The model under evaluation."""
    model: CausalLM
    tokenizer: Tokenizer
    stop_ids: list[int]
    entry: ZooEntry | None
    eviction: str  # locret's: as its heads were trained


def parse_budget(text: str, length: int) -> int:
    """'1/8' -> a share of the prompt length; '512' -> absolute entries per KV head."""
    return round(length * Fraction(text)) if "/" in text else int(text)


def budget_is_valid(text: str) -> bool:
    """A fraction in (0, 1] ('1/8') or a positive whole number of entries ('512')."""
    try:
        return 0 < Fraction(text) <= 1 if "/" in text else text.isdigit() and int(text) > 0
    except (ValueError, ZeroDivisionError):
        return False


def answer_tokens(config: SuiteConfig, task: str) -> int:
    """Tokens generated for an item of `task`: its recipe's answer length, capped."""
    return min(TASKS[task].gen_tokens, config.max_new_tokens)


def item_settings(defaults: Settings, choices: dict, encoded: Encoded) -> Settings:
    """plan.resolve for one item's prompt; n_loc "question" keeps just its question uncompressed."""
    if choices.get("n_loc") == "question":
        choices = choices | {"n_loc": encoded.question_tokens}
    return resolve(defaults, choices, len(encoded.prompt))


def run_settings(subject: Subject, config: SuiteConfig, policy: str, budget: int,
                 encoded: Encoded) -> Settings:
    defaults = default_settings(subject.entry, policy, subject.eviction)
    return item_settings(defaults, config.choices | {"budget": budget}, encoded)


def check_choices(entry: ZooEntry | None, config: SuiteConfig) -> None:
    """Settings that no item of the suite could run with fail before the model loads."""
    question = {"n_loc": 0} if config.choices.get("n_loc") == "question" else {}
    for length in config.lengths:
        for policy in config.policies:
            for budget in config.budgets:
                choices = config.choices | {"budget": parse_budget(budget, length)} | question
                resolve(default_settings(entry, policy), choices, length)


def check_window(config: SuiteConfig, window: int) -> None:
    """Every item runs with full attention first (the reference): prompt and answer must fit the
    model's context."""
    answer = max(answer_tokens(config, task) for task in config.tasks)
    if max(config.lengths) + answer > window:
        raise LocretError(f"--lengths {max(config.lengths)}: with its answer (up to {answer} "
                          f"tokens) past the model's {window}-token context, where full attention, "
                          f"the reference, cannot run (at most {window - answer} here)")


def record(config: SuiteConfig, defaults: Settings, **run) -> dict:
    """What changes the results, for settings.json: the suite, the `run`'s model and heads, every
    setting (None: not chosen) and the defaults those left out took."""
    per_run = ("policy", "budget")
    chosen = {name: config.choices.get(name) for name in asdict(defaults) if name not in per_run}
    return {"suite": config.suite, "seed": config.seed, "form": config.form,
            "max_new_tokens": config.max_new_tokens, **run, **chosen, "defaults": asdict(defaults)}


def runs(config: SuiteConfig):
    """Every (task, length, item, policy, budget) the suite asks for; full attention first."""
    for length in config.lengths:
        for task in config.tasks:
            for index in range(config.n):
                yield task, length, index, "full", 0
                for policy in config.policies:
                    for budget in config.budgets:
                        yield task, length, index, policy, parse_budget(budget, length)


def run_suite(subject: Subject, config: SuiteConfig, out: Path) -> list[dict]:
    """Every run's result row, those in `out`/results.jsonl reused, the others run and appended."""
    done = read_results(out / "results.jsonl")
    model, tokenizer = subject.model, subject.tokenizer
    with open(out / "results.jsonl", "a") as log:
        for task, length, index, policy, budget in tqdm(list(runs(config)), desc="eval", unit="run",
                                                        file=sys.stderr):
            key = (task, length, index, policy, budget, None)
            if policy == "full":  # a new item: build it and its full-attention reference
                item = make_item(task, index, config.seed, tokenizer, length)
                encoded = encode_item(tokenizer, item, config.form)
                reference = saved_reference(done[key]) if key in done else None
            if key in done:
                continue
            settings = run_settings(subject, config, policy, budget, encoded)
            result, reference = evaluate(model, tokenizer, item, encoded, settings,
                                         answer_tokens(config, task), subject.stop_ids, reference)
            row = {"task": task, "length": length, "index": index, "kind": item.kind,
                   **asdict(result)}
            if policy == "full":
                row |= {"answer_log_probs": reference.log_probs.tolist(),
                        "answer_top1": reference.top1.tolist()}
            append(log, row)
            done[key] = row
    return [done[run + (None,)] for run in runs(config)]


def saved_reference(row: dict) -> Reference:
    """Full attention's answer log-probabilities and argmaxes as a results row keeps them."""
    return Reference(torch.tensor(row["answer_log_probs"]), torch.tensor(row["answer_top1"]))


def run_multi_question(subject: Subject, config: SuiteConfig, out: Path) -> list[dict]:
    """--suite multiquestion: per document, policy and budget, its questions asked of one compressed
    context ("shared") and each with its own compression of the document and question ("separate").
    One row per mode, with each question's score and the mode's wall time for all of them."""
    done = read_results(out / "results.jsonl")
    todo = [(run, mode) for run in runs(config) for mode in ("separate", "shared")]
    with open(out / "results.jsonl", "a") as log:
        for run, mode in tqdm(todo, desc="eval", unit="run", file=sys.stderr):
            if run + (mode,) not in done:
                row = ask_questions(subject, config, *run, mode)
                append(log, row)
                done[result_key(row)] = row
    return [done[run + (mode,)] for run, mode in todo]


def ask_questions(subject: Subject, config: SuiteConfig, task: str, length: int, index: int,
                  policy: str, budget: int, mode: str) -> dict:
    """One multiquestion run: a document's questions, asked in `mode`."""
    tokenizer, stops = subject.tokenizer, subject.stop_ids
    items = questions_of(make_item(task, index, config.seed, tokenizer, length))
    encoded = [encode_item(tokenizer, item, config.form) for item in items]
    settings = [run_settings(subject, config, policy, budget, e) for e in encoded]
    max_new = answer_tokens(config, task)
    t0 = time.perf_counter()
    if mode == "shared":
        results = ask_together(subject.model, tokenizer, items, encoded, settings[0], max_new,
                               stops)
    else:
        results = [evaluate(subject.model, tokenizer, item, e, s, max_new, stops, None)[0]
                   for item, e, s in zip(items, encoded, settings)]
    return {"task": task, "length": length, "index": index, "policy": policy, "budget": budget,
            "mode": mode, "seconds": time.perf_counter() - t0, "scores": [r.score for r in results],
            "needle_kept": [r.needle_retention for r in results],
            "predictions": [r.prediction for r in results]}
