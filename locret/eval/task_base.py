"""What every evaluation task is made of: the item and task records, the benchmarks' public
scorers, and the pieces haystacks are built from (tasks.py: the benchmarks; heldout.py: the
held-out suite)."""
import bisect
import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

# RULER's keys are adjective-noun pairs from wonderwords' lists; these lists are our own.
ADJECTIVES = """abrupt agile ancient arid bashful bland brisk bumpy clumsy cozy crisp curious damp
dizzy dusty eager elegant faint fancy fierce fluffy fragile frosty giddy glossy grumpy hasty hollow
humble icy jagged jolly lanky lively lofty lucky mellow misty modest muddy nimble odd plain polite
proud quaint rapid rough rusty salty shaggy shiny silent sleepy slim smooth soggy solemn sour spicy
steep sticky stormy sturdy sunny swift tame tender thirsty tidy tiny vivid wary weary witty
zesty""".split()
NOUNS = """anchor apron attic badger balcony banjo barrel beacon blossom boulder bucket cabin canal
canyon cargo carrot castle cellar chimney cloak comet cottage crayon cricket dagger dolphin donkey
easel ferry fiddle garage glacier gravel hammock helmet igloo kayak lantern lobster locket mango
meteor mitten mustard napkin oyster paddle parrot peanut pebble pelican pigeon pillar puddle
pumpkin quilt raft saddle scarf sled sponge squirrel stool tavern thimble tractor trumpet tulip
turnip umbrella violin wagon walrus whistle""".split()


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
    kind: str = ""        # the kind of value asked for (held-out: number, words, name, code, date)
    # further questions on the same context: Item fields each
    more: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Task:
    # (rng, size, depth, tokenizer) -> Item fields; size counts haystack units
    build: Callable[..., dict]
    template: str               # joins instruction, context and question
    prefix_sep: str             # between that and the answer prefix
    score: Callable[[str, list[str]], float]  # (prediction, answers) -> score
    gen_tokens: int             # the recipe's generation budget
    exact_size: bool = False    # size is the token count itself: no fitting


# --- scorers --------------------------------------------------------------------------------------

def first_int_match(prediction: str, answers: list[str]) -> float:
    """InfiniteBench passkey / number_string: the first run of digits must be the answer."""
    run = re.search("[0-9]+", prediction)
    return float(run is not None and run.group() == answers[0])


def kv_match(prediction: str, answers: list[str]) -> float:
    """InfiniteBench kv_retrieval: the value must be a word once each of \\n : " ' . , ? ! { } is a
    space."""
    return float(answers[0] in re.sub("[\n:\"'.,?!{}]", " ", prediction).split())


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER: the share of references in the prediction, ignoring case, after RULER's
    postprocessing."""
    prediction = re.sub("[\x00-\x1f]", "\n", prediction.strip()).strip().lower()
    return sum(ref.lower() in prediction for ref in answers) / len(answers)


def not_scored(prediction: str, answers: list[str]) -> float:
    """Perplexity is measured from log-likelihoods (eval.py); generated text is not scored."""
    return 0.0


# --- haystack pieces ------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def words_of(text: str) -> list[str]:
    return text.split()


def insert(pieces: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """`pieces` with needle i at the boundary between pieces nearest to depths[i] of their joined
    length; needles keep their order on ties."""
    bounds = [0, *itertools.accumulate(len(p) + 1 for p in pieces)]  # + 1 for the joining separator

    def slot(depth):
        target = depth * bounds[-1]
        j = bisect.bisect_left(bounds, target, hi=len(pieces))
        return j - 1 if j and target - bounds[j - 1] < bounds[j] - target else j
    out = list(pieces)
    for j, i in sorted(((slot(d), i) for i, d in enumerate(depths)), reverse=True):
        out.insert(j, needles[i])
    return out
