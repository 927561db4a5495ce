"""Training data for retaining heads, generated locally and seeded (LongAlpaca cannot be fetched).

Each sample is a long context followed by a question (the user turn) and a short answer.
Synthetic retrieval tasks hide facts in a haystack of King James Bible passages and word salad;
natural-text tasks ask about a passage of KJV verses. All phrasings are training-only:
none of the evaluation templates (EVAL_PHRASES) may appear in a sample.
"""
import json
import random
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

# Evaluation benchmark templates (InfiniteBench, RULER, long-text PPL): kept out of training data.
EVAL_PHRASES = ["The grass is green", "The sky is blue", "The sun is yellow", "Here we go",
                "There and back again", "pass key", "passkey", "Remember it", "special magic",
                "magic number", "What is the sequence of digits", "VAR ", "Paul Graham", "noise"]

SALAD_WORDS = """
able about above across act add afraid after afternoon age ago agree air all almost alone along already
also always among amount and angry animal answer any apple arm army around arrive art ask aunt autumn away
baby back bad bag ball bank basket bath bear beautiful bed bee before begin behind bell below bench beside
best better between bicycle big bird bitter black blanket blow board boat body bone book border bottle
bottom bowl box boy branch brave bread break breakfast bridge bright bring broad brother brown brush build
burn busy butter button buy cake call calm camera candle cap car card care carpet carry cat chain chair
chalk chance change cheap cheese chicken child chin church circle clean clear clever climb clock close
cloth cloud coat coffee cold collar colour comb come common cook copper corner cotton country cousin cover
cow crowd cup curtain cut dance dark daughter day deep desk dinner dirty doctor dog door drawer dream dress
drink drive dry dust ear early earth east easy eat egg empty engine evening every eye face farm fast father
feather fence field finger fire fish flag floor flower fly fog follow food foot forest fork friend fruit
full garden gate gentle gift girl glass glove goat gold good grain grey hair hammer hand happy harbour hat
heavy hill hold hole home honey horse hospital hot hour house hungry ice idea ink iron island jacket jam
journey jug kettle kind king kitchen knee knife ladder lake lamp large late laugh lazy leaf left letter
library light line lion lip little loud low lunch map market meadow milk minute mirror money monkey moon
morning mother mountain mouth music nail narrow near neck needle nest net new night north nose number old
orange oven page paint paper parcel park pen pencil people pepper picture pig pillow pin pipe plate pocket
poor potato pretty quick quiet rabbit rain red ribbon rice ring river road roof room rope round sail salt
sand school sea seat seed shadow sheep shelf shell ship shirt shoe shop short silver sister slow small
smile snow soap soft song soup south spoon spring square stair star station stone street string sugar
summer supper table tail tall tea teacher thread ticket tired toe tomato tooth towel tower town train tree
uncle valley village wall warm watch water west wheel white wide wind window winter wire wood wool yellow
""".split()
NAME_WORDS = """
amber azure birch cedar cobalt coral cypress ebony ember falcon fern flint garnet granite hazel heron
indigo ivory jade jasper juniper kestrel lark laurel linden maple marble myrtle nickel obsidian ochre onyx
opal osprey pearl pewter pine plover quartz raven rowan ruby russet saffron sage slate sparrow spruce
teal thistle topaz umber walnut willow wren zinc
""".split()
PLACES = ["vault", "storeroom", "boathouse", "archive room", "wine cellar", "tool shed", "observatory",
          "pharmacy cabinet", "signal tower", "granary", "chapel crypt", "east warehouse"]
CONTAINERS = ["locker", "drawer", "crate", "cabinet", "envelope", "trunk", "satchel", "tin"]
OBJECTS = ["a brass compass", "two copper bells", "a folded sea chart", "an ivory chess piece", "a jar of cloves",
           "a cracked pocket watch", "three silver spoons", "a bundle of letters", "a wooden flute",
           "a spool of red thread", "a pair of spectacles", "a tarnished medal", "an old railway timetable",
           "a clay whistle", "a box of matches", "a green glass bead", "a rolled-up tapestry", "a tin soldier"]

CODE_NEEDLES = [  # (needle, question): training-only wordings
    ("The {place} access code is {value}.", "What is the access code for the {place}?"),
    ("To open the {place}, type {value} on the keypad by the door.", "What must be typed to open the {place}?"),
    ("Only the night warden knows that the {place} unlocks with {value}.", "Which code unlocks the {place}?"),
    ("Memo to staff: the {place} combination was changed to {value} this week.",
     "What is the new combination of the {place}?"),
]
NUMBER_NEEDLES = [
    ("The reference number of the {place} ledger is {value}.", "What is the reference number of the {place} ledger?"),
    ("If anything goes wrong at the {place}, telephone {value} at once.",
     "Which telephone number should be called about the {place}?"),
    ("Stamped on the brass plate of the {place} is the serial {value}.",
     "What serial is stamped on the {place} plate?"),
    ("Delivery for the {place} is tracked under number {value}.",
     "Under which number is the {place} delivery tracked?"),
]
PROSE_KV = ["The {box} labelled {key} holds {value}.", "Inside the {box} marked {key} there is {value}.",
            "Someone left {value} in the {box} tagged {key}."]
MULTI_NEEDLES = [  # (needle, question for one value, question for all values)
    ("The record filed under {key} stores {value}.", "Which value does the record filed under {key} store?",
     "List every value stored by the records filed under {key}, separated by commas."),
    ("In the registry, {key} is paired with {value}.", "What is {key} paired with in the registry?",
     "Give all the things {key} is paired with in the registry, separated by commas."),
    ("Clerk's note: entry {key} reads {value}.", "What does entry {key} read, according to the clerk?",
     "Name every reading of entry {key} in the clerk's notes, separated by commas."),
]
KV_INTROS = ["Inventory records in JSON format:", "Below is a lookup table exported as JSON.", "Registry dump:"]
KV_QUESTIONS = ["In the JSON above, which value belongs to the key \"{key}\"?",
                "Look up \"{key}\" in the table above and give its value.",
                "What is stored under \"{key}\" in the registry?"]
VT_SET = ["Let {name} equal {value}.", "Set {name} to {value}.", "The value of {name} is {value}."]
VT_COPY = ["Let {name} equal {value}.", "Set {name} to whatever {value} holds.", "Copy {value} into {name}."]
VT_QUESTIONS = ["Which names end up equal to {value}? Answer with the names, separated by commas.",
                "Following all the assignments in the text, which names hold {value}? List them with commas."]
BIBLE_INTROS = ["An excerpt from the King James Bible, one verse per line:",
                "Read these verses; each line begins with its reference.", ""]
QUOTE_QUESTIONS = ["Quote verse {ref} from the passage above.", "What does verse {ref} say?",
                   "Recite the words of {ref} as given in the passage."]
CLOZE_QUESTIONS = ["Which word completes this line from the passage: \"{line}\"?",
                   "Fill in the blank with the word used in the text: \"{line}\""]
STOP_WORDS = set("that with them they their there this which shall unto upon have from were when what will "
                 "thee thou thine thy hath also said into your because then before after".split())
ANSWER_WORDS = 12  # a quoted verse's answer is cut to its first words


@dataclass
class Sample:
    task: str    # generator name
    prompt: str  # the user turn: context followed by the question
    answer: str  # short gold answer


def has_eval_phrase(text: str) -> bool:
    lower = text.lower()
    return any(phrase.lower() in lower for phrase in EVAL_PHRASES)


@lru_cache(maxsize=1)
def kjv_available() -> bool:
    return shutil.which("bible") is not None


@lru_cache(maxsize=1)
def kjv_verses() -> list[tuple[str, str]]:
    """All KJV verses as (reference, text), read once from Debian's `bible` command; verses holding
    an evaluation phrase are dropped (the Bible says "noise" 74 times)."""
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = [tuple(line.split(" ", 1)) for line in text.splitlines() if " " in line]
    return [(ref, verse) for ref, verse in verses if not has_eval_phrase(verse)]


# --- random values -------------------------------------------------------------------------------

def random_uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


def random_code(rng: random.Random) -> str:
    digits = str(rng.randint(10000, 99999))
    letters = "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ", k=3))
    return rng.choice([digits, f"{digits}-{letters[0]}", f"{letters[:2]}-{rng.randint(1000, 9999)}",
                       f"{letters}{rng.randint(100, 999)}", str(rng.randint(1000, 999999))])


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "uuid":
        return random_uuid(rng)
    if kind == "number":
        return str(rng.randint(100000, 9999999))
    return f"{rng.choice(NAME_WORDS)}-{rng.choice(SALAD_WORDS)}"  # e.g. cobalt-kettle


def distinct(make, n: int) -> list[str]:
    """n distinct values from a random `make()`."""
    values = []
    while len(values) < n:
        value = make()
        if value not in values:
            values.append(value)
    return values


# --- haystacks -----------------------------------------------------------------------------------

def salad_sentence(rng: random.Random) -> str:
    words = rng.choices(SALAD_WORDS, k=rng.randint(6, 14))
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?"])


def kjv_run(rng: random.Random) -> str:
    """A few consecutive verses from a random place, without references."""
    verses = kjv_verses()
    start = rng.randrange(len(verses) - 8)
    return " ".join(text for _, text in verses[start:start + rng.randint(2, 6)])


def trim_words(text: str, n_chars: int) -> str:
    """`text` cut to at most `n_chars` characters at a word boundary."""
    return text if len(text) <= n_chars else text[:n_chars + 1].rsplit(" ", 1)[0]


def haystack(rng: random.Random, n_chars: int) -> list[str]:
    """Filler pieces of about `n_chars` characters in all: KJV passages, word salad, or a mix."""
    style = rng.choice(["kjv", "kjv", "salad", "mixed"]) if kjv_available() else "salad"
    pieces, total = [], 0
    while total < n_chars:
        kind = rng.choice(["kjv", "salad"]) if style == "mixed" else style
        pieces.append(kjv_run(rng) if kind == "kjv" else salad_sentence(rng))
        total += len(pieces[-1]) + 1
    if pieces:
        pieces[-1] = trim_words(pieces[-1], len(pieces[-1]) - (total - n_chars))
    return [p for p in pieces if p]


def scatter(rng: random.Random, pieces: list[str], needles: list[str]) -> str:
    """Needles inserted between haystack pieces at random depths, in their given order."""
    slots = sorted(rng.randint(0, len(pieces)) for _ in needles)
    out = list(pieces)
    for offset, (slot, needle) in enumerate(zip(slots, needles)):
        out.insert(slot + offset, needle)
    return " ".join(out)


# --- task generators: (rng, haystack characters) -> (context, question, answer) --------------------

def hidden_value(rng, n_chars, templates, value):
    needle, question = rng.choice(templates)
    place = rng.choice(PLACES)
    context = scatter(rng, haystack(rng, n_chars), [needle.format(place=place, value=value)])
    return context, question.format(place=place), value


def access_code(rng, n_chars):
    return hidden_value(rng, n_chars, CODE_NEEDLES, random_code(rng))


def number_string(rng, n_chars):
    digits = rng.randint(7, 12)
    return hidden_value(rng, n_chars, NUMBER_NEEDLES, str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)))


def kv_json(rng, n_chars):
    key_kind, value_kind = rng.choice(["uuid", "words"]), rng.choice(["uuid", "number", "words"])
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
    return context, rng.choice(KV_QUESTIONS).format(key=key), table[key]


def kv_prose(rng, n_chars):
    box, template = rng.choice(CONTAINERS), rng.choice(PROSE_KV)
    keys = distinct(lambda: rng.choice([random_code(rng), rng.choice(NAME_WORDS).capitalize()]), rng.randint(2, 16))
    values = [rng.choice(OBJECTS + [str(rng.randint(100, 99999))]) for _ in keys]
    needles = [template.format(box=box, key=k, value=v) for k, v in zip(keys, values)]
    target = rng.randrange(len(keys))
    context = scatter(rng, haystack(rng, n_chars), needles)
    return context, f"What is in the {box} labelled {keys[target]}?", values[target]


def multi_needle(rng, n_chars):
    key_kind, value_kind = rng.choice(["words", "number", "uuid"]), rng.choice(["words", "number", "uuid"])
    needle, ask_one, ask_all = rng.choice(MULTI_NEEDLES)
    keys = distinct(lambda: random_value(rng, key_kind), rng.randint(2, 6))
    several_values = rng.random() < 0.5  # else several keys, one value each
    pairs = [(k, random_value(rng, value_kind)) for k in keys]
    pairs += [(keys[0], random_value(rng, value_kind)) for _ in range(rng.randint(1, 3) * several_values)]
    rng.shuffle(pairs)
    question = (ask_all if several_values else ask_one).format(key=keys[0])
    answer = ", ".join(v for k, v in pairs if k == keys[0])  # in order of appearance
    context = scatter(rng, haystack(rng, n_chars), [needle.format(key=k, value=v) for k, v in pairs])
    return context, question, answer


def variable_tracking(rng, n_chars):
    chains = [rng.randint(2, 5) for _ in range(rng.randint(1, 4))]  # chain lengths; chain 0 is asked
    names = rng.sample(NAME_WORDS, sum(chains))
    numbers = distinct(lambda: str(rng.randint(1000, 99999)), len(chains))
    answer, statements = ", ".join(names[:chains[0]]), []
    for length, number in zip(chains, numbers):
        chain, names = names[:length], names[length:]
        statements.append([rng.choice(VT_SET).format(name=chain[0], value=number)] +
                          [rng.choice(VT_COPY).format(name=b, value=a) for a, b in zip(chain, chain[1:])])
    ordered = []  # a random interleaving that keeps each chain in order
    while any(statements):
        ordered.append(rng.choice([s for s in statements if s]).pop(0))
    context = scatter(rng, haystack(rng, n_chars), ordered)
    return context, rng.choice(VT_QUESTIONS).format(value=numbers[0]), answer


def verse_passage(rng, n_chars) -> list[tuple[str, str]]:
    """Consecutive verses from a random place, about `n_chars` characters with references; the last may be cut."""
    verses, passage, total = kjv_verses(), [], 0
    i = rng.randrange(len(verses))
    while total < n_chars or len(passage) < 2:
        passage.append(verses[i % len(verses)])
        total += len(passage[-1][0]) + len(passage[-1][1]) + 2
        i += 1
    ref, text = passage[-1]
    passage[-1] = (ref, trim_words(text, max(len(text) - (total - n_chars), 0)))
    return passage


def bible_context(rng, passage) -> str:
    lines = "\n".join(f"{ref} {text}" for ref, text in passage)
    return (rng.choice(BIBLE_INTROS) + "\n" + lines).lstrip("\n")


def verse_quote(rng, n_chars):
    passage = verse_passage(rng, n_chars)
    ref, text = rng.choice(passage[:-1])  # not the last verse, which may be cut
    answer = " ".join(text.split()[:ANSWER_WORDS])
    return bible_context(rng, passage), rng.choice(QUOTE_QUESTIONS).format(ref=ref), answer


def bare_word(word: str) -> str:
    return word.strip(".,;:!?()'\"")


def cloze_candidates(words: list[str]) -> list[int]:
    """Positions of distinctive words: long, alphabetic, not a stop word."""
    return [i for i, w in enumerate(map(bare_word, words))
            if len(w) >= 5 and w.isalpha() and w.lower() not in STOP_WORDS]


def verse_cloze(rng, n_chars):
    passage = verse_passage(rng, n_chars)
    context = bible_context(rng, passage)
    counts = Counter(bare_word(w).lower() for w in context.split())
    verses = [(words, cloze_candidates(words)) for words in (text.split() for _, text in passage[:-1])]
    words, candidates = rng.choice([v for v in verses if v[1]] or verses)
    candidates = candidates or range(len(words))
    blank = min(candidates, key=lambda i: (counts[bare_word(words[i]).lower()], rng.random()))
    answer = bare_word(words[blank])
    start = max(0, min(blank - 6, len(words) - 14))
    line = " ".join(w.replace(answer, "____") if i == blank else w for i, w in enumerate(words))
    line = " ".join(line.split()[start:start + 14])
    return context, rng.choice(CLOZE_QUESTIONS).format(line=line), answer


SYNTHETIC = {"access_code": access_code, "number_string": number_string, "kv_json": kv_json, "kv_prose": kv_prose,
             "multi_needle": multi_needle, "variable_tracking": variable_tracking}
NATURAL = {"verse_quote": verse_quote, "verse_cloze": verse_cloze}
GENERATORS = {**SYNTHETIC, **(NATURAL if kjv_available() else {})}
TASKS: list[str] = list(GENERATORS)


# --- length fitting -----------------------------------------------------------------------------

def fit_length(generate, seed_text: str, tokenizer, target: int, tolerance: float = 0.02) -> tuple[str, str]:
    """Build a prompt of about `target` tokens. A cheap first build (one character a token) measures the
    tokens per character; rebuilds (same seed, so the same needles) resize the haystack by the secant
    through the last two builds, since needles and haystack tokenize at different rates."""
    hay_chars, best, last = float(target), None, None
    for _ in range(4):
        context, question, answer = generate(random.Random(seed_text), int(hay_chars))
        prompt = f"{context}\n\n{question}"
        n_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
        if best is None or abs(n_tokens - target) < abs(best[2] - target):
            best = (prompt, answer, n_tokens)
        if abs(n_tokens - target) <= tolerance * target:
            break
        slope = n_tokens / len(prompt)  # tokens per haystack character
        if last and last[0] != hay_chars and (n_tokens - last[1]) / (hay_chars - last[0]) > 0.2 * slope:
            slope = (n_tokens - last[1]) / (hay_chars - last[0])
        last, hay_chars = (hay_chars, n_tokens), max(0.0, hay_chars + (target - n_tokens) / slope)
    return best[0], best[1]


def make_sample(index: int, seed: int, tokenizer, min_tokens: int, max_tokens: int) -> Sample:
    """Sample `index` of the stream for `seed`: deterministic in (index, seed), so training can resume
    anywhere and ranks can shard by index. Its prompt has about U[min_tokens, max_tokens] tokens."""
    rng = random.Random(f"{seed}:{index}")  # string seeds are hashed with sha512: stable across processes
    task, target = rng.choice(TASKS), rng.randint(min_tokens, max_tokens)
    for attempt in range(20):  # a join of haystack pieces can form an evaluation phrase: redraw
        prompt, answer = fit_length(GENERATORS[task], f"{seed}:{index}:{attempt}", tokenizer, target)
        if not has_eval_phrase(prompt) and not has_eval_phrase(answer):
            return Sample(task, prompt, answer)
    raise RuntimeError(f"sample {index} (seed {seed}): every draw held an evaluation phrase")
