"""Streamed input and compressed contexts: incremental tokenization equals whole-text tokenization,
a streamed context answers as generate() does, many questions from one context, save/load round
trips and refused mismatches, memory that does not grow with the stream."""
import json
import random

from dataclasses import replace

import pytest
import torch

from conftest import CHATML, tiny_llama_config, write_byte_level_tokenizer, write_tiny_tokenizer
from locret.loading import text_stream
from locret.context import Context, generate
from locret.engine import Engine
from locret.settings import Settings, pool_capacity
from locret.errors import LocretError
from locret.heads import save_heads
from locret.loading.weights import load_model
from locret.loading.text_stream import StreamEncoder, read_blocks
from locret.loading.tokenizer import Tokenizer

TRICKY = ("Ünïcödé ünd émojis 😀😀👩‍👩‍👧 mixed with digits "
          "1234567890 and 3.14159, spaces   at  odd\tplaces,\n\n"
          "new  lines\r\n, CJK 漢字かな交じり文, 'quotes' \"double\" don't it's, "
          "and <|im_end|> special text. ")


def byte_level_tokenizer(folder):
    write_byte_level_tokenizer(folder, [TRICKY * 3, "the quick brown fox " * 30])
    return Tokenizer(folder)


def sentencepiece_tokenizer(folder):
    import sentencepiece
    (folder / "corpus.txt").write_text((TRICKY + "\n") * 20)
    sentencepiece.SentencePieceTrainer.train(input=str(folder / "corpus.txt"),
                                             model_prefix=str(folder / "tokenizer"),
                                             vocab_size=500, model_type="bpe", byte_fallback=True,
                                             remove_extra_whitespaces=False,
                                             normalization_rule_name="identity", minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML,
                                                              "add_bos_token": True}))
    return Tokenizer(folder)


def metaspace_tokenizer(folder):
    write_tiny_tokenizer(folder)
    return Tokenizer(folder)


TOKENIZERS = {"byte-level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer,
              "metaspace": metaspace_tokenizer}


def random_pieces(text, seed, sizes=(1, 1, 2, 3, 5, 8, 40)):
    rng, i = random.Random(seed), 0
    while i < len(text):
        n = rng.choice(sizes)
        yield text[i:i + n]
        i += n


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("margin", [16, 64, 512])
def test_stream_tokenization_equals_whole_text(tmp_path, kind, margin):
    """Pieces of 1-40 characters, so boundaries fall inside multi-byte characters' neighbourhoods,
    digit runs and whitespace runs; a small margin forces hundreds of decisions."""
    tok = TOKENIZERS[kind](tmp_path)
    rng = random.Random(margin)
    text = " ".join(rng.choice(TRICKY.split(" ")) for _ in range(600))
    encoder, ids = StreamEncoder(tok, margin), []
    for piece in random_pieces(text, seed=margin):
        ids += encoder.push(piece)
    decided_before_end = len(ids)
    ids += encoder.finish()
    assert ids == tok.encode_plain(text)
    assert decided_before_end > len(ids) // 2  # most ids came out while the text streamed


def test_stream_encoder_holds_only_a_window(tmp_path):
    tok = metaspace_tokenizer(tmp_path)
    encoder, longest = StreamEncoder(tok, margin=32), 0
    for piece in random_pieces("the quick brown fox jumps 0123 " * 2000, seed=1):
        encoder.push(piece)
        longest = max(longest, len(encoder.window))
    assert longest < 8 * 32  # never the whole text: 60,000 characters went through


def test_read_blocks_joins_characters_split_across_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(text_stream, "BLOCK", 3)
    path = tmp_path / "doc.txt"
    path.write_text(TRICKY, encoding="utf-8")
    assert "".join(read_blocks(str(path))) == TRICKY
    path.write_bytes(TRICKY.encode() + b"\xff tail")
    with pytest.raises(LocretError, match=rf"is not UTF-8 text \(byte {len(TRICKY.encode())}\)"):
        "".join(read_blocks(str(path)))
    with pytest.raises(LocretError, match="cannot read prompt"):
        list(read_blocks(str(tmp_path / "missing.txt")))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import transformers
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ctx-model")
    config = tiny_llama_config(max_position_embeddings=1024)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    m = load_model(folder)
    m.add_retaining_heads(hidden=16)
    return m


def ids_of(n, seed=0):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SETTINGS = Settings(policy="locret", budget=48, chunk=16, stabilizers=8, n_loc=0)


def streamed_context(model, document, question_room, settings=SETTINGS, seed=0):
    context = Context(model, settings, pool_capacity(settings, 10**9, question_room), 1024)
    for piece in random_pieces(document, seed, sizes=(1, 7, 16, 17, 40)):
        context.feed(piece)
    return context


@pytest.mark.parametrize("policy", ["locret", "snapkv", "knorm"])
def test_streamed_context_answers_as_generate(model, policy):
    """Ids fed in pieces of 1-40 tokens run the same chunks and evictions as generate() over the
    whole prompt."""
    s = Settings(policy=policy, budget=48, chunk=16, stabilizers=8)
    document, question = ids_of(300), ids_of(9, seed=1)
    context = streamed_context(model, document, len(question) + 10, s)
    assert len(context.pending) <= s.chunk
    out, stats = context.ask(question, max_new_tokens=10)
    whole = document + question
    # rope_length only matters for longrope: 1024 (the stream's) and len(whole) give the same
    # llama model
    expected, _ = generate(model, whole, replace(s, n_loc=len(question)), max_new_tokens=10)
    assert out == expected and stats.prompt_tokens == len(whole)
    assert stats.kept_after_prefill == s.budget + len(question)


@pytest.mark.parametrize("answer_length", [1, 5])
def test_teacher_forced_logits_predict_each_answer_token(model, answer_length):
    """Row i predicts answer token i: the first from the question's last logits, the rest from the
    answer itself, as one plain forward over everything does (one-token answers included); the
    context is as before after."""
    document, question, answer = ids_of(40), ids_of(5, seed=1), ids_of(answer_length, seed=2)
    # under the budget: nothing evicted
    context = streamed_context(model, document, len(question) + answer_length)
    logits = context.teacher_forced(question, answer)
    whole = torch.tensor([document + question + answer[:-1]])
    expected = model(whole, torch.arange(whole.shape[1]))[0, -answer_length:]
    assert logits.shape == (answer_length, model.config.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert context.pool.length == len(document)


def test_many_questions_from_one_context(model):
    document = ids_of(200)
    q1, q2 = ids_of(6, seed=2), ids_of(11, seed=3)
    context = streamed_context(model, document, 30)
    first, _ = context.ask(q1, 8)
    other, _ = context.ask(q2, 8)
    again, _ = context.ask(q1, 8)
    assert first == again and context.pool.length == SETTINGS.budget  # each answer was forgotten
    fresh = streamed_context(model, document, 30)
    assert fresh.ask(q2, 8)[0] == other
    with pytest.raises(LocretError, match="the context is closed"):
        context.feed([5])


def save_and_load(model, context, path, **kw):
    context.save(path, form="completion")
    return Context.load(path, model, room=30, **kw)


def test_saved_context_answers_with_the_same_tokens(model, tmp_path):
    context = streamed_context(model, ids_of(250), 30)
    question = ids_of(7, seed=4)
    loaded, meta = save_and_load(model, context, tmp_path / "c.safetensors")
    assert meta["form"] == "completion" and loaded.tokens == 250
    expected, _ = context.ask(question, 12)
    out, stats = loaded.ask(question, 12)
    assert out == expected and stats.prompt_tokens == 257 and stats.chunks == 1
    assert torch.equal(loaded.pool.k[..., :SETTINGS.budget, :],
                       context.pool.k[..., :SETTINGS.budget, :])


def test_context_saved_with_keys_before_rope_is_settled_on_load(model, tmp_path, monkeypatch):
    """A file whose keys are still before RoPE (saved before keys were settled at the close,
    2026-12-04) is turned to its slots on load and answers as a context that was never saved."""
    with monkeypatch.context() as unsettled:
        unsettled.setattr(Engine, "settle_keys", lambda self, turn=True: None)
        streamed_context(model, ids_of(250), 30).save(tmp_path / "raw.safetensors",
                                                      form="completion")
    loaded, meta = Context.load(tmp_path / "raw.safetensors", model, room=30)
    fresh, question = streamed_context(model, ids_of(250), 30), ids_of(7, seed=4)
    assert meta["keys"] == "before-rope" and not loaded.engine.raw_keys
    assert loaded.ask(question, 12)[0] == fresh.ask(question, 12)[0]
    torch.testing.assert_close(loaded.pool.k[..., :SETTINGS.budget, :],
                               fresh.pool.k[..., :SETTINGS.budget, :])


def test_saved_context_from_other_model_heads_dtype_or_positions_is_refused(model, tmp_path,
                                                                            save_hf):
    path = tmp_path / "c.safetensors"
    streamed_context(model, ids_of(100), 30).save(path, form="chat")
    _, other_folder = save_hf(tiny_llama_config(max_position_embeddings=1024), seed=1)
    other = load_model(other_folder)
    with pytest.raises(LocretError, match="made with another model"):
        Context.load(path, other, 30)
    with pytest.raises(LocretError, match="saved in float32, the model is loaded in bfloat16: "
                                          "pass --dtype float32"):
        Context.load(path, load_model(other_folder, dtype=torch.bfloat16), 30)
    same_backbone = load_model(save_hf(tiny_llama_config(max_position_embeddings=1024), seed=0,
                                       name="same")[1])
    torch.manual_seed(123)
    same_backbone.add_retaining_heads(hidden=16)  # other random heads
    with pytest.raises(LocretError, match="compressed by other retaining heads"):
        Context.load(path, same_backbone, 30)
    with pytest.raises(LocretError, match="holds --positions compact entries, not original"):
        Context.load(path, model, 30, positions="original")


def test_int8_context_at_original_positions_round_trips(model, tmp_path):
    """Keys turned at their original positions as they are written: the file says so, and loads."""
    context = streamed_context(model, ids_of(250), 30,
                               replace(SETTINGS, kv_int8=True, positions="original"))
    loaded, meta = save_and_load(model, context, tmp_path / "c.safetensors")
    question = ids_of(7, seed=4)
    assert meta["keys"] == "rotated" and loaded.ask(question, 12)[0] == context.ask(question, 12)[0]


def test_int8_context_round_trips_and_a_tampered_one_is_refused(model, tmp_path):
    s = replace(SETTINGS, kv_int8=True)
    context = streamed_context(model, ids_of(250), 30, s)
    question = ids_of(7, seed=4)
    path = tmp_path / "c.safetensors"
    loaded, _ = save_and_load(model, context, path)
    for name, t in context.pool.stored().items():
        assert torch.equal(loaded.pool.stored()[name][:, :, :, :s.budget],
                           t[:, :, :, :s.budget]), name
    assert loaded.pool.k.dtype == torch.int8 and loaded.settings.kv_int8
    assert loaded.ask(question, 12)[0] == context.ask(question, 12)[0]
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    save_file({**tensors, "k": tensors["k"].float()}, tmp_path / "float.safetensors", metadata=meta)
    with pytest.raises(LocretError, match="K and V are stored as float32, expected int8"):
        Context.load(tmp_path / "float.safetensors", model, 30)
    # an int8 pool keeps its keys raw: a file claiming otherwise is refused
    assert meta["keys"] == "before-rope"
    save_file(tensors, tmp_path / "turned.safetensors", metadata=meta | {"keys": "rotated"})
    with pytest.raises(LocretError, match="damaged context file"):
        Context.load(tmp_path / "turned.safetensors", model, 30)
    save_file(tensors, tmp_path / "odd.safetensors", metadata=meta | {"keys": "sideways"})
    with pytest.raises(LocretError, match="metadata keys missing or wrong"):
        Context.load(tmp_path / "odd.safetensors", model, 30)
    del tensors["v_scale"]
    save_file(tensors, tmp_path / "unscaled.safetensors", metadata=meta)
    with pytest.raises(LocretError, match="unreadable context file"):
        Context.load(tmp_path / "unscaled.safetensors", model, 30)


@pytest.mark.parametrize("content, message", [
    (b"not safetensors", "unreadable context file"),
    (None, "not found"),
])
def test_broken_context_file_is_one_error(model, tmp_path, content, message):
    path = tmp_path / "c.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LocretError, match=message):
        Context.load(path, model, 30)


def test_heads_file_is_not_a_context_file(model, tmp_path):
    path = tmp_path / "h.safetensors"
    save_heads(model, path, "tiny")
    with pytest.raises(LocretError, match="not a locret context file"):
        Context.load(path, model, 30)


def test_original_positions_past_the_window_stop_the_stream(model):
    s = Settings(policy="knorm", budget=48, chunk=16, stabilizers=8, positions="original")
    context = Context(model, s, pool_capacity(s, 10**9, 4), 1024)
    with pytest.raises(LocretError,
                       match="past the model's 1024-token context .* use a policy that evicts"):
        context.feed(ids_of(1100))


def test_compact_positions_past_the_window_ask_for_a_smaller_pool(model):
    """A pool larger than the window reaches past it even in compact mode: the advice is the
    pool's size."""
    s = Settings(policy="knorm", budget=1000, chunk=100, stabilizers=8)
    context = Context(model, s, pool_capacity(s, 10**9, 4), 1024)
    with pytest.raises(LocretError, match="past the model's 1024-token context .* "
                                          "use a smaller --budget or --chunk"):
        context.feed(ids_of(1200))


CLI = ["--dtype", "float32", "--max-new-tokens", "8"]


def test_cli_streams_stdin_saves_and_answers_from_the_saved_context(tiny_chat_model, tmp_path,
                                                                    run_generate):
    document = "the quick brown fox jumps over the lazy dog 0123 " * 40
    (tmp_path / "doc.txt").write_text(document)
    cache = ["--policy", "knorm", "--budget", "64", "--stabilizers", "8", "--chunk", "32"]
    question = ["--ckpt", str(tiny_chat_model), *CLI,
                "--question", "what is the capital of france ?"]
    piped = run_generate("--prompt", "-", *question, *cache, stdin=document)
    saved = run_generate("--prompt", str(tmp_path / "doc.txt"), *question, *cache,
                         "--save-context", str(tmp_path / "c.safetensors"))
    loaded = run_generate("--load-context", str(tmp_path / "c.safetensors"), *question)
    assert piped.returncode == saved.returncode == loaded.returncode == 0, (
        piped.stderr + saved.stderr + loaded.stderr)
    assert piped.stdout == saved.stdout == loaded.stdout and piped.stdout.strip()
    assert "loaded context of" in loaded.stderr and "compression" in piped.stderr

    tok = Tokenizer(tiny_chat_model)
    head, tail = tok.chat_frame()
    whole = (tok.encode(head, add_special_tokens=False) + tok.encode_plain(document)
             + tok.encode_plain("\n\nwhat is the capital of france ?")
             + tok.encode(tail, add_special_tokens=False))
    assert f"prompt tokens {len(whole)} " in piped.stderr


@pytest.mark.parametrize("flags, message", [
    (["--load-context", "x.safetensors", "--question", "q", "--budget", "8"], "drop --budget"),
    (["--load-context", "x.safetensors"], "needs --question"),
    (["--load-context", "x.safetensors", "--question", "q", "--span", "3", "--kv-int8"],
     "drop --span, --kv-int8"),
    (["--question", "q"], "give --prompt FILE"),
    (["--prompt", "p.txt", "--question", "q", "--n-loc", "4"],
     "--n-loc does not apply to a streamed document"),
    (["--prompt", "p.txt", "--question", "q", "--question-file", "f"], "not both"),
])
def test_cli_context_flags_that_do_not_go_together(run_generate, tmp_path, flags, message):
    run = run_generate("--ckpt", str(tmp_path / "none"), *CLI, *flags)  # before reading any model
    assert run.returncode == 2 and message in run.stderr.splitlines()[-1]


def test_cli_loaded_context_in_the_other_form_is_refused(tiny_chat_model, tmp_path, run_generate):
    (tmp_path / "doc.txt").write_text("the lazy dog " * 50)
    common = ["--ckpt", str(tiny_chat_model), *CLI]
    assert run_generate(*common, "--prompt", str(tmp_path / "doc.txt"), "--policy", "knorm",
                        "--budget", "32", "--stabilizers", "4", "--chunk", "32",
                        "--save-context", str(tmp_path / "c.safetensors")).returncode == 0
    run = run_generate(*common, "--load-context", str(tmp_path / "c.safetensors"),
                       "--question", "q", "--no-chat")
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert "holds a chat-form context: drop --no-chat" in run.stderr


def test_feeding_outside_inference_mode_builds_no_graph(model):
    """The heads' parameters require grad: a forward outside inference mode would chain every
    chunk's scores into one autograd graph that grows with the stream (it did: 6 GB at 60K
    tokens)."""
    assert any(p.requires_grad for h in model.retaining_heads for p in h.parameters())
    context = Context(model, SETTINGS, pool_capacity(SETTINGS, 10**9, 8), 1024)
    context.feed(ids_of(200))
    assert not context.pool.scores.requires_grad and not context.pool.k.requires_grad
    assert not context.last_logits.requires_grad


def test_a_context_that_evicted_while_decoding_answers_once(model):
    s = Settings(policy="h2o", budget=30, chunk=16, stabilizers=5, n_loc=0,
                 evict_during_decode=True)
    context = Context(model, s, pool_capacity(s, 10**9, 50), 1024)
    context.feed(ids_of(100))
    out, _ = context.ask(ids_of(4, seed=1), max_new_tokens=50)
    assert len(out) == 50 and context.spent
    with pytest.raises(LocretError, match="moved on while answering .evictions while decoding"):
        context.ask(ids_of(4, seed=1), max_new_tokens=5)
    with pytest.raises(LocretError, match="evicted while decoding"):
        context.save("never-written.safetensors")


def test_saving_where_no_file_can_be_written_is_one_clear_error(model, tmp_path):
    context = streamed_context(model, ids_of(100), 30)
    with pytest.raises(LocretError, match="cannot write context .*no/such"):
        context.save(tmp_path / "no" / "such" / "c.safetensors", form="completion")
    with pytest.raises(LocretError, match="cannot write context"):
        context.save(tmp_path, form="completion")  # a folder
    # no temporary file left
    assert list(tmp_path.iterdir()) == [] and not list(tmp_path.parent.glob(".*.tmp-*"))
