"""Evaluation tasks, generated locally and seeded after their public recipes, with their scorers.

InfiniteBench passkey / number_string / kv_retrieval: data/construct_synthetic_dataset.py, the
base-model ("yarn-mistral") templates of src/prompt.py, the scorers of src/compute_scores.py. RULER
niah_* and vt: scripts/data/synthetic/{niah,variable_tracking,constants}.py and synthetic.yaml with
the base-model template (task template + answer prefix), scored by string_match_all. Departures:
needle depths sweep evenly over items (RULER samples them); the essay haystack is Jane Austen
(haystack.py), not Paul Graham, split into sentences by a regex, not NLTK; the last noise line may
be cut to a sentence so that prompts meet their token budget; vt's one-shot example is drawn afresh
per item (RULER renames the variables of one fixed example).
"""
import math
import random
import re
import string
import uuid
from dataclasses import replace
from typing import Callable

from ..errors import LocretError
from ..sampling import distinct
from . import haystack, heldout
from .task_base import (ADJECTIVES, NOUNS, Item, Task, first_int_match, insert, kv_match,
                        not_scored, string_match_all, words_of)

N_DEPTHS = 10  # item i puts its (first) needle at depth (i % N_DEPTHS) / (N_DEPTHS - 1)
# RULER's np.round(np.linspace(0, 100, 40)), for other needles
RULER_DEPTHS = [round(100 * i / 39) for i in range(40)]
CONTINUATION = 64  # perplexity: tokens scored at the end of the passage

NOISE_SENTENCES = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again."]
NOISE = " ".join(NOISE_SENTENCES)

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. "
                       "Find it and memorize them. "
                       "I will quiz you about the important information there.")
NUMBER_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it. "
                      "I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
NUMBER_NEEDLE = "The sequence of digits is {key}. Remember it. {key} is the sequence of digits."
KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
KV_QUESTION = 'Key: "{key}"\nThe value associated with the specified key is: '

NIAH_INSTRUCTION = ("Some special magic {type_needle_v} are hidden within the following text. "
                    "Make sure to memorize it. "
                    "I will quiz you about the {type_needle_v} afterwards.")
NIAH_QUESTION = ("What are all the special magic {type_needle_v} for {query} "
                 "mentioned in the provided text?")
NIAH_PREFIX = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_INSTRUCTION = ("Memorize and track the chain(s) of variable assignment "
                  "hidden in the following text.")
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, "
             "{num_v} variables are assgined the value {value}, they are: ")  # sic, as in RULER

# --- haystack pieces ------------------------------------------------------------------------------

def noise_lines(n_sentences: int, end: str) -> list[str]:
    """`n_sentences` noise sentences as whole lines ending in `end`; the last line may be cut
    short."""
    full, rest = divmod(n_sentences, len(NOISE_SENTENCES))
    return [NOISE + end] * full + [" ".join(NOISE_SENTENCES[:rest]) + end] * (rest > 0)


def essay_sentences(n_words: int) -> list[str]:
    """The essay haystack's first `n_words` words, split into sentences (as RULER does, with a
    regex for NLTK)."""
    text = " ".join(words_of(haystack.essays())[:n_words])
    return (re.split(r"(?<=[.!?])(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)\s+(?=[\"'_(]?[A-Z])", text)
            if text else [])


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pass_key(rng: random.Random) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(5))


def digit_string(rng: random.Random) -> str:
    """InfiniteBench's 10 digits: 5 random ones, then 5 times a digit doubled in place."""
    digits = [str(rng.randint(0, 9)) for _ in range(5)]
    for k in range(5):
        pos = rng.randint(0, 4 + k)
        digits.insert(pos, digits[pos])
    return "".join(digits)


# --- InfiniteBench --------------------------------------------------------------------------------

# the base-model template, less its answer prefix
INFBENCH = "{instruction}\n\n{context}\n\n{question}"


def infbench(instruction: str, needle: str, question: str, prefix: str, make_key,
             gen_tokens: int) -> Task:
    """Noise lines (`size` sentences) with the needle line at `depth`."""
    def build(rng, size, depth, tokenizer):
        key = make_key(rng)
        text = needle.format(key=key)
        context = "".join(insert(noise_lines(size, "\n"), [text + "\n"], [depth]))
        return dict(context=context, question=question, answer_prefix=prefix, answers=[key],
                    needles=[text], depth=depth, instruction=instruction)
    return Task(build, INFBENCH, "\n\n", first_int_match, gen_tokens)


def kv_retrieval(rng, size, depth, tokenizer):
    """A JSON object of `size` + 1 uuid4 pairs; the pair at `depth` is asked."""
    pairs = [(uuid4(rng), uuid4(rng)) for _ in range(size + 1)]
    key, value = pairs[round(depth * size)]
    context = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
    return dict(context=context, question=KV_QUESTION.format(key=key), answer_prefix="",
                answers=[value], needles=[f'"{key}": "{value}"'], depth=depth,
                instruction=KV_INSTRUCTION)


# --- RULER ----------------------------------------------------------------------------------------

def singular(template: str) -> str:
    """RULER's rewording when one value is asked."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is")


def niah(hay: str, kind: str, num_k: int = 1, num_v: int = 1, num_q: int = 1) -> Task:
    """RULER's needle in a haystack: `num_k` word keys with `num_v` values of `kind` ("numbers" or
    "uuids") each, `num_q` keys asked; `hay` is "repeat" (noise lines, size in sentences) or
    "essay" (size in words). The first asked key's first value goes at `depth`, the other needles
    at random RULER depths."""
    num_k = max(num_k, num_q)
    reword, type_v = ((lambda t: t), kind) if num_q * num_v > 1 else (singular, kind[:-1])

    def build(rng, size, depth, tokenizer):
        keys = distinct(lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", num_k)
        values = [[str(rng.randint(10 ** 6, 10 ** 7 - 1)) if kind == "numbers" else uuid4(rng)
                   for _ in range(num_v)]
                  for _ in keys]
        asked = rng.sample(range(num_k), num_q)
        order = asked + [i for i in range(num_k) if i not in asked]
        needles = [NIAH_NEEDLE.format(type_needle_v=kind, key=keys[i], value=v)
                   for i in order for v in values[i]]
        others = needles[1:]
        rng.shuffle(others)
        depths = [depth] + [d / 100 for d in rng.sample(RULER_DEPTHS, len(others))]
        needles = needles[:1] + others
        if hay == "essay":
            context = " ".join(insert(essay_sentences(size), needles, depths))
        else:
            context = "\n".join(insert(noise_lines(size, ""), needles, depths))
        query = (keys[asked[0]] if num_q == 1
                 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]])
        return dict(context=context,
                    instruction=reword(NIAH_INSTRUCTION).format(type_needle_v=type_v),
                    question=reword(NIAH_QUESTION).format(type_needle_v=type_v, query=query),
                    answer_prefix=reword(NIAH_PREFIX).format(type_needle_v=type_v, query=query),
                    answers=[v for i in asked for v in values[i]], needles=needles, depth=depth)
    return Task(build, "{instruction}\n{context}\n{question}", " ", string_match_all, 128)


def vt_chain(rng, letters: int, hops: int = 4):
    """RULER's chain: VAR A = 12345, VAR B = VAR A, ... over hops + 1 distinct upper-case names."""
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)), hops + 1)
    value = str(rng.randint(10000, 99998))
    return names, value, ([f"VAR {names[0]} = {value}"]
                          + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])])


def vt_context(chain: list[str], depths: list[float], n_sentences: int) -> str:
    return " ".join(insert(noise_lines(n_sentences, "\n"), chain, depths)).replace(". \n", ".\n")


def vt_example(rng, tokenizer) -> str:
    """RULER's one-shot example, answered: a chain of 3-letter names in as many 5-line noise blocks
    as fit 500 tokens with 30 to generate."""
    names, value, chain = vt_chain(rng, 3)
    depths = sorted(rng.random() for _ in chain)

    def example(lines):
        return (f"{VT_INSTRUCTION}\n\n{vt_context(chain, depths, 5 * lines)}\n"
                f"{VT_QUESTION.format(value=value)} "
                f"{VT_PREFIX.format(num_v=len(names), value=value)} {' '.join(names)}\n\n")
    lines = 5
    while len(tokenizer.encode(example(lines + 5), add_special_tokens=False)) + 30 <= 500:
        lines += 5
    return example(lines)


def vt(rng, size, depth, tokenizer):
    """RULER vt (1 chain, 4 hops) after its one-shot example; the chain starts at `depth`, the rest
    follows."""
    example = vt_example(rng, tokenizer)
    names, value, chain = vt_chain(rng, 5)
    depths = [depth] + sorted(rng.uniform(depth, 1) for _ in chain[1:])
    return dict(context=vt_context(chain, depths, size),
                instruction=example + "\n\n" + VT_INSTRUCTION,
                question=VT_QUESTION.format(value=value),
                answer_prefix=VT_PREFIX.format(num_v=len(names), value=value),
                answers=names, needles=[c.strip() for c in chain], depth=depth)


# --- natural-text continuation --------------------------------------------------------------------

def passage(text_of: Callable[[], str]):
    """A passage of `n_tokens` tokens from a random word of `text_of()`; its last CONTINUATION
    tokens are the answer."""
    def build(rng, n_tokens, depth, tokenizer):
        text, span = text_of(), 8 * n_tokens  # 8 characters a token is ample for prose
        if n_tokens <= CONTINUATION or len(text) <= span:
            raise LocretError(f"cannot cut a {n_tokens}-token passage from a "
                              f"{len(text)}-character text")
        start = text.find(" ", rng.randrange(len(text) - span)) + 1
        ids = tokenizer.encode(text[start:start + span].lstrip(),
                               add_special_tokens=False)[:n_tokens]
        return dict(context=tokenizer.decode(ids[:-CONTINUATION]), question="", answer_prefix="",
                    answers=[tokenizer.decode(ids[-CONTINUATION:])], needles=[], depth=0.0)
    return build


# names, settings and generation budgets as in InfiniteBench and RULER's synthetic.yaml
TASKS: dict[str, Task] = {
    "passkey": infbench(PASSKEY_INSTRUCTION, PASSKEY_NEEDLE, "What is the pass key?",
                        "The pass key is", pass_key, 6),
    "number_string": infbench(NUMBER_INSTRUCTION, NUMBER_NEEDLE, "What is the sequence of digits?",
                              "The sequence of digits is", digit_string, 12),
    "kv_retrieval": Task(kv_retrieval, INFBENCH, "", kv_match, 50),
    "niah_single_1": niah("repeat", "numbers"),
    "niah_single_2": niah("essay", "numbers"),
    "niah_single_3": niah("essay", "uuids"),
    "niah_multikey_1": niah("essay", "numbers", num_k=4),
    "niah_multivalue": niah("essay", "numbers", num_v=4),
    "niah_multiquery": niah("essay", "numbers", num_q=4),
    "vt": Task(vt, "{instruction}\n\n{context}\n{question}", " ", string_match_all, 30),
    "perplexity": Task(passage(lambda: haystack.essays()), "{context}", "", not_scored, 0,
                       exact_size=True),
    # The held-out suite (eval.py --suite heldout): val for choices, test for published figures.
    **{f"heldout_{split}": heldout.needle_task(split) for split in heldout.SOURCES},
    **{f"heldout_multi_{split}": heldout.needle_task(split, n_facts=4)
       for split in heldout.SOURCES},
    **{f"heldout_text_{split}": Task(passage(lambda split=split: heldout.text(split)), "{context}",
                                     "", not_scored, 0, exact_size=True)
       for split in heldout.SOURCES},
}


# --- items and prompts ----------------------------------------------------------------------------

def prompt_body(item: Item) -> str:
    """Instruction, context and question joined by the task's template."""
    return TASKS[item.task].template.format(instruction=item.instruction, context=item.context,
                                            question=item.question)


def completion_prompt(item: Item) -> str:
    """The base-model prompt (InfiniteBench's and RULER's base templates): the body, then the
    answer prefix."""
    body = prompt_body(item)
    return body + TASKS[item.task].prefix_sep + item.answer_prefix if item.answer_prefix else body


def chat_messages(item: Item) -> list[dict]:
    """The chat form: one user turn holding the body (a caller may still start the assistant turn
    with item.answer_prefix, as RULER's chat templates do)."""
    return [{"role": "user", "content": prompt_body(item)}]


def questions_of(item: Item) -> list[Item]:
    """The item and one item per further question on its context."""
    return [item] + [replace(item, **fields, more=[]) for fields in item.more]


def is_text_task(task: str) -> bool:
    """Natural-text tasks are measured by perplexity and fidelity, not scored."""
    return TASKS[task].score is not_scored


def score(item: Item, prediction: str) -> float:
    """The task's public scorer on one prediction."""
    return TASKS[item.task].score(prediction, item.answers)


def fit(build, count, length: int) -> Item:
    """The item with the largest haystack whose prompt and answer fit in `length` tokens (or one
    within 0.5%). Token counts grow about linearly with the haystack: extrapolate to bracket the
    budget, then interpolate, bisecting every third step to bound the worst case."""
    best = build(0)
    base = count(best)
    if base > length:
        raise LocretError(f"{length} tokens cannot hold a {best.task} item: "
                          f"it takes {base} without haystack")
    lo, hi, size, step = (0, base), None, 16, 0  # (size, tokens) that fits / that overflows
    while True:
        item = build(size)
        n = count(item)
        if n <= length and n <= lo[1]:
            raise LocretError(f"the {best.task} haystack is too short for {length} tokens")
        if n <= length:
            best, lo = item, (size, n)
        else:
            hi = (size, n)
        if lo[1] >= 0.995 * length or (hi and hi[0] - lo[0] <= 1):
            return best
        if hi is None:  # 10% past the line through size 0 and the last fit
            size = lo[0] + max(1, math.ceil(1.1 * (length - lo[1]) * lo[0]
                                            / max(lo[1] - base, 1)))
        elif step % 3 == 2:
            size = (lo[0] + hi[0]) // 2
        else:
            size = min(max(lo[0] + (length - lo[1]) * (hi[0] - lo[0]) // (hi[1] - lo[1]),
                           lo[0] + 1), hi[0] - 1)
        step += 1


def make_item(task: str, index: int, seed: int, tokenizer, length: int) -> Item:
    """Item `index` of `task` for `seed`, deterministic in (task, index, seed): prompt and answer
    take at most `length` tokens and, but for one haystack unit, within 0.5% of it (fit); the
    needle depth sweeps over indices."""
    if task not in TASKS:
        raise LocretError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    spec, depth = TASKS[task], (index % N_DEPTHS) / (N_DEPTHS - 1)

    def build(size):
        rng = random.Random(f"{task}:{seed}:{index}")
        return Item(task, **spec.build(rng, size, depth, tokenizer))

    def count(item):
        text = completion_prompt(item) + " " + " ".join(item.answers)
        return len(tokenizer.encode(text, add_special_tokens=False))

    if not spec.exact_size:
        return fit(build, count, length)
    size, item = length, build(length)
    # re-encoding the cut text can merge tokens differently
    while (over := count(item) - length) > 0:
        size -= over
        item = build(size)
    return item
