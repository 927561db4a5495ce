"""Training data for retaining heads, generated locally and seeded (LongAlpaca cannot be fetched).

A sample is a long context, a question and a short answer; the heads learn which context tokens the
answer attends to. So that they learn importance rather than templates, everything is composed from
parts: natural documents in five styles (locret/corpora.py: scripture, drama, encyclopedia, manual,
code) with tasks on their own text (continuation, recall of a passage, cloze, who said a line), and
synthetic retrieval of facts (many subjects x attributes x value kinds x phrasings, one or several
needles, distractors, any depth) hidden in those documents or in word salad. Half the samples are
plain completions ending in an answer cue, half a chat turn, as the engine sees both.

No evaluation template (EVAL_PHRASES) may appear in a sample, and no reserved source is read
(corpora.RESERVED: the held-out suite's texts among them).
"""
import json
import random
import re
from collections import Counter
from dataclasses import dataclass

from ..sampling import distinct
from . import corpora
from .values import FIRST_NAMES, NAME_WORDS, SALAD_WORDS, VALUE_KINDS, random_value, subject

# Evaluation benchmark templates (InfiniteBench, RULER, long-text PPL, the held-out suite): kept out
# of training.
EVAL_PHRASES = ["The grass is green", "The sky is blue", "The sun is yellow", "Here we go",
                "There and back again", "pass key", "passkey", "Remember it", "special magic",
                "magic number", "What is the sequence of digits", "VAR ", "Paul Graham", "noise"]

# (attribute, value kind): what a fact says about its subject.
ATTRIBUTES = [("locker number", "digits"), ("badge number", "digits"), ("account number", "digits"),
              ("door code", "code"), ("reference code", "code"), ("parcel code", "code"),
              ("password", "words"), ("code word", "words"), ("nickname", "words"),
              ("contact person", "name"), ("deputy", "name"), ("founding date", "date"),
              ("inspection date", "date"), ("serial", "uuid"), ("licence key", "uuid"),
              ("budget", "amount"), ("recorded weight", "amount"), ("opening time", "time"),
              ("departure time", "time"), ("room number", "digits"), ("favourite number", "digits"),
              ("last reading", "amount"), ("owner", "name"), ("tag", "code"), ("motto", "words"),
              ("pet name", "words"), ("signal phrase", "words"), ("favourite dish", "words"),
              ("boat name", "words"), ("house name", "words"), ("wedding day", "date"),
              ("expiry date", "date"), ("neighbour", "name")]
STATEMENTS = ["The {attr} of {s} is {v}.", "{S}'s {attr} is {v}.",
              "For the record, {s} has {v} as the {attr}.",
              "It was noted that the {attr} of {s} had become {v}.", "{S} -- {attr}: {v}.",
              "Please keep in mind: {s} uses {v} as the {attr}.",
              "We checked twice, and the {attr} for {s} is {v}.",
              "According to the ledger, {s} lists {v} under {attr}.", "{v} is the {attr} of {s}.",
              "Entry for {s}: {attr} = {v}",
              "Someone wrote in the margin that {s}'s {attr} reads {v}.",
              "Update: the new {attr} of {s} is {v}."]
QUESTIONS = ["What is the {attr} of {s}?", "Which {attr} does {s} have?",
             "Tell me the {attr} of {s}.", "Give the {attr} recorded for {s}.",
             "What was written as {s}'s {attr}?",
             "Look back through the text: what is {s}'s {attr}?", "{S}: which {attr}?"]
LIST_QUESTIONS = ["List every {attr} given for {s}, in order, separated by commas.",
                  "What are all the values noted as the {attr} of {s}? Separate them with commas."]
CUES = ["The {attr} of {s} is", "Answer:", "{S}'s {attr}:", "It is"]
# How a needle sits in a document of each style.
WRAPPERS = {"code": ["# {n}", "# NOTE: {n}", '"""{n}"""', "    # {n}"],
            "drama": ["{NAME}.\n{n}", "[{n}]"], "manual": ["{n}", "Note: {n}", "  * {n}"],
            "list": ["- {n}", "* {n}", "{n}"], "prose": ["{n}"]}

KV_INTROS = ["Inventory records in JSON format:", "Below is a lookup table exported as JSON.",
             "Registry dump:"]
KV_QUESTIONS = ["In the JSON above, which value belongs to the key \"{key}\"?",
                "Look up \"{key}\" in the table above and give its value.",
                "What is stored under \"{key}\" in the registry?"]
VT_SET = ["Let {name} equal {value}.", "Set {name} to {value}.", "The value of {name} is {value}."]
VT_COPY = ["Let {name} equal {value}.", "Set {name} to whatever {value} holds.",
           "Copy {value} into {name}."]
VT_QUESTIONS = ["Which names end up equal to {value}? Answer with the names, separated by commas.",
                "Following all the assignments in the text, which names hold {value}? "
                "List them with commas."]
EXAMPLE_OPENINGS = ["Here is a worked example of the task.", "An example first, with its answer:",
                    "For instance:", "A solved example:", "Example (answered):",
                    "First, a sample question and its answer."]
EXAMPLE_CLOSINGS = ["Now the text to answer about:", "Your turn. The text:",
                    "The real task follows.", "Now do the same for this document.",
                    "Here is the document.", "Next, the actual text:"]
CONTINUE_ASKS = ["", "Continue the text.", "What comes next?", "Go on from where the text stops."]
RECALL_QUESTIONS = ["Earlier the text has a passage that begins \"{cue}\". How does it go on?",
                    "Repeat the words that follow \"{cue}\" in the text above.",
                    "Quote what comes right after \"{cue}\"."]
CLOZE_QUESTIONS = ["Which word completes this line from the text: \"{line}\"?",
                   "Fill in the blank with the word used in the text: \"{line}\"",
                   "One word is missing here: \"{line}\". Which?"]
SPEAKER_QUESTIONS = ["Who says \"{line}\"?", "Which character speaks the line \"{line}\"?",
                     "In the scenes above, whose words are \"{line}\"?"]
VERSE_QUESTIONS = ["Quote verse {ref} from the passage above.", "What does verse {ref} say?",
                   "Recite the words of {ref} as given in the passage."]
STOP_WORDS = set("that with them they their there this which shall unto upon have from were when "
                 "what will thee thou thine thy hath also said into your because then before after "
                 "self return none".split())
ANSWER_WORDS = 12  # a recalled passage's answer is cut to its first words
CONTINUE_WORDS = 40  # a continuation's answer length in words
JOINERS = {"scripture": " ", "encyclopedia": " ", "drama": "\n\n", "manual": "\n\n", "code": "\n\n",
           "salad": " "}


@dataclass
class Sample:
    task: str    # generator name
    prompt: str  # the user turn (chat) or the whole text before the answer (completion)
    answer: str  # short gold answer
    # chat: a user turn, answered by the assistant | completion: plain text, answer follows
    form: str = "chat"


def has_eval_phrase(text: str) -> bool:
    lower = text.lower()
    return any(phrase.lower() in lower for phrase in EVAL_PHRASES)


def capital(text: str) -> str:
    return text[:1].upper() + text[1:]


# --- documents -----------------------------------------------------------------------------------

def salad_sentence(rng: random.Random) -> str:
    words = rng.choices(SALAD_WORDS, k=rng.randint(6, 14))
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?"])


def trim_words(text: str, n_chars: int) -> str:
    """`text` cut to at most `n_chars` characters at a word boundary."""
    return text if len(text) <= n_chars else text[:n_chars + 1].rsplit(" ", 1)[0]


def document(rng: random.Random, n_chars: int,
             style: str | None = None) -> tuple[list[str], str, str]:
    """About `n_chars` characters (at least one short passage) of consecutive passages of one style
    (or word salad, or a mix of styles) -> (passages, joiner, style)."""
    styles = corpora.available_styles()
    style = style or rng.choice(styles + ["salad", "mixed"] if styles else ["salad"])
    pieces, total = [], 0
    if style in styles:
        source = corpora.passages(style)
        i = rng.randrange(len(source))
    while total < n_chars or not pieces:
        if style == "salad" or (style == "mixed" and not styles):
            pieces.append(salad_sentence(rng))
        elif style == "mixed":
            pieces.append(rng.choice(corpora.passages(rng.choice(styles))))
        else:
            pieces.append(source[i % len(source)])
            i += 1
        total += len(pieces[-1]) + 2
    pieces[-1] = trim_words(pieces[-1], max(40, len(pieces[-1]) - (total - n_chars)))
    return [p for p in pieces if p], JOINERS.get(style, "\n\n"), style


def scatter(rng: random.Random, pieces: list[str], needles: list[str], joiner: str = " ") -> str:
    """Needles inserted between document pieces at random depths, in their given order."""
    slots = sorted(rng.randint(0, len(pieces)) for _ in needles)
    out = list(pieces)
    for offset, (slot, needle) in enumerate(zip(slots, needles)):
        out.insert(slot + offset, needle)
    return joiner.join(out)


def wrap(rng: random.Random, needle: str, style: str) -> str:
    """A needle dressed for its document: a comment in code, a line of dialogue in a play, a list
    item."""
    kind = style if style in WRAPPERS else rng.choice(["prose", "prose", "list"])
    return rng.choice(WRAPPERS[kind]).format(n=needle, NAME=rng.choice(FIRST_NAMES).upper())


# --- task generators: (rng, haystack characters) -> (context, question, answer, answer cue) ---

def fact_lookup(rng, n_chars):
    """Facts about subjects hidden in a document; one is asked (or every value of a repeated fact).
    Distractors share the subject or the attribute."""
    (attr, kind), subj = rng.choice(ATTRIBUTES), subject(rng)
    facts = [(subj, attr, random_value(rng, kind))]
    several = rng.random() < 0.15
    facts += [(subj, attr, random_value(rng, kind)) for _ in range(rng.randint(1, 3) * several)]
    for _ in range(rng.choice([0, 0, 1, 2, 4, 8])):
        other_attr, other_kind = rng.choice(ATTRIBUTES)
        if rng.random() < 0.5 and other_attr != attr:
            facts.append((subj, other_attr, random_value(rng, other_kind)))
        else:
            facts.append((subject(rng), attr, random_value(rng, kind)))
    facts = list(dict.fromkeys(f for f in facts
                               if f[:2] != (subj, attr) or f in facts[:1 + 3 * several]))
    rng.shuffle(facts)
    pieces, joiner, style = document(rng, n_chars)
    # not capitalised: a statement may open with its value, which must stay as the answer spells it
    needles = [wrap(rng, rng.choice(STATEMENTS).format(s=s, S=capital(s), attr=a, v=v), style)
               for s, a, v in facts]
    asked = [v for s, a, v in facts if (s, a) == (subj, attr)]
    questions = LIST_QUESTIONS if several else QUESTIONS
    question = rng.choice(questions).format(s=subj, S=capital(subj), attr=attr)
    cue = rng.choice(CUES).format(s=subj, S=capital(subj), attr=attr)
    return scatter(rng, pieces, needles, joiner), question, ", ".join(asked), cue


def kv_json(rng, n_chars):
    key_kind, value_kind = rng.choice(["uuid", "words", "code"]), rng.choice(list(VALUE_KINDS))
    table, size = {}, 0
    while True:
        key, value = random_value(rng, key_kind), random_value(rng, value_kind)
        pair_chars = len(key) + len(value) + 8  # with quotes, colon, comma, spacing
        if key in table:
            continue
        if size + pair_chars / 2 > n_chars and len(table) >= 2:  # the pair count nearest the budget
            break
        table[key], size = value, size + pair_chars
    key = rng.choice(list(table))
    context = rng.choice(KV_INTROS) + "\n" + json.dumps(table, indent=rng.choice([None, 1]))
    return context, rng.choice(KV_QUESTIONS).format(key=key), table[key], "Value:"


def variable_tracking(rng, n_chars):
    # chain lengths; chain 0 is asked
    chains = [rng.randint(2, 5) for _ in range(rng.randint(1, 4))]
    names = rng.sample(NAME_WORDS, sum(chains))
    numbers = distinct(lambda: str(rng.randint(1000, 99999)), len(chains))
    answer, statements = ", ".join(names[:chains[0]]), []
    for length, number in zip(chains, numbers):
        chain, names = names[:length], names[length:]
        statements.append([rng.choice(VT_SET).format(name=chain[0], value=number)] +
                          [rng.choice(VT_COPY).format(name=b, value=a)
                           for a, b in zip(chain, chain[1:])])
    ordered = []  # a random interleaving that keeps each chain in order
    while any(statements):
        ordered.append(rng.choice([s for s in statements if s]).pop(0))
    pieces, joiner, _ = document(rng, n_chars)
    return (scatter(rng, pieces, ordered, joiner),
            rng.choice(VT_QUESTIONS).format(value=numbers[0]), answer, "Names:")


def continuation(rng, n_chars):
    """A natural document cut mid-way; the answer is how it goes on (the heads learn what a plain
    continuation attends back to)."""
    pieces, joiner, _ = document(rng, n_chars + 400, rng.choice(corpora.available_styles()))
    text = joiner.join(pieces)
    words = text[:n_chars].rsplit(" ", 1)[0]
    rest = text[len(words):].split(" ")
    return words, rng.choice(CONTINUE_ASKS), " ".join(w for w in rest[1:CONTINUE_WORDS + 1]), ""


def recall(rng, n_chars):
    """Quote the words after a cue taken from a passage earlier in the document."""
    pieces, joiner, _ = document(rng, n_chars, rng.choice(corpora.available_styles()))
    words = rng.choice([p.split() for p in pieces[:-1] if len(p.split()) >= 10]
                       or [pieces[0].split()])
    start = rng.randrange(max(1, len(words) - 9))
    cue, answer = (" ".join(words[start:start + 5]),
                   " ".join(words[start + 5:start + 5 + ANSWER_WORDS]))
    return joiner.join(pieces), rng.choice(RECALL_QUESTIONS).format(cue=cue), answer or cue, ""


def bare_word(word: str) -> str:
    return word.strip(".,;:!?()'\"*[]")


def cloze(rng, n_chars):
    """Fill in the rarest long word of a line from the document."""
    pieces, joiner, _ = document(rng, n_chars, rng.choice(corpora.available_styles()))
    context = joiner.join(pieces)
    counts = Counter(bare_word(w).lower() for w in context.split())
    lines = [p.split() for p in pieces[:-1]] or [pieces[0].split()]
    candidates = [(words, i) for words in lines for i, w in enumerate(map(bare_word, words))
                  if len(w) >= 5 and w.isalpha() and w.lower() not in STOP_WORDS]
    words, blank = min(candidates or [(lines[0], 0)],
                       key=lambda c: (counts[bare_word(c[0][c[1]]).lower()], rng.random()))
    answer = bare_word(words[blank])
    start = max(0, min(blank - 6, len(words) - 14))
    line = " ".join(w.replace(answer, "____") if i == blank else w
                    for i, w in enumerate(words)).split()
    return (context, rng.choice(CLOZE_QUESTIONS).format(line=" ".join(line[start:start + 14])),
            answer, "The word is")


def speaker(rng, n_chars):
    """Drama: who speaks a given line (a recall question where the document holds no whole
    speech)."""
    pieces, joiner, _ = document(rng, n_chars, "drama")
    speeches = [p.split("\n", 1) for p in pieces[:-1]
                if re.fullmatch(r"[A-Z][A-Z .']*\.\n.*", p, re.S)]
    if not speeches:
        return recall(rng, n_chars)
    name, lines = rng.choice(speeches)
    line = rng.choice(lines.split("\n")).strip()
    return (joiner.join(pieces), rng.choice(SPEAKER_QUESTIONS).format(line=line),
            name.rstrip(".").title(), "It is")


def verse_quote(rng, n_chars):
    """Scripture with references: quote a verse by its reference."""
    verses, passage, total = corpora.kjv_verses(), [], 0
    i = rng.randrange(len(verses))
    while total < n_chars or len(passage) < 2:
        passage.append(verses[i % len(verses)])
        total += len(passage[-1][0]) + len(passage[-1][1]) + 2
        i += 1
    ref, text = rng.choice(passage[:-1])  # not the last verse, which the budget may cut
    context = "\n".join(f"{r} {t}" for r, t in passage)
    return (context, rng.choice(VERSE_QUESTIONS).format(ref=ref),
            " ".join(text.split()[:ANSWER_WORDS]), "")


SYNTHETIC = {"fact_lookup": fact_lookup, "kv_json": kv_json, "variable_tracking": variable_tracking}
NATURAL = {"continuation": continuation, "recall": recall, "cloze": cloze, "speaker": speaker,
           "verse_quote": verse_quote}
NEEDS = {"speaker": "drama", "verse_quote": "scripture"}  # natural tasks that need one style
WEIGHTS = {"fact_lookup": 20, "kv_json": 1, "variable_tracking": 1, "continuation": 2, "recall": 2,
           "cloze": 1, "speaker": 1, "verse_quote": 1}


def tasks() -> list[str]:
    """The tasks the installed corpora allow: synthetic ones always."""
    styles = corpora.available_styles()
    natural = [t for t in NATURAL if (NEEDS[t] in styles if t in NEEDS else styles)]
    return list(SYNTHETIC) + natural


def with_worked_example(generate):
    """The task after a worked example of its own kind (a short context, its question and its
    answer), as few-shot prompts open: the example's values look like the asked ones but are never
    asked."""
    def build(rng, n_chars):
        example_chars = int(n_chars * rng.uniform(0.1, 0.3))
        shown, asked, solution, solution_cue = generate(rng, example_chars)
        answered = f"{solution_cue} {solution}" if solution_cue else solution
        example = f"{shown}\n\n{asked}\n{answered}" if asked else f"{shown} {answered}"
        context, question, answer, cue = generate(rng, n_chars - example_chars)
        opening, closing = rng.choice(EXAMPLE_OPENINGS), rng.choice(EXAMPLE_CLOSINGS)
        return f"{opening}\n\n{example}\n\n{closing}\n\n{context}", question, answer, cue
    return build


def render(context: str, question: str, cue: str, form: str) -> str:
    """The text before the answer: the context, the question, and in completion form the answer
    cue."""
    text = f"{context}\n\n{question}" if question else context
    return f"{text}\n{cue}" if form == "completion" and cue else text


# --- length fitting -----------------------------------------------------------------------------

def fit_length(generate, seed_text: str, tokenizer, target: int, form: str,
               tolerance: float = 0.02):
    """Build a prompt of about `target` tokens -> (prompt, answer). A cheap first build (one
    character a token) measures the tokens per character; rebuilds (same seed, so the same needles)
    resize the haystack by the secant through the last two builds, since needles and haystack
    tokenize at different rates."""
    hay_chars, best, last = float(target), None, None
    for _ in range(4):
        context, question, answer, cue = generate(random.Random(seed_text), int(hay_chars))
        prompt = render(context, question, cue, form)
        n_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
        if best is None or abs(n_tokens - target) < abs(best[2] - target):
            best = (prompt, answer, n_tokens)
        if abs(n_tokens - target) <= tolerance * target:
            break
        slope = n_tokens / len(prompt)  # tokens per prompt character
        if (last and last[0] != hay_chars
                and (n_tokens - last[1]) / (hay_chars - last[0]) > 0.2 * slope):
            slope = (n_tokens - last[1]) / (hay_chars - last[0])
        last, hay_chars = (hay_chars, n_tokens), max(0.0, hay_chars + (target - n_tokens) / slope)
    return best[0], best[1]


def make_sample(index: int, seed: int, tokenizer, min_tokens: int, max_tokens: int,
                worked_examples: float = 0.0, chat: bool = True) -> Sample:
    """Sample `index` of the stream for `seed`: deterministic in (index, seed), so training can
    resume anywhere and ranks can shard by index. Its prompt has about U[min_tokens, max_tokens]
    tokens; a `worked_examples` share of the prompts open with an answered example of their task.
    Half are chat turns, half plain completions; all completions without `chat` (a base model)."""
    # string seeds are hashed with sha512: stable across processes
    rng = random.Random(f"{seed}:{index}")
    names = tasks()
    task = rng.choices(names, [WEIGHTS[t] for t in names])[0]
    target, form = rng.randint(min_tokens, max_tokens), rng.choice(["chat", "completion"])
    form = form if chat else "completion"
    generate = GENERATORS[task]
    if worked_examples and random.Random(f"{seed}:{index}:example").random() < worked_examples:
        # its own draw: the stream without examples is unchanged
        generate = with_worked_example(generate)
    for attempt in range(20):  # a join of document pieces can form an evaluation phrase: redraw
        prompt, answer = fit_length(generate, f"{seed}:{index}:{attempt}", tokenizer, target, form)
        if answer.strip() and not has_eval_phrase(prompt) and not has_eval_phrase(answer):
            return Sample(task, prompt, answer, form)
    raise RuntimeError(f"sample {index} (seed {seed}): every draw held an evaluation phrase "
                       "or no answer")


GENERATORS = {**SYNTHETIC, **NATURAL}
