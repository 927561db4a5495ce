import itertools
import json
import re
import subprocess
import sys

import pytest

from locret import train_data as td


class WordTokenizer:
    """A stand-in tokenizer: one token per word or punctuation mark."""

    def encode(self, text, add_special_tokens=False):
        return re.findall(r"\w+|[^\w\s]", text)


TOK = WordTokenizer()


@pytest.fixture(scope="module")
def samples():
    return [td.make_sample(i, 3, TOK, 200, 1500) for i in range(200)]


# Stand-in verses where Debian's `bible` is not installed, so the natural-text tasks are tested everywhere.
FAKE_VERSES = [(f"Bk{c}:{v}", f"In the {w} season the shepherd counted {v} lambs beside the river {c} and sang.")
               for c, w in enumerate(["early", "quiet", "golden", "distant", "bitter"], 1) for v in range(1, 40)]


@pytest.fixture
def verses(monkeypatch):
    """The natural-text tasks, on the real KJV where installed, else on FAKE_VERSES."""
    if not td.kjv_available():
        monkeypatch.setattr(td, "kjv_verses", lambda: FAKE_VERSES)
        monkeypatch.setattr(td, "GENERATORS", {**td.SYNTHETIC, **td.NATURAL})
        monkeypatch.setattr(td, "TASKS", list(td.SYNTHETIC) + list(td.NATURAL))


def samples_of(task, n=4, seed=11):
    """The first n samples of `task` in the stream for `seed`."""
    stream = (td.make_sample(i, seed, TOK, 300, 1200) for i in range(1000))
    found = list(itertools.islice((s for s in stream if s.task == task), n))
    assert len(found) == n
    return found


def context_of(sample):
    return sample.prompt.rsplit("\n\n", 1)[0]


def test_deterministic_in_index_and_seed():
    a = td.make_sample(5, 7, TOK, 500, 2000)
    assert a == td.make_sample(5, 7, TOK, 500, 2000)
    assert a != td.make_sample(6, 7, TOK, 500, 2000)
    assert a != td.make_sample(5, 8, TOK, 500, 2000)


def test_same_sample_in_a_fresh_process():
    code = ("import re; from locret import train_data as td\n"
            "class T:\n    encode = lambda self, t, add_special_tokens=False: re.findall(r'\\w+|[^\\w\\s]', t)\n"
            "print(td.make_sample(5, 7, T(), 500, 2000).prompt, end='')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == td.make_sample(5, 7, TOK, 500, 2000).prompt


@pytest.mark.parametrize("task", ["access_code", "number_string", "kv_prose", "multi_needle", "verse_quote"])
def test_answer_is_in_the_context(task, verses):
    for sample in samples_of(task):
        for part in sample.answer.split(", ") if task == "multi_needle" else [sample.answer]:
            assert part and part in context_of(sample)


def test_kv_json_answer_is_the_keys_value():
    for sample in samples_of("kv_json"):
        context, question = sample.prompt.rsplit("\n\n", 1)
        table = json.loads(context.split("\n", 1)[1])
        key = re.search(r'"([^"]+)"', question).group(1)
        assert table[key] == sample.answer


def template_regex(template):
    names = "|".join(td.NAME_WORDS)
    groups = {"{name}": rf"\b(?P<name>{names})\b", "{value}": rf"\b(?P<value>{names}|\d+)\b"}
    return re.compile("".join(groups.get(p, re.escape(p)) for p in re.split(r"(\{name\}|\{value\})", template)))


def test_variable_tracking_chains_resolve_to_the_number():
    regexes = [template_regex(t) for t in set(td.VT_SET + td.VT_COPY)]
    for sample in samples_of("variable_tracking"):
        context, question = sample.prompt.rsplit("\n\n", 1)
        assigned = {m["name"]: m["value"] for r in regexes for m in r.finditer(context)}

        def resolve(name):
            while not name.isdigit():
                name = assigned[name]
            return name
        number = re.search(r"\d+", question).group()
        expected = {name for name in assigned if resolve(name) == number}
        answered = sample.answer.split(", ")
        assert len(answered) >= 2 and set(answered) == expected


def test_cloze_word_is_in_its_verse(verses):
    for sample in samples_of("verse_cloze", n=8):
        line = re.search(r'"(.*)"', sample.prompt.rsplit("\n\n", 1)[1]).group(1)
        assert line.count("____") == 1 and sample.answer.isalpha()
        verse = [v for v in context_of(sample).split("\n") if line.replace("____", sample.answer) in v]
        assert verse and sample.answer in verse[0].split(" ", 1)[1]


@pytest.mark.parametrize("target", [1000, 3000])
def test_length_within_5_percent(target):
    for i in range(16):
        sample = td.make_sample(i, 0, TOK, target, target)
        assert abs(len(TOK.encode(sample.prompt)) - target) <= 0.05 * target, sample.task


def test_length_with_the_default_tokenizer():
    from locret.default_model import ensure_default_model
    from locret.tokenizer import Tokenizer
    tokenizer = Tokenizer(ensure_default_model())
    for target in (1000, 3000):
        for i in range(16):
            sample = td.make_sample(i, 0, tokenizer, target, target)
            n_tokens = len(tokenizer.encode(sample.prompt, add_special_tokens=False))
            assert abs(n_tokens - target) <= 0.05 * target, (sample.task, n_tokens)


def test_no_evaluation_phrases(samples):
    for sample in samples:
        text = (sample.prompt + "\n" + sample.answer).lower()
        assert not [p for p in td.EVAL_PHRASES if p.lower() in text], sample.task


def test_task_mix_covers_all_tasks(samples):
    assert {s.task for s in samples[:100]} == set(td.TASKS)
    assert len(td.TASKS) == 8 if td.kjv_available() else len(td.TASKS) == 6


def test_synthetic_tasks_without_the_bible(monkeypatch):
    def no_bible():
        raise AssertionError("KJV read although unavailable")
    monkeypatch.setattr(td, "kjv_available", lambda: False)
    monkeypatch.setattr(td, "kjv_verses", no_bible)
    monkeypatch.setattr(td, "TASKS", list(td.SYNTHETIC))
    tasks = {td.make_sample(i, 1, TOK, 300, 800).task for i in range(40)}
    assert tasks == set(td.SYNTHETIC)
