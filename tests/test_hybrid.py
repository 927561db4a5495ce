"""Models with sliding-window layers in the chunked engine: the window layers keep only their
window (WindowPool) while the global layers evict under the budget. Checked against transformers'
Gemma 3 over prompts many windows long, chunked and decoded; memory, saved contexts and
rewinding."""
from dataclasses import replace

import pytest
import torch

from locret.context import Context, generate
from locret.engine import Engine, pool_bytes
from locret.errors import LocretError
from locret.heads import load_heads, save_heads
from locret.loading.weights import load_model
from locret.memory import estimate
from locret.settings import Settings, pool_capacity
from locret.train.labels import LabelRecorder
from locret.window_pool import WindowPool
from test_gemma3 import WINDOW, save_gemma3, tiny_gemma3_config

GLOBAL_LAYERS = [2, 5]  # of tiny_gemma3_config's six


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(our model with random retaining heads, transformers' model) on the same random weights,
    and their folder."""
    folder = tmp_path_factory.mktemp("gemma3")
    hf = save_gemma3(folder, tiny_gemma3_config())
    model = load_model(folder)
    model.add_retaining_heads(hidden=16)
    return model, hf, folder


def ids_of(n, seed=0):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("chunk", [3, 5, 8, 13])
@pytest.mark.parametrize("policy,positions", [("full", "compact"), ("h2o", "compact"),
                                              ("locret", "original")])
def test_chunked_prefill_over_many_windows_equals_one_forward(gemma, chunk, policy, positions):
    """60 tokens (7.5 windows) in chunks that straddle the window's edge, nothing evicted (budget
    above the prompt): every token's logits equal transformers' one forward."""
    model, hf, _ = gemma
    ids = ids_of(60)
    s = Settings(policy=policy, budget=64, chunk=chunk, stabilizers=4, n_loc=0,
                 positions=positions)
    engine = Engine(model, s, pool_capacity(s, len(ids), 0), len(ids))
    logits = torch.cat([engine.forward(ids[i:i + chunk], scoring=s.evicts, all_logits=True)
                        for i in range(0, len(ids), chunk)])
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=1e-5, rtol=0)
    assert engine.windows.length <= WINDOW - 1 + chunk and engine.windows.slides > 0
    assert engine.pool.length == len(ids)


@pytest.mark.parametrize("policy", ["full", "snapkv"])
def test_decoding_after_chunked_prefill_answers_as_transformers(gemma, policy):
    model, hf, _ = gemma
    prompt = ids_of(45, seed=1)
    s = Settings(policy=policy, budget=100, chunk=7, stabilizers=4, n_loc=5)
    out, stats = generate(model, prompt, s, max_new_tokens=12)
    expected = list(prompt)
    for _ in range(12):  # greedy, one full forward of transformers' per token
        expected.append(int(hf_logits(hf, expected)[-1].argmax()))
    assert out == expected[len(prompt):]
    assert stats.kept_after_prefill == len(prompt)


def test_memory_is_a_function_of_the_settings_not_the_prompt(gemma):
    """Under eviction the pools are the same for 100 and 400 tokens: the global layers' budget plus
    each sliding-window layer's window and room; the estimate counts exactly what is allocated."""
    model = gemma[0]
    s = Settings(policy="locret", budget=24, chunk=8, stabilizers=4, n_loc=4)
    sizes = []
    for n in (100, 400):
        context = Context(model, s, pool_capacity(s, n, 6), n)
        context.feed(ids_of(n - 4))
        out, stats = context.ask(ids_of(4, seed=2), 6)
        assert context.pool.k.shape[0] == len(GLOBAL_LAYERS)
        assert context.engine.windows.k.shape[:4] == (4, 1, 1, WINDOW - 1 + 10)  # room: 4 + 6
        assert stats.pool_bytes == context.engine.nbytes
        sizes.append(stats.pool_bytes)
    assert sizes[0] == sizes[1]
    capacity = pool_capacity(s, 400, 6)
    assert pool_bytes(s, model.config, capacity, torch.float32) == sizes[0]
    assert estimate(model, s, capacity).pool == sizes[0]


def test_window_pool_slides_keep_the_last_window_in_order():
    cos_sin = (torch.ones(4 + 3, 2), torch.zeros(4 + 3, 2))  # no rotation: keys read back as is
    pool = WindowPool(layers=[0, 1], kv_heads=1, head_dim=2, window=5, room=3, slot_rope=cos_sin,
                      dtype=torch.float32)
    written = []
    for step, n in enumerate([3, 2, 3, 1, 3, 2]):
        new = torch.arange(len(written), len(written) + n, dtype=torch.float32)
        written += new.tolist()
        pool.make_room(n)
        kv = new.view(1, 1, n, 1).expand(1, 1, n, 2)
        keys, values = pool.write(1, kv, kv)
        positions, mask = pool.view(n)
        pool.advance(n)
        # the keys held end with these n, in prompt order, and each query sees the last 5 tokens
        held = keys[0, 0, :, 0].tolist()
        assert held == written[-len(held):] and values[0, 0, :, 0].tolist() == held
        assert mask.sum(-1).tolist() == [min(5, len(written) - n + i + 1) for i in range(n)]
        assert positions.tolist() == list(range(len(held) - n, len(held)))
    assert pool.slides > 0 and pool.length <= 4 + 3
    with pytest.raises(LocretError, match="4 tokens in one forward do not fit"):
        pool.make_room(4)


def test_retaining_heads_live_on_the_global_layers_only(gemma, tmp_path):
    model, _, folder = gemma
    with_heads = lambda m: [i for i, layer in enumerate(m.model.layers)
                            if layer.self_attn.retaining_head is not None]
    assert with_heads(model) == GLOBAL_LAYERS and len(model.retaining_heads) == 2
    save_heads(model, tmp_path / "h.safetensors", "tiny-gemma")
    fresh = load_model(folder)
    load_heads(fresh, tmp_path / "h.safetensors")
    assert with_heads(fresh) == GLOBAL_LAYERS
    for ours, theirs in zip(model.retaining_heads, fresh.retaining_heads):
        assert torch.equal(ours.fc1.weight, theirs.fc1.weight)
    recorder = LabelRecorder(model.config, prompt_len=20)
    with torch.no_grad():
        model(torch.tensor([ids_of(26)]), cache=recorder)
    assert sorted(recorder.labels) == GLOBAL_LAYERS
    predictions, labels = recorder.stacked()
    assert predictions.shape == labels.shape == (2, 1, 1, 20)


SETTINGS = Settings(policy="locret", budget=20, chunk=6, stabilizers=4, n_loc=0)


def compressed(model, n=90, settings=SETTINGS, room=30):
    context = Context(model, settings, pool_capacity(settings, n, room), 256)
    context.feed(ids_of(n))
    return context


def test_questions_from_one_context_find_the_windows_as_they_were(gemma):
    model = gemma[0]
    context = compressed(model)
    q1, q2 = ids_of(7, seed=2), ids_of(11, seed=3)
    first, _ = context.ask(q1, 9)
    second, _ = context.ask(q2, 9)
    assert context.ask(q1, 9)[0] == first
    assert compressed(model).ask(q2, 9)[0] == second
    torch.testing.assert_close(context.teacher_forced(q2, second),
                               compressed(model).teacher_forced(q2, second), atol=0, rtol=0)


@pytest.mark.parametrize("policy", ["locret", "full"])
def test_saved_context_answers_with_the_same_tokens(gemma, tmp_path, policy):
    model = gemma[0]
    s = replace(SETTINGS, policy=policy)
    context, question = compressed(model, settings=s), ids_of(7, seed=4)
    context.save(tmp_path / "c.safetensors", form="completion")
    loaded, _ = Context.load(tmp_path / "c.safetensors", model, room=30)
    assert loaded.engine.windows.length == WINDOW - 1
    assert loaded.ask(question, 12)[0] == context.ask(question, 12)[0]


def test_full_attention_answering_past_the_windows_room_answers_once(gemma):
    """Full attention's sliding-window layers hold their window and one chunk: a question and
    answer longer than that slide them, and the context answers that one question only."""
    model = gemma[0]
    s = replace(SETTINGS, policy="full")
    context = compressed(model, settings=s, room=40)
    out, _ = context.ask(ids_of(5, seed=5), max_new_tokens=20)
    assert len(out) == 20 and context.spent
    with pytest.raises(LocretError, match="moved on while answering"):
        context.ask(ids_of(5, seed=5), max_new_tokens=2)


def test_a_context_file_with_a_wrong_window_is_refused(gemma, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    model = gemma[0]
    path = tmp_path / "c.safetensors"
    compressed(model).save(path, form="completion")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["window_k"] = torch.cat([tensors["window_k"]] * 2, dim=3)  # more than a window
    save_file(tensors, path, metadata=meta)
    with pytest.raises(LocretError, match="pool tensors do not fit this model"):
        Context.load(path, model, room=30)


def test_shared_layers_are_numbered_among_the_global_layers(gemma):
    model = gemma[0]
    s = Settings(policy="locret", budget=24, chunk=10, stabilizers=8, n_loc=6, eviction="shared",
                 shared_layers="1-1")
    assert Engine(model, s, 64, 200).ranking_layers == slice(1, 2)  # model layer 5
    beyond = "--shared-layers 5-5: layers are numbered among the model's 2 global layers, 0-1"
    with pytest.raises(LocretError, match=beyond):
        Engine(model, replace(s, shared_layers="5-5"), 64, 200)


def test_max_memory_counts_the_sliding_window_layers_too(gemma, tmp_path, run_generate,
                                                         monkeypatch):
    """generate.py --max-memory on a hybrid model picks the largest budget whose estimate fits: a
    limit set to the estimate at budget 40 gives budget 40 (that the estimate holds the windows'
    bytes exactly is checked above)."""
    from conftest import write_tiny_tokenizer
    from locret import plan
    model, _, folder = gemma
    write_tiny_tokenizer(folder)
    prompt = tmp_path / "p.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog " * 12)
    held = 100 * 2**20
    monkeypatch.setattr(plan, "peak_memory_bytes", lambda device: held)
    flags = dict(policy="snapkv", chunk=8, stabilizers=4, n_loc=5)
    argv = ["--ckpt", str(folder), "--prompt", str(prompt), "--max-new-tokens", "4", "--no-chat",
            "--dtype", "float32", *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items())]
    first = run_generate(*argv, "--budget", "30")
    assert first.returncode == 0, first.stderr
    tokens = int(first.stderr.split("prompt tokens ")[1].split()[0])
    assert tokens > 3 * WINDOW
    s = Settings(budget=40, **flags)
    limit = estimate(model, s, pool_capacity(s, tokens, 4), held).total
    done = run_generate(*argv, "--max-memory", f"{limit / 2**30:.12f}")
    assert done.returncode == 0, done.stderr
    assert "policy snapkv (budget 40)" in done.stderr
