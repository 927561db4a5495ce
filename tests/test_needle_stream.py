"""bench/needle_stream.py --quick on tiny random models (a Llama, and a Gemma 3 with sliding-window
layers): a record per run and needle, needles at their depths, documents of the asked length, the
last-window baseline's context, resuming, and the table. Random models answer nothing: recall is
checked for consistency, not value."""
import json
import runpy
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config, write_byte_level_tokenizer
from locret.errors import LocretError
from locret.eval import heldout
from locret.heads import save_heads
from locret.loading.tokenizer import Tokenizer
from locret.loading.weights import load_model
from test_gemma3 import save_gemma3, tiny_gemma3_config

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "needle_stream.py"))
WINDOW = 512  # the tiny models' context: the quick streams (600, 1200 tokens) run past it
VOCAB = 512
# 40 distinct sentences (about 1K tokens here): the 1200-token streams wrap round
TEXT = " ".join(f"Option {i} now names the file it could not read, and the log keeps {i * 7} lines "
                "of context (see the manual)." for i in range(40))
QUICK = dict(lengths=[600, 1200], depths=[0.2, 0.5, 0.8], streams=2, max_new_tokens=8)
POLICIES = ["locret", "streamingllm", "snapkv", "last-window"]


@pytest.fixture(autouse=True)
def plain_text(monkeypatch):
    monkeypatch.setattr(heldout, "text", lambda split: TEXT)


def make_folder(kind: str, folder: Path) -> Path:
    """A tiny random model of `kind` with a byte-level tokenizer and random retaining heads."""
    torch.manual_seed(0)
    if kind == "gemma3":
        save_gemma3(folder, tiny_gemma3_config(vocab_size=VOCAB, max_position_embeddings=WINDOW))
    else:
        import transformers
        config = tiny_llama_config(vocab_size=VOCAB, max_position_embeddings=WINDOW)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    needles = " ".join(s + q + c for s, q, c in heldout.NEEDLES)
    write_byte_level_tokenizer(folder, [TEXT, needles], vocab_size=VOCAB)
    model = load_model(folder)
    model.add_retaining_heads(8)
    save_heads(model, folder / "heads.safetensors", "tiny")
    return folder


def run(folder: Path, out: Path, *more: str) -> str:
    args = BENCH["parse_args"](["--ckpt", str(folder), "--heads", str(folder / "heads.safetensors"),
                                "--quick", "--device", "cpu", "--dtype", "float32",
                                "--out", str(out), *more])
    BENCH["main"](args)
    return out.with_suffix(".md").read_text()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_needles_in_streams_past_the_window(kind, tmp_path, capsys):
    folder = make_folder(kind, tmp_path / kind)
    out = tmp_path / "needles.jsonl"
    table = run(folder, out)
    assert capsys.readouterr().out == table
    rows = BENCH["read_rows"](out)
    assert sorted((r["length"], r["seed"], r["policy"]) for r in rows) == sorted(
        (n, s, p) for n in QUICK["lengths"] for s in range(QUICK["streams"]) for p in POLICIES)

    tokenizer = Tokenizer(folder)
    for r in rows:
        assert [n["depth"] for n in r["needles"]] == QUICK["depths"]
        assert all(n["correct"] in (0, 1) for n in r["needles"])
        assert abs(r["document_tokens"] - r["length"]) <= 0.01 * r["length"]
        room = max(n["question_tokens"] for n in r["needles"]) + QUICK["max_new_tokens"]
        kept = WINDOW - room if r["policy"] == "last-window" else r["document_tokens"]
        assert r["context_tokens"] == kept and r["pool_bytes"] > 0 and r["peak_rss_so_far_bytes"]
        doc = BENCH["make_document"](tokenizer, r["length"], QUICK["depths"], r["seed"])
        assert doc.tokens == r["document_tokens"]
        assert [n["position"] for n in r["needles"]] == doc.positions
        check_needles(tokenizer, doc)

    for length in QUICK["lengths"]:
        for seed in range(QUICK["streams"]):
            same = [r for r in rows if (r["length"], r["seed"]) == (length, seed)]
            # every policy asks the same questions of the same document
            assert len({json.dumps([(n["question_tokens"], n["value"]) for n in r["needles"]])
                        for r in same}) == 1
    for policy in POLICIES[:3]:  # evicting pools do not grow with the stream (the questions do)
        for seed in range(QUICK["streams"]):
            assert len({r["pool_bytes"] for r in rows if (r["policy"], r["seed"]) == (policy, seed)
                        }) == 1

    summary = BENCH["summarize"](rows, POLICIES, QUICK["depths"])
    assert [(s["policy"], s["length"]) for s in summary] == [
        (p, n) for p in POLICIES for n in QUICK["lengths"]]
    for s in summary:
        records = [n["correct"] for r in rows if (r["policy"], r["length"]) == (s["policy"],
                                                                               s["length"])
                   for n in r["needles"]]
        assert s["n"] == len(records) == QUICK["streams"] * len(QUICK["depths"])
        assert s["correct"] == sum(records) == sum(c for c, _ in s["by_depth"])
        assert [n for _, n in s["by_depth"]] == [QUICK["streams"]] * len(QUICK["depths"])
    body = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(body) == 1 + len(POLICIES) * len(QUICK["lengths"])  # the header, then the rows

    lines = out.read_text()
    assert run(folder, out) == table and out.read_text() == lines  # resumed: nothing run again


def check_needles(tokenizer: Tokenizer, doc) -> None:
    """Each needle once in the document, its first token at `position`, the position at its depth
    within what a sentence boundary and the other needles shift it by."""
    sentences = BENCH["SENTENCE_END"].split(doc.text)
    longest = max(len(tokenizer.encode_plain(s)) for s in sentences)
    needles = [f.needles[0] for f in doc.facts]
    tolerance = (longest + sum(len(tokenizer.encode_plain(n)) for n in needles)) / doc.tokens
    for fact, position, needle in zip(doc.facts, doc.positions, needles):
        assert doc.text.count(needle) == 1
        first = position - len(doc.head)
        assert needle.startswith(tokenizer.decode(doc.ids[first:first + 3]).strip())
        assert abs(position / doc.tokens - fact.depth) <= tolerance


def test_locret_without_heads_names_the_flag(tmp_path):
    folder = make_folder("llama", tmp_path / "llama")
    args = BENCH["parse_args"](["--ckpt", str(folder), "--quick", "--out",
                                str(tmp_path / "x.jsonl")])
    with pytest.raises(LocretError, match="pass --heads"):
        BENCH["main"](args)
