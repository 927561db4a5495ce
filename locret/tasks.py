"""Evaluation tasks, generated locally and seeded after their public recipes, with their scorers.

InfiniteBench passkey / number_string / kv_retrieval: data/construct_synthetic_dataset.py, the base-model
("yarn-mistral") templates of src/prompt.py, the scorers of src/compute_scores.py. RULER niah_* and vt:
scripts/data/synthetic/{niah,variable_tracking,constants}.py and synthetic.yaml with the base-model template
(task template + answer prefix), scored by string_match_all. Departures: needle depths sweep evenly over items
(RULER samples them); the essay haystack is Jane Austen (haystack.py), not Paul Graham, split into sentences by
a regex, not NLTK; the last noise line may be cut to a sentence so that prompts meet their token budget; vt's
one-shot example is drawn afresh per item (RULER renames the variables of one fixed example).
"""
import bisect
import itertools
import math
import random
import re
import string
import uuid
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

from . import haystack, heldout
from .errors import LocretError
from .train_values import distinct

N_DEPTHS = 10  # item i puts its (first) needle at depth (i % N_DEPTHS) / (N_DEPTHS - 1)
RULER_DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's np.round(np.linspace(0, 100, 40)), for other needles
CONTINUATION = 64  # perplexity: tokens scored at the end of the passage

NOISE_SENTENCES = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again."]
NOISE = " ".join(NOISE_SENTENCES)

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                       "I will quiz you about the important information there.")
NUMBER_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it. "
                      "I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
NUMBER_NEEDLE = "The sequence of digits is {key}. Remember it. {key} is the sequence of digits."
KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
KV_QUESTION = 'Key: "{key}"\nThe value associated with the specified key is: '

NIAH_INSTRUCTION = ("Some special magic {type_needle_v} are hidden within the following text. "
                    "Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.")
NIAH_QUESTION = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
NIAH_PREFIX = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assgined the value {value}, they are: ")  # sic, as in RULER

# RULER's keys are adjective-noun pairs from wonderwords' lists; these lists are our own.
ADJECTIVES = """abrupt agile ancient arid bashful bland brisk bumpy clumsy cozy crisp curious damp dizzy dusty eager
elegant faint fancy fierce fluffy fragile frosty giddy glossy grumpy hasty hollow humble icy jagged jolly lanky lively
lofty lucky mellow misty modest muddy nimble odd plain polite proud quaint rapid rough rusty salty shaggy shiny silent
sleepy slim smooth soggy solemn sour spicy steep sticky stormy sturdy sunny swift tame tender thirsty tidy tiny vivid
wary weary witty zesty""".split()
NOUNS = """anchor apron attic badger balcony banjo barrel beacon blossom boulder bucket cabin canal canyon cargo carrot
castle cellar chimney cloak comet cottage crayon cricket dagger dolphin donkey easel ferry fiddle garage glacier gravel
hammock helmet igloo kayak lantern lobster locket mango meteor mitten mustard napkin oyster paddle parrot peanut pebble
pelican pigeon pillar puddle pumpkin quilt raft saddle scarf sled sponge squirrel stool tavern thimble tractor trumpet
tulip turnip umbrella violin wagon walrus whistle""".split()


@dataclass
class Item:
    task: str
    context: str          # the long part: haystack with needles
    question: str         # asked after the context
    answer_prefix: str    # completion-form start of the answer, e.g. "The pass key is" ("" if none)
    answers: list[str]    # gold references
    needles: list[str]    # inserted needle texts, the first at `depth`
    depth: float          # relative insertion depth of the first needle, 0..1
    instruction: str = ""  # the task's preamble, before the context
    more: list[dict] = field(default_factory=list)  # further questions on the same context: Item fields each


@dataclass(frozen=True)
class Task:
    build: Callable[..., dict]  # (rng, size, depth, tokenizer) -> Item fields; size counts haystack units
    template: str               # joins instruction, context and question
    prefix_sep: str             # between that and the answer prefix
    score: Callable[[str, list[str]], float]  # (prediction, answers) -> score
    gen_tokens: int             # the recipe's generation budget
    exact_size: bool = False    # size is the token count itself: no fitting


# --- scorers ---------------------------------------------------------------------------------------

def first_int_match(prediction: str, answers: list[str]) -> float:
    """InfiniteBench passkey / number_string: the first run of digits must be the answer."""
    run = re.search("[0-9]+", prediction)
    return float(run is not None and run.group() == answers[0])


def kv_match(prediction: str, answers: list[str]) -> float:
    """InfiniteBench kv_retrieval: the value must be a word once each of \\n : " ' . , ? ! { } is a space."""
    return float(answers[0] in re.sub("[\n:\"'.,?!{}]", " ", prediction).split())


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER: the share of references in the prediction, ignoring case, after RULER's postprocessing."""
    prediction = re.sub("[\x00-\x1f]", "\n", prediction.strip()).strip().lower()
    return sum(ref.lower() in prediction for ref in answers) / len(answers)


def not_scored(prediction: str, answers: list[str]) -> float:
    """Perplexity is measured from log-likelihoods (eval.py); generated text is not scored."""
    return 0.0


# --- haystack pieces -------------------------------------------------------------------------------

def noise_lines(n_sentences: int, end: str) -> list[str]:
    """`n_sentences` noise sentences as whole lines ending in `end`; the last line may be cut short."""
    full, rest = divmod(n_sentences, len(NOISE_SENTENCES))
    return [NOISE + end] * full + [" ".join(NOISE_SENTENCES[:rest]) + end] * (rest > 0)


@lru_cache(maxsize=2)
def words_of(text: str) -> list[str]:
    return text.split()


def essay_sentences(n_words: int) -> list[str]:
    """The essay haystack's first `n_words` words, split into sentences (as RULER does, with a regex for NLTK)."""
    text = " ".join(words_of(haystack.essays())[:n_words])
    return re.split(r"(?<=[.!?])(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)\s+(?=[\"'_(]?[A-Z])", text) if text else []


def insert(pieces: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """`pieces` with needle i at the boundary between pieces nearest to depths[i] of their joined length;
    needles keep their order on ties."""
    bounds = [0, *itertools.accumulate(len(p) + 1 for p in pieces)]  # + 1 for the joining separator

    def slot(depth):
        target = depth * bounds[-1]
        j = bisect.bisect_left(bounds, target, hi=len(pieces))
        return j - 1 if j and target - bounds[j - 1] < bounds[j] - target else j
    out = list(pieces)
    for j, i in sorted(((slot(d), i) for i, d in enumerate(depths)), reverse=True):
        out.insert(j, needles[i])
    return out


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


# --- InfiniteBench ---------------------------------------------------------------------------------

INFBENCH = "{instruction}\n\n{context}\n\n{question}"  # the base-model template, less its answer prefix


def infbench(instruction: str, needle: str, question: str, prefix: str, make_key, gen_tokens: int) -> Task:
    """Noise lines (`size` sentences) with the needle line at `depth`."""
    def build(rng, size, depth, tokenizer):
        key = make_key(rng)
        text = needle.format(key=key)
        context = "".join(insert(noise_lines(size, "\n"), [text + "\n"], [depth]))
        return dict(context=context, question=question, answer_prefix=prefix, answers=[key], needles=[text],
                    depth=depth, instruction=instruction)
    return Task(build, INFBENCH, "\n\n", first_int_match, gen_tokens)


def kv_retrieval(rng, size, depth, tokenizer):
    """A JSON object of `size` + 1 uuid4 pairs; the pair at `depth` is asked."""
    pairs = [(uuid4(rng), uuid4(rng)) for _ in range(size + 1)]
    key, value = pairs[round(depth * size)]
    context = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
    return dict(context=context, question=KV_QUESTION.format(key=key), answer_prefix="", answers=[value],
                needles=[f'"{key}": "{value}"'], depth=depth, instruction=KV_INSTRUCTION)


# --- RULER -----------------------------------------------------------------------------------------

def singular(template: str) -> str:
    """RULER's rewording when one value is asked."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is")


def niah(hay: str, kind: str, num_k: int = 1, num_v: int = 1, num_q: int = 1) -> Task:
    """RULER's needle in a haystack: `num_k` word keys with `num_v` values of `kind` ("numbers" or "uuids")
    each, `num_q` keys asked; `hay` is "repeat" (noise lines, size in sentences) or "essay" (size in words).
    The first asked key's first value goes at `depth`, the other needles at random RULER depths."""
    num_k = max(num_k, num_q)
    reword, type_v = ((lambda t: t), kind) if num_q * num_v > 1 else (singular, kind[:-1])

    def build(rng, size, depth, tokenizer):
        keys = distinct(lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", num_k)
        values = [[str(rng.randint(10 ** 6, 10 ** 7 - 1)) if kind == "numbers" else uuid4(rng) for _ in range(num_v)]
                  for _ in keys]
        asked = rng.sample(range(num_k), num_q)
        order = asked + [i for i in range(num_k) if i not in asked]
        needles = [NIAH_NEEDLE.format(type_needle_v=kind, key=keys[i], value=v) for i in order for v in values[i]]
        others = needles[1:]
        rng.shuffle(others)
        depths = [depth] + [d / 100 for d in rng.sample(RULER_DEPTHS, len(others))]
        needles = needles[:1] + others
        if hay == "essay":
            context = " ".join(insert(essay_sentences(size), needles, depths))
        else:
            context = "\n".join(insert(noise_lines(size, ""), needles, depths))
        query = keys[asked[0]] if num_q == 1 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
        return dict(context=context, instruction=reword(NIAH_INSTRUCTION).format(type_needle_v=type_v),
                    question=reword(NIAH_QUESTION).format(type_needle_v=type_v, query=query),
                    answer_prefix=reword(NIAH_PREFIX).format(type_needle_v=type_v, query=query),
                    answers=[v for i in asked for v in values[i]], needles=needles, depth=depth)
    return Task(build, "{instruction}\n{context}\n{question}", " ", string_match_all, 128)


def vt_chain(rng, letters: int, hops: int = 4):
    """RULER's chain: VAR A = 12345, VAR B = VAR A, ... over hops + 1 distinct upper-case names."""
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)), hops + 1)
    value = str(rng.randint(10000, 99998))
    return names, value, [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]


def vt_context(chain: list[str], depths: list[float], n_sentences: int) -> str:
    return " ".join(insert(noise_lines(n_sentences, "\n"), chain, depths)).replace(". \n", ".\n")


def vt_example(rng, tokenizer) -> str:
    """RULER's one-shot example, answered: a chain of 3-letter names in as many 5-line noise blocks as fit
    500 tokens with 30 to generate."""
    names, value, chain = vt_chain(rng, 3)
    depths = sorted(rng.random() for _ in chain)

    def example(lines):
        return (f"{VT_INSTRUCTION}\n\n{vt_context(chain, depths, 5 * lines)}\n{VT_QUESTION.format(value=value)} "
                f"{VT_PREFIX.format(num_v=len(names), value=value)} {' '.join(names)}\n\n")
    lines = 5
    while len(tokenizer.encode(example(lines + 5), add_special_tokens=False)) + 30 <= 500:
        lines += 5
    return example(lines)


def vt(rng, size, depth, tokenizer):
    """RULER vt (1 chain, 4 hops) after its one-shot example; the chain starts at `depth`, the rest follows."""
    example = vt_example(rng, tokenizer)
    names, value, chain = vt_chain(rng, 5)
    depths = [depth] + sorted(rng.uniform(depth, 1) for _ in chain[1:])
    return dict(context=vt_context(chain, depths, size), instruction=example + "\n\n" + VT_INSTRUCTION,
                question=VT_QUESTION.format(value=value), answer_prefix=VT_PREFIX.format(num_v=len(names), value=value),
                answers=names, needles=[c.strip() for c in chain], depth=depth)


# --- natural-text continuation ----------------------------------------------------------------------

def passage(text_of: Callable[[], str]):
    """A passage of `n_tokens` tokens from a random word of `text_of()`; its last CONTINUATION tokens are the answer."""
    def build(rng, n_tokens, depth, tokenizer):
        text, span = text_of(), 8 * n_tokens  # 8 characters a token is ample for prose
        if n_tokens <= CONTINUATION or len(text) <= span:
            raise LocretError(f"cannot cut a {n_tokens}-token passage from a {len(text)}-character text")
        start = text.find(" ", rng.randrange(len(text) - span)) + 1
        ids = tokenizer.encode(text[start:start + span].lstrip(), add_special_tokens=False)[:n_tokens]
        return dict(context=tokenizer.decode(ids[:-CONTINUATION]), question="", answer_prefix="",
                    answers=[tokenizer.decode(ids[-CONTINUATION:])], needles=[], depth=0.0)
    return build


# --- the held-out suite: needles phrased unlike any benchmark or training template, in R's documentation ----

HELDOUT_NEEDLES = [  # (statement, question, answer cue)
    ("Buried in this text is one odd remark: the {attr} assigned to {subj} is {value}.",
     "What {attr} was assigned to {subj}?", "The {attr} assigned to {subj} is"),
    ("A maintainer added, almost in passing, that {subj} goes by the {attr} {value}.",
     "By which {attr} does {subj} go?", "{Subj} goes by the {attr}"),
    ("(Aside: anyone who asks about {subj} should be told that the {attr} is {value}.)",
     "What should someone asking about {subj} be told the {attr} is?", "They should be told that the {attr} is"),
    ("It is set down here, for later, that the {attr} belonging to {subj} equals {value}.",
     "What does the {attr} belonging to {subj} equal?", "The {attr} belonging to {subj} equals"),
    ("During the last review, {subj} confirmed a {attr} of {value}.",
     "Which {attr} did {subj} confirm during the last review?", "During the review, {subj} confirmed a {attr} of"),
    ("Keep this in your head: {subj}, {attr}, {value}.",
     "Which {attr} goes with {subj}?", "The {attr} that goes with {subj} is"),
]
HELDOUT_ATTRIBUTES = {"number": ["mooring slot", "ration card number", "tram route", "catalogue entry"],
                      "words": ["call sign", "watchword", "cover phrase"],
                      "name": ["stage name", "godparent", "landlord"],
                      "code": ["crate marking", "ticket stub", "permit"],
                      "date": ["harvest date", "christening day", "sailing date"]}
HELDOUT_SUBJECTS = ["the night porter", "the second cellist", "the lighthouse keeper's niece", "the ferry pilot",
                    "the apprentice glassblower", "the retired surveyor", "the village organist", "the junior archivist",
                    "the quarry foreman", "the beekeeper from the valley", "the ship's cook", "the tram conductor"]
HELDOUT_NAMES = (["Ottoline", "Benedikt", "Marisol", "Casimir", "Henrike", "Leopold", "Solveig", "Tobiah"],
                 ["Vantongeren", "Quillfeather", "Ashcombe", "Brightwater", "Castellanos", "Drummond", "Ferreira"])
ORDINAL = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}
MAX_HAYSTACK_WORDS = 9000  # a 7K-token prompt of R's prose takes about 5,500 words


def heldout_value(rng, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(10 ** 5, 10 ** 8 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    if kind == "name":
        return f"{rng.choice(HELDOUT_NAMES[0])} {rng.choice(HELDOUT_NAMES[1])}"
    if kind == "code":
        return f"{rng.choice('QWXZ')}{rng.choice('KVJY')}-{rng.randint(100, 999)}/{rng.randint(10, 99)}"
    day = rng.randint(1, 28)
    return f"the {day}{ORDINAL.get(day, 'th')} of {rng.choice(['March', 'June', 'October'])} {rng.randint(1801, 1899)}"


def heldout_fact(rng, subjects: list[str]) -> dict:
    """One fact about a subject not in `subjects` (which it joins): its statement, question, cue and value."""
    kind = rng.choice(list(HELDOUT_ATTRIBUTES))
    attr, subj = rng.choice(HELDOUT_ATTRIBUTES[kind]), rng.choice([x for x in HELDOUT_SUBJECTS if x not in subjects])
    subjects.append(subj)
    value = heldout_value(rng, kind)
    statement, question, cue = rng.choice(HELDOUT_NEEDLES)
    fields = dict(attr=attr, subj=subj, Subj=subj[:1].upper() + subj[1:], value=value)
    return dict(needle=statement.format(**fields), question=question.format(**fields),
                answer_prefix=cue.format(**fields), answers=[value])


def heldout_needle(split: str, n_facts: int = 1):
    """`n_facts` facts in `size` words of the split's R documentation, the first at `depth` and the others
    spread evenly after it (depths stretched to 0.05-0.95, wrapping round). The item asks about the first;
    `more` holds the questions about the others (eval.py --multi-question asks them all)."""
    def build(rng, size, depth, tokenizer):
        subjects = []
        facts = [heldout_fact(rng, subjects) for _ in range(n_facts)]
        words = words_of(heldout.text(split))
        start = rng.randrange(len(words) - MAX_HAYSTACK_WORDS)
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", " ".join(words[start:start + size])) if size else []
        depths = [0.05 + 0.9 * ((depth + i / n_facts) % 1.0001) for i in range(n_facts)]
        needles = [f.pop("needle") for f in facts]
        more = [dict(f, needles=[n], depth=d) for f, n, d in zip(facts[1:], needles[1:], depths[1:])]
        return dict(context=" ".join(insert(sentences, needles, depths)), **facts[0], needles=needles[:1],
                    depth=depths[0], more=more)
    return Task(build, "{context}\n\n{question}", "\n", string_match_all, 16)


TASKS: dict[str, Task] = {  # names, settings and generation budgets as in InfiniteBench and RULER's synthetic.yaml
    "passkey": infbench(PASSKEY_INSTRUCTION, PASSKEY_NEEDLE, "What is the pass key?", "The pass key is", pass_key, 6),
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
    "perplexity": Task(passage(lambda: haystack.essays()), "{context}", "", not_scored, 0, exact_size=True),
    # The held-out suite (eval.py --suite heldout): val for choices, test for published figures.
    **{f"heldout_{split}": heldout_needle(split) for split in heldout.SOURCES},
    **{f"heldout_multi_{split}": heldout_needle(split, n_facts=4) for split in heldout.SOURCES},
    **{f"heldout_text_{split}": Task(passage(lambda split=split: heldout.text(split)), "{context}", "", not_scored, 0,
                                     exact_size=True) for split in heldout.SOURCES},
}


# --- items and prompts -----------------------------------------------------------------------------

def prompt_body(item: Item) -> str:
    """Instruction, context and question joined by the task's template."""
    return TASKS[item.task].template.format(instruction=item.instruction, context=item.context, question=item.question)


def completion_prompt(item: Item) -> str:
    """The base-model prompt (InfiniteBench's and RULER's base templates): the body, then the answer prefix."""
    body = prompt_body(item)
    return body + TASKS[item.task].prefix_sep + item.answer_prefix if item.answer_prefix else body


def chat_messages(item: Item) -> list[dict]:
    """The chat form: one user turn holding the body (a caller may still start the assistant turn with
    item.answer_prefix, as RULER's chat templates do)."""
    return [{"role": "user", "content": prompt_body(item)}]


def questions_of(item: Item) -> list[Item]:
    """The item and one item per further question on its context."""
    return [item] + [replace(item, **fields, more=[]) for fields in item.more]


def score(item: Item, prediction: str) -> float:
    """The task's public scorer on one prediction."""
    return TASKS[item.task].score(prediction, item.answers)


def fit(build, count, length: int) -> Item:
    """The item with the largest haystack whose prompt and answer fit in `length` tokens (or one within 0.5%).
    Token counts grow about linearly with the haystack: extrapolate to bracket the budget, then interpolate,
    bisecting every third step to bound the worst case."""
    best = build(0)
    base = count(best)
    if base > length:
        raise LocretError(f"{length} tokens cannot hold a {best.task} item: it takes {base} without haystack")
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
            size = lo[0] + max(1, math.ceil(1.1 * (length - lo[1]) * lo[0] / max(lo[1] - base, 1)))
        elif step % 3 == 2:
            size = (lo[0] + hi[0]) // 2
        else:
            size = min(max(lo[0] + (length - lo[1]) * (hi[0] - lo[0]) // (hi[1] - lo[1]), lo[0] + 1), hi[0] - 1)
        step += 1


def make_item(task: str, index: int, seed: int, tokenizer, length: int) -> Item:
    """Item `index` of `task` for `seed`, deterministic in (task, index, seed): prompt and answer take at most
    `length` tokens and, but for one haystack unit, within 2% of it; the needle depth sweeps over indices."""
    if task not in TASKS:
        raise LocretError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    spec, depth = TASKS[task], (index % N_DEPTHS) / (N_DEPTHS - 1)

    def build(size):
        return Item(task, **spec.build(random.Random(f"{task}:{seed}:{index}"), size, depth, tokenizer))

    def count(item):
        text = completion_prompt(item) + " " + " ".join(item.answers)
        return len(tokenizer.encode(text, add_special_tokens=False))

    if not spec.exact_size:
        return fit(build, count, length)
    size, item = length, build(length)
    while (over := count(item) - length) > 0:  # re-encoding the cut text can merge tokens differently
        size -= over
        item = build(size)
    return item
