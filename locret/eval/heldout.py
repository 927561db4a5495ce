"""The held-out suite: needles phrased unlike any benchmark or training template, hidden in R's own
documentation, technical prose no part of training reads.

Debian's `r-base-core` (installed with `r-cran-janeaustenr`, the RULER haystack) ships R's NEWS
files and manuals. The validation split hides its needles in the NEWS files (release notes); the
test split in the manuals and FAQ, so choices made on validation never see a test document.
corpora.py refuses to read any of it for training.
"""
import html
import re
from functools import lru_cache
from pathlib import Path

from ..errors import LocretError
from .task_base import ADJECTIVES, NOUNS, Task, insert, string_match_all, words_of

R_DOC = Path("/usr/share/R/doc")
SOURCES = {"val": ["NEWS", "NEWS.0", "NEWS.1", "NEWS.2", "NEWS.3"],
           "test": ["FAQ", "manual/R-intro.html", "manual/R-lang.html", "manual/R-data.html",
                    "manual/R-admin.html", "manual/R-ints.html"]}
NAVIGATION = re.compile(r"^(Next|Previous|Up):")  # the manuals' page links


def plain_text(raw: str, is_html: bool) -> str:
    if not is_html:
        return raw
    raw = re.sub(r"(?s)<(script|style|pre)\b.*?</\1>", "\n\n", raw)
    return html.unescape(re.sub(r"<[^>]+>", " ", raw))


@lru_cache(maxsize=2)
def paragraphs(split: str) -> list[str]:
    """The split's documents as paragraphs of running text (whitespace collapsed), in reading
    order."""
    if split not in SOURCES:
        raise LocretError(f"unknown held-out split {split!r} (choose val or test)")
    out = []
    for name in SOURCES[split]:
        path = R_DOC / name
        if not path.is_file():
            raise LocretError(f"the held-out suite needs R's documentation ({path} is missing): "
                              "apt-get install r-cran-janeaustenr (it brings r-base-core)")
        text = plain_text(path.read_text(encoding="utf-8", errors="replace"),
                          name.endswith(".html"))
        for block in re.split(r"\n\s*\n", text):
            block = " ".join(block.split()).lstrip("• ")
            if len(block) >= 60 and not NAVIGATION.match(block):
                out.append(block)
    return out


@lru_cache(maxsize=2)
def text(split: str) -> str:
    return "\n\n".join(paragraphs(split))


NEEDLES = [  # (statement, question, answer cue)
    ("Buried in this text is one odd remark: the {attr} assigned to {subj} is {value}.",
     "What {attr} was assigned to {subj}?", "The {attr} assigned to {subj} is"),
    ("A maintainer added, almost in passing, that {subj} goes by the {attr} {value}.",
     "By which {attr} does {subj} go?", "{Subj} goes by the {attr}"),
    ("(Aside: anyone who asks about {subj} should be told that the {attr} is {value}.)",
     "What should someone asking about {subj} be told the {attr} is?",
     "They should be told that the {attr} is"),
    ("It is set down here, for later, that the {attr} belonging to {subj} equals {value}.",
     "What does the {attr} belonging to {subj} equal?", "The {attr} belonging to {subj} equals"),
    ("During the last review, {subj} confirmed a {attr} of {value}.",
     "Which {attr} did {subj} confirm during the last review?",
     "During the review, {subj} confirmed a {attr} of"),
    ("Keep this in your head: {subj}, {attr}, {value}.",
     "Which {attr} goes with {subj}?", "The {attr} that goes with {subj} is"),
]
ATTRIBUTES = {"number": ["mooring slot", "ration card number", "tram route", "catalogue entry"],
              "words": ["call sign", "watchword", "cover phrase"],
              "name": ["stage name", "godparent", "landlord"],
              "code": ["crate marking", "ticket stub", "permit"],
              "date": ["harvest date", "christening day", "sailing date"]}
SUBJECTS = ["the night porter", "the second cellist", "the lighthouse keeper's niece",
            "the ferry pilot", "the apprentice glassblower", "the retired surveyor",
            "the village organist", "the junior archivist", "the quarry foreman",
            "the beekeeper from the valley", "the ship's cook", "the tram conductor"]
NAMES = (["Ottoline", "Benedikt", "Marisol", "Casimir", "Henrike", "Leopold", "Solveig", "Tobiah"],
         ["Vantongeren", "Quillfeather", "Ashcombe", "Brightwater", "Castellanos", "Drummond",
          "Ferreira"])
ORDINAL = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}
# a 7K-token prompt of R's prose takes about 5,500 words; longer haystacks wrap round
MAX_HAYSTACK_WORDS = 9000


def random_value(rng, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(10 ** 5, 10 ** 8 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    if kind == "name":
        return f"{rng.choice(NAMES[0])} {rng.choice(NAMES[1])}"
    if kind == "code":
        return (f"{rng.choice('QWXZ')}{rng.choice('KVJY')}-"
                f"{rng.randint(100, 999)}/{rng.randint(10, 99)}")
    day = rng.randint(1, 28)
    return (f"the {day}{ORDINAL.get(day, 'th')} of {rng.choice(['March', 'June', 'October'])} "
            f"{rng.randint(1801, 1899)}")


def random_fact(rng, subjects: list[str]) -> dict:
    """One fact about a subject not in `subjects` (which it joins): its statement, question, cue
    and value."""
    kind = rng.choice(list(ATTRIBUTES))
    attr, subj = (rng.choice(ATTRIBUTES[kind]),
                  rng.choice([x for x in SUBJECTS if x not in subjects]))
    subjects.append(subj)
    value = random_value(rng, kind)
    statement, question, cue = rng.choice(NEEDLES)
    fields = dict(attr=attr, subj=subj, Subj=subj[:1].upper() + subj[1:], value=value)
    return dict(needle=statement.format(**fields), question=question.format(**fields),
                answer_prefix=cue.format(**fields), answers=[value], kind=kind)


def needle_task(split: str, n_facts: int = 1):
    """`n_facts` facts in `size` words of the split's R documentation, the first at `depth` and the
    others spread evenly after it (depths stretched to 0.05-0.95, wrapping round). The item asks
    about the first; `more` holds the questions about the others (eval.py --multi-question asks
    them all)."""
    def build(rng, size, depth, tokenizer):
        subjects = []
        facts = [random_fact(rng, subjects) for _ in range(n_facts)]
        words = words_of(text(split))
        start = rng.randrange(len(words) - MAX_HAYSTACK_WORDS)
        # past the split's end it wraps round to its start (prompts longer than about 7K tokens)
        hay = words[start:start + size] + words[:max(start + size - len(words), 0)]
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", " ".join(hay)) if size else []
        depths = [0.05 + 0.9 * ((depth + i / n_facts) % 1.0001) for i in range(n_facts)]
        needles = [f.pop("needle") for f in facts]
        more = [dict(f, needles=[n], depth=d)
                for f, n, d in zip(facts[1:], needles[1:], depths[1:])]
        return dict(context=" ".join(insert(sentences, needles, depths)), **facts[0],
                    needles=needles[:1], depth=depths[0], more=more)
    return Task(build, "{context}\n\n{question}", "\n", string_match_all, 16)
