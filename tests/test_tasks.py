import json
import random
import re
import struct
import uuid
from pathlib import Path

import pytest

from conftest import write_byte_level_tokenizer
from locret.eval import haystack
from locret.eval import heldout
from locret.eval import tasks as T
from locret.train import data as td
from locret.eval.task_base import words_of
from locret.errors import LocretError
from locret.eval.evaluation import encode_item
from locret.loading.tokenizer import Tokenizer

REAL_ESSAYS = haystack.essays
# Essay tasks run on this text in tests, so they pass whether or not r-cran-janeaustenr is
# installed.
FALLBACK = " ".join([
    "The ferry left the harbour at dawn, and the passengers watched the cliffs turn from grey to "
    "gold.",
    "Mrs. Holloway counted her parcels twice before she allowed herself to sit down.",
    "Nobody on board could say why the captain had chosen the northern route; the weather there "
    "was rarely kind!",
    "By noon the gulls had given up following them, and the cook began to sing in the galley.",
    "Was it courage or habit that kept the old sailor at the rail all afternoon?",
    "Thomas thought it was habit, though he was careful never to say so within earshot of the man "
    "himself.",
] * 120)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# The held-out suite runs on this text in tests, whether or not R's documentation is installed.
TECH_FALLBACK = " ".join([
    "The function now accepts a list of options, and unknown options are reported as warnings.",
    "When the buffer is full, the writer blocks until a reader has consumed at least one record.",
    "Configuration files are read in order; later files override earlier ones (see the manual).",
    "Is the default still sensible on small machines? The benchmarks suggest it is, within limits.",
    "Error messages now name the offending argument instead of its position.",
] * 400)
NEEDLE_TASKS = [t for t in T.TASKS if T.TASKS[t].score is not T.not_scored]
# not sentence-sized pieces
FINE_GRAINED = ["passkey", "number_string", "kv_retrieval", "niah_single_1", "vt"]


@pytest.fixture(autouse=True)
def fallback_essays(monkeypatch):
    monkeypatch.setattr(haystack, "essays", lambda: FALLBACK)
    monkeypatch.setattr(heldout, "text", lambda split: TECH_FALLBACK)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE: the tasks fit any tokenizer's lengths; the real one is not the
    point."""
    folder = tmp_path_factory.mktemp("tokenizer")
    texts = [FALLBACK, NOISE, TECH_FALLBACK, REAL_ESSAYS(AUSTEN_EXCERPT)]
    write_byte_level_tokenizer(folder, texts, vocab_size=2000)
    return Tokenizer(folder)


def n_tokens(tok, item):
    return len(tok.encode(T.completion_prompt(item) + " " + " ".join(item.answers),
                          add_special_tokens=False))


# --- templates ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, instruction, needle, question, prefix, digits", [
    ("passkey", "There is an important info hidden inside a lot of irrelevant text. "
     "Find it and memorize them. I will quiz you about the important information there.",
     "The pass key is {k}. Remember it. {k} is the pass key.",
     "What is the pass key?", "The pass key is", 5),
    ("number_string", "There is an important info hidden inside a lot of irrelevant text. Find it. "
     "I will quiz you about the important information there.",
     "The sequence of digits is {k}. Remember it. {k} is the sequence of digits.",
     "What is the sequence of digits?", "The sequence of digits is", 10)])
def test_infinitebench_retrieval_template(tok, task, instruction, needle, question, prefix, digits):
    item = T.make_item(task, 4, 0, tok, 1024)
    key = item.answers[0]
    prompt = T.completion_prompt(item)
    assert re.fullmatch(rf"[0-9]{{{digits}}}", key)
    assert prompt.startswith(f"{instruction}\n\n{NOISE}\n{NOISE}\n")
    assert f"{NOISE}\n{needle.format(k=key)}\n{NOISE}\n" in prompt
    assert prompt.endswith(f"\n\n\n{question}\n\n{prefix}")  # the context ends with a line break
    assert item.needles == [needle.format(k=key)]


def test_number_string_doubles_five_digits(tok):
    for i in range(10):
        key = T.make_item("number_string", i, 0, tok, 1024).answers[0]
        # each of the 5 insertions doubles a digit in place
        assert sum(a == b for a, b in zip(key, key[1:])) >= 5


def test_kv_retrieval_template(tok):
    item = T.make_item("kv_retrieval", 4, 0, tok, 1024)
    prompt = T.completion_prompt(item)
    head = ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
            "JSON data:\n{")
    assert prompt.startswith(head)
    table = json.loads(item.context.removeprefix("JSON data:\n"))
    key = re.fullmatch(r'.*\}\n\nKey: "(.+)"\nThe value associated with the specified key is: ',
                       prompt, re.S).group(1)
    assert table[key] == item.answers[0] and len(table) > 5
    assert all(uuid.UUID(s).version == 4 and str(uuid.UUID(s)) == s
               for pair in table.items() for s in pair)
    assert item.needles == [f'"{key}": "{table[key]}"'] and item.needles[0] in item.context
    # InfiniteBench's separators
    assert ", ".join(f'"{k}": "{v}"' for k, v in table.items()) in item.context


@pytest.mark.parametrize("task, kind, value_re", [
    ("niah_single_1", "number", "[0-9]{7}"),
    ("niah_single_2", "number", "[0-9]{7}"),
    ("niah_single_3", "uuid",
     "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")])
def test_niah_single_templates(tok, task, kind, value_re):
    item = T.make_item(task, 4, 0, tok, 1024)
    prompt = T.completion_prompt(item)
    (needle,) = item.needles
    needle_re = rf"One of the special magic {kind}s for ([a-z]+-[a-z]+) is: ({value_re})\."
    key, value = re.fullmatch(needle_re, needle).groups()
    assert item.answers == [value]
    assert prompt.startswith(f"A special magic {kind} is hidden within the following text. "
                             f"Make sure to memorize it. I will quiz you about the {kind} "
                             "afterwards.\n")
    assert prompt.endswith(f"\nWhat is the special magic {kind} for {key} mentioned in the "
                           f"provided text? The special magic {kind} for {key} mentioned in the "
                           "provided text is")
    haystack_line = (f"\n{NOISE}\n" if task == "niah_single_1"
                     else "Mrs. Holloway counted her parcels twice")
    assert haystack_line in prompt
    if task == "niah_single_1":
        assert f"\n{needle}\n" in prompt  # RULER's repeat haystack: one sentence group per line


def test_niah_multi_templates(tok):
    multikey = T.make_item("niah_multikey_1", 4, 0, tok, 1024)
    keys = [re.match("One of the special magic numbers for (.+) is", n).group(1)
            for n in multikey.needles]
    assert len(set(keys)) == 4 and len(multikey.answers) == 1 and keys[0] in multikey.question
    assert multikey.instruction.startswith("A special magic number is hidden")

    multivalue = T.make_item("niah_multivalue", 4, 0, tok, 1024)
    key = re.match("One of the special magic numbers for (.+) is", multivalue.needles[0]).group(1)
    assert {n.rsplit(": ", 1)[1][:-1] for n in multivalue.needles} == set(multivalue.answers)
    assert len(multivalue.answers) == 4 and all(key in n for n in multivalue.needles)
    assert T.completion_prompt(multivalue).startswith(
        "Some special magic numbers are hidden within the following text. "
        "Make sure to memorize it. I will quiz you about the numbers afterwards.\n")
    assert T.completion_prompt(multivalue).endswith(
        f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
        f"The special magic numbers for {key} mentioned in the provided text are")

    multiquery = T.make_item("niah_multiquery", 4, 0, tok, 1024)
    pairs = dict(re.match("One of the special magic numbers for (.+) is: (.+)\\.", n).groups()
                 for n in multiquery.needles)
    query = re.search("The special magic numbers for (.+) mentioned in the provided text are$",
                      T.completion_prompt(multiquery)).group(1)
    asked = query.replace(", and ", ", ").split(", ")
    assert (re.fullmatch(r"[a-z-]+, [a-z-]+, [a-z-]+, and [a-z-]+", query)
            and sorted(asked) == sorted(pairs))
    assert multiquery.answers == [pairs[k] for k in asked]


def test_vt_template(tok):
    item = T.make_item("vt", 4, 0, tok, 2048)
    prompt = T.completion_prompt(item)
    instruction = ("Memorize and track the chain(s) of variable assignment hidden in the "
                   "following text.\n\n")
    value = re.fullmatch(r"VAR [A-Z]{5} = ([0-9]{5})", item.needles[0]).group(1)
    assert prompt.endswith(f"\nQuestion: Find all variables that are assigned the value {value} "
                           "in the text above. Answer: According to the chain(s) of variable "
                           "assignment in the text above, 5 variables "
                           f"are assgined the value {value}, they are: ")
    # the one-shot example: the same task, 3-letter names, answered, then four line breaks
    example = re.fullmatch(rf"{re.escape(instruction)}(.*) they are:  "
                           rf"([A-Z]{{3}}(?: [A-Z]{{3}}){{4}})\n\n\n\n"
                           rf"{re.escape(instruction)}.*", prompt, re.S)
    assert example and f"VAR {example.group(2).split()[-1]} = VAR " in example.group(1)
    names = item.answers
    assert item.needles == ([f"VAR {names[0]} = {value}"]
                            + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])])
    positions = [item.context.index(n) for n in item.needles]
    assert positions == sorted(positions) and f"{NOISE}\n {NOISE}\n" in item.context


def test_chat_messages_hold_the_prompt_without_prefix(tok):
    for task in ["passkey", "kv_retrieval", "niah_single_2", "vt"]:
        item = T.make_item(task, 2, 0, tok, 2048)
        (message,) = T.chat_messages(item)
        assert message["role"] == "user"
        assert T.completion_prompt(item) == (
            message["content"] + T.TASKS[task].prefix_sep + item.answer_prefix
            if item.answer_prefix else message["content"])
        assert message["content"].endswith(item.question)


# --- placement, size, determinism -----------------------------------------------------------------

# At 1K an essay holds ~15 sentences and a needle goes between two: depth resolution is one
# sentence.
@pytest.mark.parametrize("task, length", [(t, 4096) for t in NEEDLE_TASKS]
                                         + [(t, 1024) for t in FINE_GRAINED])
def test_needle_at_requested_depth(tok, task, length):
    for index in [0, 3, 7, 9]:
        item = T.make_item(task, index, 2, tok, length)
        stretched = task.startswith("heldout")  # the held-out suite spreads depths over 0.05-0.95
        assert item.depth == pytest.approx(0.05 + 0.9 * index / 9 if stretched else index / 9)
        context = item.context
        for other in item.needles[1:]:
            context = context.replace(other, "")
        relative = context.index(item.needles[0]) / (len(context) - len(item.needles[0]))
        assert abs(relative - item.depth) < 0.05, (index, relative)


@pytest.mark.parametrize("task", list(T.TASKS))
@pytest.mark.parametrize("length", [1024, 4096])
def test_length_within_two_percent(tok, task, length):
    granularity = 80 if task == "kv_retrieval" else 0  # one JSON pair of two uuids is ~71 tokens
    for index in [1, 6]:
        n = n_tokens(tok, T.make_item(task, index, 0, tok, length))
        assert length - max(0.02 * length, granularity) <= n <= length


def test_deterministic(tok):
    for task in T.TASKS:
        item = T.make_item(task, 5, 7, tok, 1024)
        assert item == T.make_item(task, 5, 7, tok, 1024)
        assert (item != T.make_item(task, 6, 7, tok, 1024)
                and item != T.make_item(task, 5, 8, tok, 1024))


def test_perplexity_item(tok):
    item = T.make_item("perplexity", 0, 0, tok, 1024)
    assert item.question == item.answer_prefix == "" and item.needles == []
    assert abs(len(tok.encode(item.answers[0], add_special_tokens=False)) - T.CONTINUATION) <= 2
    assert FALLBACK.find(item.context[:200]) >= 0 and T.completion_prompt(item) == item.context
    assert T.score(item, "anything") == 0.0


def test_errors(tok):
    with pytest.raises(LocretError, match="unknown task"):
        T.make_item("passkey2", 0, 0, tok, 1024)
    with pytest.raises(LocretError, match="cannot hold"):
        T.make_item("vt", 0, 0, tok, 256)  # the one-shot example alone takes ~470 tokens


# --- scorers --------------------------------------------------------------------------------------

def item_with(task, answers):
    return T.Item(task, "", "", "", answers, [], 0.0)


def test_first_int_scorer():
    for task in ["passkey", "number_string"]:
        item = item_with(task, ["12345"])
        assert T.score(item, "The pass key is 12345.") == 1.0
        assert T.score(item, " 12345 67890") == 1.0  # the first run of digits counts
        assert T.score(item, "123456") == 0.0
        assert T.score(item, "no digits") == 0.0
        assert T.score(item, "67890 then 12345") == 0.0
    assert T.score(item_with("passkey", ["01234"]), "01234") == 1.0  # compared as strings


def test_kv_scorer():
    value = "5c761562-97ff-4f9b-8b9a-78ce24956c86"
    item = item_with("kv_retrieval", [value])
    for right in [value, f"{value}.", f'"{value}"', f"{{'{value}'}}", f"value:{value}!\n",
                  f"is {value}, ok?"]:
        assert T.score(item, right) == 1.0, right
    for wrong in [value[:-1], f"x{value}", f"({value})", "nothing", f"{value}-2"]:
        assert T.score(item, wrong) == 0.0, wrong


def test_string_match_all_scorer():
    item = item_with("niah_multivalue", ["1234567", "AbCd"])
    assert T.score(item, "1234567 and abcd") == 1.0
    assert T.score(item, "1234567 only") == 0.5
    assert T.score(item, "nothing") == 0.0
    # case-insensitive, control characters stripped
    assert T.score(item_with("vt", ["ABCDE"]), "\x07 abcde\t") == 1.0


# --- training data stays apart --------------------------------------------------------------------

class WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return re.findall(r"\w+|[^\w\s]", text)


def test_eval_texts_are_not_training_texts(tok):
    training = [td.make_sample(i, 3, WordTokenizer(), 200, 1500).prompt for i in range(200)]
    for task in NEEDLE_TASKS:
        item = T.make_item(task, 4, 0, tok, 1024)
        fragments = item.needles + re.split(r"\n+", item.instruction + "\n" + item.question + "\n"
                                            + item.answer_prefix)
        # no exemption: training holds none of the eval phrases either
        for text in filter(None, fragments):
            assert not any(text in prompt for prompt in training), (task, text)


# --- the haystack reader --------------------------------------------------------------------------

def r_serialized(flags_and_payload: bytes) -> bytes:
    """An R XDR serialization (format version 3, native encoding UTF-8) around one object."""
    return (b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
            + flags_and_payload)


def test_r_character_vector_reader():
    def charsxp(s):
        return struct.pack(">ii", 0x40009, len(s)) + s
    na = struct.pack(">ii", 9, -1)
    payload = struct.pack(">ii", 16, 3) + charsxp(b"It is a truth") + na + charsxp(b"caf\xc3\xa9")
    assert haystack.character_vector(r_serialized(payload), "test") == ["It is a truth", None,
                                                                        "café"]
    with pytest.raises(LocretError, match="expected a character vector"):
        haystack.character_vector(r_serialized(struct.pack(">iii", 13, 1, 7)), "test")
    with pytest.raises(LocretError, match="not an R XDR"):
        haystack.character_vector(b"RDX3\n", "test")


def test_austen_novels_or_install_hint(tmp_path):
    with pytest.raises(LocretError, match="apt-get install r-cran-janeaustenr"):
        REAL_ESSAYS(tmp_path)


# The first 120 lines of each novel, written by R's own tools:::makeLazyLoadDB from janeaustenr's
# data, so the essay tasks run on the real novels' text and file format on every machine.
AUSTEN_EXCERPT = Path(__file__).parent / "data" / "janeaustenr"
ESSAY_TASKS = ["niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
               "niah_multiquery"]


def test_austen_excerpt_reads_as_the_six_novels():
    text = REAL_ESSAYS(AUSTEN_EXCERPT)
    titles = ["SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA",
              "NORTHANGER ABBEY", "Persuasion"]  # janeaustenr's own spelling
    assert text.startswith("SENSE AND SENSIBILITY\n\nby Jane Austen\n\n(1811)")
    starts = [text.index(f"\n\n{title}\n") for title in titles[1:]]  # each novel after a blank line
    assert starts == sorted(starts)  # in order of publication
    assert "It is a truth universally acknowledged" in text[starts[0]:starts[1]]


@pytest.mark.parametrize("task", ESSAY_TASKS + ["perplexity"])
def test_essay_tasks_on_the_real_novels(tok, monkeypatch, task):
    monkeypatch.setattr(haystack, "essays", lambda: REAL_ESSAYS(AUSTEN_EXCERPT))
    item = T.make_item(task, 3, 0, tok, 1024)
    context = item.context
    for needle in item.needles:
        assert context.count(needle) == 1
        context = context.replace(needle, "")
    novel = " ".join(words_of(REAL_ESSAYS(AUSTEN_EXCERPT)))
    words = " ".join(words_of(context))
    assert 1024 - 0.02 * 1024 <= n_tokens(tok, item) <= 1024
    if task == "perplexity":  # a passage from anywhere in the novels
        assert words in novel and len(words) > 3000
        return
    # the novels' words from the start, in order, needles aside
    assert novel.startswith(words[:-40])
    sentences = T.essay_sentences(2000)
    # "Mr. Dashwood"
    assert len(sentences) > 50 and not any(s.endswith(("Mr.", "Mrs.")) for s in sentences)
    assert not any(answer in novel for answer in item.answers)
    assert T.score(item, " " + " ".join(item.answers)) == 1.0 and T.score(item, " Elinor") == 0.0


# --- the held-out suite ---------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["val", "test"])
def test_heldout_needles_at_spread_depths_with_question_and_cue(tok, split):
    depths = []
    for i in range(10):
        item = T.make_item(f"heldout_{split}", i, 0, tok, 1024)
        prompt = T.completion_prompt(item)
        needle, value = item.needles[0], item.answers[0]
        assert (value in needle and needle in item.context
                and value not in item.context.replace(needle, ""))
        assert item.kind in heldout.ATTRIBUTES and (item.kind == "number") == value.isdigit()
        assert prompt == f"{item.context}\n\n{item.question}\n{item.answer_prefix}"
        assert 0.975 * 1024 <= n_tokens(tok, item) <= 1024
        at = item.context.index(needle) / max(1, len(item.context) - len(needle))
        assert abs(at - item.depth) < 0.06, (at, item.depth)  # within a sentence of the depth asked
        depths.append(item.depth)
    assert min(depths) == pytest.approx(0.05) and max(depths) == pytest.approx(0.95)
    assert T.score(item, f" {value.upper()}.") == 1.0 and T.score(item, "I do not know") == 0.0


def test_heldout_splits_read_different_documents(tmp_path, monkeypatch):
    assert not set(heldout.SOURCES["val"]) & set(heldout.SOURCES["test"])
    (tmp_path / "manual").mkdir()
    for name in heldout.SOURCES["val"]:
        (tmp_path / name).write_text(f"CHANGES IN {name}:\n\n    \u2022 The reader of {name} "
                                     "no longer fails on empty files or on files without a final "
                                     "newline.\n")
    for name in heldout.SOURCES["test"]:  # the FAQ is plain text, the manuals HTML
        html = ("<p>Next: Intro, Previous: Top, Up: Manual</p>\n\n"
                "<p>Vectors &amp; lists are <code>objects</code> of the language, read from the "
                "test split.</p>\n")
        plain = "Vectors & lists are objects of the language, read from the test split.\n"
        (tmp_path / name).write_text(html if name.endswith(".html") else plain)
    monkeypatch.setattr(heldout, "R_DOC", tmp_path)
    heldout.paragraphs.cache_clear()
    val, test = heldout.paragraphs("val"), heldout.paragraphs("test")
    assert val[0] == ("The reader of NEWS no longer fails on empty files or on files without a "
                      "final newline.")
    assert len(val) == 5
    assert test[0] == "Vectors & lists are objects of the language, read from the test split."
    assert len(test) == len(heldout.SOURCES["test"])  # the navigation line is dropped
    (tmp_path / "NEWS").unlink()
    heldout.paragraphs.cache_clear()
    with pytest.raises(LocretError, match="apt-get install r-cran-janeaustenr"):
        heldout.paragraphs("val")
    heldout.paragraphs.cache_clear()


def test_heldout_haystacks_past_the_splits_end_wrap_round_to_its_start(monkeypatch):
    """A haystack longer than what follows its random start goes on from the split's first word:
    every word of the split at most once, in order."""
    words = [f"w{i}." for i in range(heldout.MAX_HAYSTACK_WORDS + 500)]
    monkeypatch.setattr(heldout, "text", lambda split: " ".join(words))
    size = heldout.MAX_HAYSTACK_WORDS + 300
    fields = heldout.needle_task("test").build(random.Random(3), size, 0.5, None)
    hay = [w for w in fields["context"].split() if w.startswith("w") and w[1:-1].isdigit()]
    first = int(hay[0][1:-1])
    assert len(hay) == size and first + size > len(words)  # it wrapped
    assert hay == [f"w{(first + i) % len(words)}." for i in range(size)]


@pytest.mark.parametrize("task", ["vt", "passkey"])
def test_encoding_splits_preamble_context_and_question(tok, task):
    item = T.make_item(task, 1, 0, tok, 2048)
    encoded = encode_item(tok, item, "completion")
    body = len(encoded.prompt) - encoded.question_tokens
    preamble = tok.decode(encoded.prompt[:encoded.preamble_tokens])
    context = tok.decode(encoded.prompt[:body])
    # instruction, example
    before = T.completion_prompt(item)[:T.completion_prompt(item).rfind(item.context)]
    assert (item.instruction.strip()[:40] in preamble
            and before.rstrip().endswith(preamble.rstrip()[-30:]))
    assert context.rstrip().endswith(item.context.rstrip()[-20:]) and item.question not in context
    assert all(encoded.preamble_tokens <= r.start and r.stop <= body for r in encoded.needles)
