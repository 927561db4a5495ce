"""The chunked engine: exact full attention when nothing is evicted, correct keys after eviction in
both position modes, a pool that never moves, and clear errors for impossible settings."""
from dataclasses import replace

import pytest
import torch

from conftest import longrope, naive_greedy, tiny_llama_config, tiny_phi3_config
from locret.context import Context, generate
from locret.engine import Engine
from locret.settings import POSITIONS, Settings, check_settings, pool_capacity
from locret.errors import LocretError
from locret.heads import load_heads, save_heads
from locret.loading.weights import load_model
from locret.memory import estimate, largest_budget
from locret.policies import EVICTING, Precomputed
from models.rope import apply_rope

CONFIGS = {"llama": tiny_llama_config, "phi3": tiny_phi3_config,
           "phi3-longrope": lambda: tiny_phi3_config(**longrope(original_max=200))}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    import transformers
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).save_pretrained(folder)
    m = load_model(folder)
    m.add_retaining_heads(hidden=16)  # random heads: enough for the engine's plumbing
    return m


def prompt_of(n, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def record_pre_rope_keys(model, monkeypatch):
    """Capture every layer's keys before RoPE, per prompt token, as the engine runs."""
    keys = {}
    for layer in model.model.layers:
        attn, project = layer.self_attn, layer.self_attn.project

        def recording(x, attn=attn, project=project):
            q, k, v = project(x)
            keys.setdefault(attn.layer_idx, []).append(k.view(*k.shape[:2], attn.n_kv_heads, -1))
            return q, k, v
        monkeypatch.setattr(attn, "project", recording)
    return lambda layer: torch.cat(keys[layer], dim=1)[0]  # [tokens, KVH, D]


def keys_attended(engine, token, record=lambda k: k[0, :, :-1].clone()):
    """Every layer's keys as attention sees them when `token` is decoded next: by default
    [KVH, n, D], without the new token's own key; `record` keeps something else of each layer's
    keys."""
    seen, update = {}, engine.cache.update

    def recording(layer, *args):
        k, v = update(layer, *args)
        seen[layer] = record(k)
        return k, v
    engine.cache.update = recording
    engine.forward([token], scoring=False)
    return seen


def check_keys_turned_to_their_positions(model, monkeypatch, settings, prompt, atol):
    """After prefill, each cached key attention sees equals its token's key before RoPE, rotated
    from scratch at its position: its slot (compact, re-indexed 0..n-1) or its prompt index
    (original)."""
    pre_rope = record_pre_rope_keys(model, monkeypatch)
    with torch.inference_mode():
        context = Context(model, settings, pool_capacity(settings, len(prompt), 1), len(prompt))
        context.prefill(prompt)
        engine = context.engine
        n = engine.pool.length
        attended = keys_attended(engine, 5)
    assert n == settings.budget + settings.n_loc
    for layer in range(model.config.num_hidden_layers):
        tokens = engine.pool.index[layer, 0, :, :n]  # [KVH, n] prompt index of each kept entry
        where = torch.arange(n).expand_as(tokens) if settings.positions == "compact" else tokens
        keys = pre_rope(layer)[tokens, torch.arange(tokens.shape[0])[:, None]]  # [KVH, n, D]
        cos, sin = (t.to(keys.dtype) for t in model.model.rotary_emb(where.flatten(), len(prompt)))
        expected = apply_rope(keys, cos.view(*where.shape, -1), sin.view(*where.shape, -1))
        torch.testing.assert_close(attended[layer], expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("positions, int8", [("compact", False), ("compact", True),
                                             ("original", False)])
def test_compact_mode_turns_keys_in_the_pools_buffer_until_the_document_closes(model, positions,
                                                                              int8):
    """While the document is fed, compact mode's keys are turned to their slots at each forward
    into the pool's one-layer buffer (no cache-sized temporaries); once it is closed they are
    settled (turned for good) in each layer's own K, except in an int8 pool. With original
    positions keys are stored rotated, no such buffer."""
    s = Settings(policy="knorm", budget=20, chunk=16, stabilizers=6, n_loc=4, positions=positions,
                 kv_int8=int8)
    ptr = lambda k: k.data_ptr()
    with torch.inference_mode():
        context = Context(model, s, pool_capacity(s, 61, 2), 61)
        context.feed(prompt_of(60, seed=2))  # every chunk but the last
        while_open = set(keys_attended(context.engine, 5, record=ptr).values())
        context.close()
        once_closed = set(keys_attended(context.engine, 5, record=ptr).values())
    turned, layers = context.pool.turned, model.config.num_hidden_layers
    if positions == "original":
        # each layer's own K
        assert turned is None and len(while_open) == len(once_closed) == layers
    else:
        assert while_open == {turned.data_ptr()} and context.engine.raw_keys == int8
        assert once_closed == ({turned.data_ptr()} if int8
                               else {context.pool.k[i].data_ptr() for i in range(layers)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_settled_keys_answer_as_keys_turned_at_each_use(save_hf, monkeypatch, dtype):
    """Turning the kept keys for good at the close changes no logit by a single bit, over a
    question, twenty decoded tokens, a second question from the same context and teacher
    forcing."""
    _, folder = save_hf(tiny_llama_config())
    model = load_model(folder, dtype=dtype)
    s = Settings(policy="knorm", budget=24, chunk=16, stabilizers=6, n_loc=5)
    document, q1, q2 = prompt_of(120, seed=5), prompt_of(5, seed=6), prompt_of(9, seed=7)

    def answers():
        with torch.inference_mode():
            context = Context(model, s, pool_capacity(s, 125, 30), 125)
            context.feed(document)
            return ([context.ask(q, 20)[0] for q in (q1, q2)]
                    + [context.teacher_forced(q1, q2)], context)
    settled, settled_context = answers()
    monkeypatch.setattr(Engine, "settle_keys", lambda self, turn=True: None)
    raw, raw_context = answers()
    assert not settled_context.engine.raw_keys and raw_context.engine.raw_keys
    assert settled[:2] == raw[:2] and torch.equal(settled[2], raw[2])


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_kept_keys_are_rotated_to_their_positions(model, monkeypatch, positions):
    s = Settings(policy="knorm", budget=20, chunk=16, stabilizers=6, n_loc=4, positions=positions)
    check_keys_turned_to_their_positions(model, monkeypatch, s, prompt_of(90, seed=1), atol=1e-5)


def test_bf16_keys_do_not_drift_over_200_evictions(monkeypatch, save_hf):
    """Keys are turned from their pre-RoPE values at each use, so after 200 evictions in bfloat16
    each one still equals its freshly rotated key to within one bf16 rounding."""
    _, folder = save_hf(tiny_llama_config(max_position_embeddings=2048))
    model = load_model(folder, dtype=torch.bfloat16)
    s = Settings(policy="random", budget=24, chunk=4, stabilizers=4, n_loc=4)
    prompt = prompt_of(s.budget + 200 * s.chunk + s.n_loc, seed=7)
    check_keys_turned_to_their_positions(model, monkeypatch, s, prompt, atol=2 ** -8)


def test_eviction_keeps_budget_and_stabilizers(model):
    prompt = prompt_of(100, seed=2)
    s = Settings(policy="random", budget=24, chunk=10, stabilizers=8, n_loc=6)
    with torch.inference_mode():
        context = Context(model, s, pool_capacity(s, len(prompt), 1), len(prompt))
        context.prefill(prompt)
        engine = context.engine
    index = engine.pool.index[:, :, :, :engine.pool.length]
    body = len(prompt) - s.n_loc
    assert engine.pool.length == s.budget + s.n_loc
    assert (index[..., -s.n_loc:] == torch.arange(body, len(prompt))).all()  # the tail, unevicted
    last_stabilizers = torch.arange(body - s.stabilizers, body)  # protected in the final eviction
    assert (index[..., s.budget - s.stabilizers:s.budget] == last_stabilizers).all()
    assert (index.diff(dim=-1) > 0).all()  # original order
    assert len({tuple(index[layer, 0, h].tolist()) for layer in range(2) for h in range(2)}) > 1


@pytest.mark.parametrize("policy", ["locret", "h2o"])
def test_shared_eviction_keeps_one_set_in_every_layer_and_head(model, policy):
    prompt = prompt_of(100, seed=4)
    s = Settings(policy=policy, budget=24, chunk=10, stabilizers=8, n_loc=6, eviction="shared")
    with torch.inference_mode():
        context = Context(model, s, pool_capacity(s, len(prompt), 1), len(prompt))
        context.prefill(prompt)
    pool = context.engine.pool
    index = pool.index[:, :, :, :pool.length]
    assert pool.length == s.budget + s.n_loc and (index == index[0, 0, 0]).all()
    body = len(prompt) - s.n_loc
    assert (index[0, 0, 0, s.budget - s.stabilizers:].tolist()
            == list(range(body - s.stabilizers, len(prompt))))
    # and older tokens before them
    assert index[0, 0, 0, :s.budget - s.stabilizers].max() < body - s.stabilizers
    # with a budget covering the prompt, nothing is evicted: exactly full attention
    roomy = replace(s, budget=128)
    with torch.inference_mode():
        roomy_context = Context(model, roomy, pool_capacity(roomy, len(prompt), 1), len(prompt))
        logits = roomy_context.prefill(prompt)
        torch.testing.assert_close(logits, model(torch.tensor([prompt]))[0, -1], atol=1e-5, rtol=0)


def kept_by_age(model, s):
    """Prefill 100 tokens scored by age (layer 0 keeps the oldest, layer 1 the newest): the prompt
    index of each kept entry, [L, KVH, budget], and the prompt's length before its n_loc tail."""
    prompt = prompt_of(100, seed=5)
    position = torch.arange(len(prompt)).float()
    scores = torch.stack([-position, position])[:, None, None].expand(2, 1, 2, -1)  # [L, B, KVH, P]
    with torch.inference_mode():
        context = Context(model, s, pool_capacity(s, len(prompt), 1), len(prompt))
        context.engine.cache.policy = Precomputed(scores)
        context.prefill(prompt)
    return context.pool.index[:, 0, :, :s.budget], len(prompt) - s.n_loc


def test_precomputed_scores_are_looked_up_by_layer_and_position(model):
    s = Settings(policy="locret", budget=24, chunk=10, stabilizers=8, n_loc=6)
    index, body = kept_by_age(model, s)
    stabilizers = list(range(body - s.stabilizers, body))
    # the oldest
    assert (index[0] == torch.tensor(list(range(s.budget - s.stabilizers)) + stabilizers)).all()
    assert (index[1] == torch.arange(body - s.budget, body)).all()  # the most recent


@pytest.mark.parametrize("layers, keeps", [("0-0", "oldest"), ("1-1", "newest"), ("0-1", "either")])
def test_shared_eviction_ranks_by_the_shared_layers_only(model, layers, keeps):
    s = Settings(policy="locret", budget=24, chunk=10, stabilizers=8, n_loc=6, eviction="shared",
                 shared_layers=layers)
    index, body = kept_by_age(model, s)
    assert (index == index[0, 0]).all()  # one set everywhere
    oldest = list(range(s.budget - s.stabilizers)) + list(range(body - s.stabilizers, body))
    if keeps != "either":
        assert index[0, 0].tolist() == (oldest if keeps == "oldest"
                                        else list(range(body - s.budget, body)))
    else:  # opposite ranks tie: neither rule alone decides
        assert index[0, 0].tolist() not in (oldest, list(range(body - s.budget, body)))


def test_shared_layers_beyond_the_model_are_refused(model):
    s = Settings(policy="h2o", budget=24, chunk=10, stabilizers=8, n_loc=6, eviction="shared",
                 shared_layers="1-2")
    beyond = "--shared-layers 1-2: layers are numbered among the model's 2 global layers, 0-1"
    with pytest.raises(LocretError, match=beyond):
        Engine(model, s, 64, 100)


def test_pool_never_moves_and_has_the_same_size_for_1k_and_16k_prompts(model):
    s = Settings(policy="locret", budget=64, chunk=128, stabilizers=16, n_loc=20)
    sizes = []
    for n in (1024, 16384):
        prompt = prompt_of(n, seed=3)
        with torch.inference_mode():
            context = Context(model, s, pool_capacity(s, n, 8), n)
            engine = context.engine
            pool = engine.pool
            buffers = (pool.k, pool.v, pool.scores, pool.index, pool.scratch, pool.turned)
            before = [(b.data_ptr(), b.shape) for b in buffers]
            logits = context.prefill(prompt)
            for _ in range(8):
                logits = engine.decode_step(int(logits.argmax()))
        assert [(b.data_ptr(), b.shape) for b in buffers] == before
        sizes.append(engine.pool.nbytes)
    assert sizes[0] == sizes[1]


def test_evict_during_decode_stays_within_capacity(model):
    prompt = prompt_of(120, seed=4)
    s = Settings(policy="h2o", budget=30, chunk=16, stabilizers=5, n_loc=4,
                 evict_during_decode=True)
    capacity = pool_capacity(s, len(prompt), 200)
    assert capacity == s.budget + s.chunk
    out, stats = generate(model, prompt, s, max_new_tokens=200)
    assert (len(out) == 200
            and stats.pool_bytes == Engine(model, s, capacity, len(prompt)).pool.nbytes)


@pytest.mark.parametrize("evict_during_decode", [False, True])
def test_heads_run_only_where_the_policy_scores(model, evict_during_decode):
    """The document's chunks score, so every layer's head runs on each; the question (the n_loc
    tail) and the decoding steps score only when decoding may evict, and otherwise skip the
    heads."""
    prompt = prompt_of(60, seed=5)
    s = Settings(policy="locret", budget=24, chunk=12, stabilizers=4, n_loc=6,
                       evict_during_decode=evict_during_decode)
    tokens_scored = []  # per head call: how many tokens it scored
    hooks = [head.register_forward_hook(lambda m, i, o: tokens_scored.append(i[0].shape[1]))
             for head in model.retaining_heads]
    try:
        out, _ = generate(model, prompt, s, max_new_tokens=8)
    finally:
        for hook in hooks:
            hook.remove()
    L = model.config.num_hidden_layers
    body = 5 * L  # head calls for the 54 document tokens: 5 chunks
    assert len(out) == 8 and sum(tokens_scored[:body]) == L * (len(prompt) - s.n_loc)
    assert tokens_scored[body:] == ([s.n_loc] * L + [1] * L * 7 if evict_during_decode else [])


@pytest.mark.parametrize("change, message", [
    (dict(budget=8, stabilizers=8), r"--budget \(8\) must be larger than --stabilizers \(8\)"),
    (dict(chunk=0), "--chunk must be at least 1"),
    (dict(span=4), "--span must be an odd number >= 1"),
    (dict(span=0), "--span must be an odd number >= 1"),
    (dict(n_loc=50), r"--n-loc must be in \[0, prompt tokens\) = \[0, 50\)"),
    (dict(positions="sideways"), r"unknown positions 'sideways' \(choose from compact, original\)"),
    (dict(policy="lru"), "unknown policy 'lru'"),
    (dict(eviction="global"), r"unknown eviction 'global' \(choose from per-head, shared\)"),
    (dict(shared_layers="13"), "--shared-layers must be FIRST-LAST"),
    (dict(shared_layers="5-3"), "--shared-layers must be FIRST-LAST"),
])
def test_impossible_settings(change, message):
    with pytest.raises(LocretError, match=message):
        check_settings(replace(Settings(policy="streamingllm", n_loc=10), **change),
                       prompt_tokens=50)


def test_locret_without_heads_is_refused(tmp_path):
    import transformers
    transformers.AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(tmp_path)
    with pytest.raises(LocretError, match="--policy locret needs retaining heads"):
        Engine(load_model(tmp_path), Settings(policy="locret"), 10, 10)


def test_heads_round_trip_and_wrong_backbone(model, tmp_path, save_hf):
    path = tmp_path / "heads.safetensors"
    save_heads(model, path, backbone="tiny", training={"steps": 3})
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically
    config = tiny_llama_config() if model.config.model_type == "llama" else tiny_phi3_config()
    fresh = load_model(save_hf(config)[1])
    fresh.model.load_state_dict(model.model.state_dict(), strict=False)
    meta = load_heads(fresh, path)
    assert meta["backbone"] == "tiny" and '"steps": 3' in meta["training"]
    for ours, theirs in zip(fresh.retaining_heads, model.retaining_heads):
        assert (torch.equal(ours.fc1.weight, theirs.fc1.weight)
                and torch.equal(ours.fc2.weight, theirs.fc2.weight))
    other = load_model(save_hf(tiny_llama_config(num_hidden_layers=3), name="other")[1])
    with pytest.raises(LocretError, match=r"heads were trained for another backbone "
                                          r"\(tiny: .*num_hidden_layers 2 vs 3"):
        load_heads(other, path)
    with pytest.raises(LocretError, match="not found"):
        load_heads(other, tmp_path / "nope.safetensors")


def test_max_memory_gives_the_largest_budget_that_fits(model):
    s = Settings(policy="snapkv", budget=64, chunk=32, stabilizers=8, n_loc=10)
    capacity_of = lambda x: pool_capacity(x, 100_000, 16)
    need = lambda b: estimate(model, replace(s, budget=b), capacity_of(replace(s, budget=b))).total
    limit = need(500) + 1
    at_budget = lambda b: replace(s, budget=b)
    best = largest_budget(model, at_budget, limit, capacity_of, low=9, upper=100_000)
    assert need(best) <= limit < need(best + 1)
    assert best == 500
    assert largest_budget(model, at_budget, limit, capacity_of, low=9, upper=300) == 300
    with pytest.raises(LocretError, match="--max-memory .* is too small"):
        largest_budget(model, at_budget, need(9) - 1, capacity_of, low=9, upper=100_000)


ROPE_VARIANTS = {
    "default": lambda: tiny_llama_config(),
    "linear": lambda: tiny_llama_config(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3": lambda: tiny_llama_config(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "longrope": lambda: tiny_phi3_config(**longrope(original_max=64)),
}


@pytest.fixture(scope="module")
def rope_model(tmp_path_factory):
    """(transformers' model, ours with random retaining heads) of a ROPE_VARIANTS entry, built
    once."""
    import transformers
    built = {}

    def get(variant):
        if variant not in built:
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(ROPE_VARIANTS[variant]()).eval()
            folder = tmp_path_factory.mktemp(variant)
            hf.save_pretrained(folder)
            built[variant] = hf, load_model(folder)
            built[variant][1].add_retaining_heads(hidden=16)
        return built[variant]
    return get


CHUNKED = ([(variant, chunk, "full", "compact") for variant in ROPE_VARIANTS for chunk in (16, 48)]
           + [("longrope", 7, policy, positions) for policy in EVICTING for positions in POSITIONS])


@pytest.mark.parametrize("variant, chunk, policy, positions", CHUNKED)
def test_chunked_prefill_equals_one_forward(rope_model, variant, chunk, policy, positions):
    """A 93-token prompt prefilled in chunks across the original context (64) gives transformers'
    logits for one forward over it, and the same greedy tokens: one frequency set per generation. A
    policy whose budget covers the prompt scores every chunk and evicts nothing."""
    hf, model = rope_model(variant)
    prompt = prompt_of(93, seed=5)
    s = Settings(policy=policy, budget=128, chunk=chunk, stabilizers=4, n_loc=5,
                 positions=positions)
    with torch.inference_mode():
        context = Context(model, s, pool_capacity(s, len(prompt), 4), len(prompt))
        logits = context.prefill(prompt)
        expected = hf(torch.tensor([prompt])).logits[0, -1]
    assert context.chunks == -(-(len(prompt) - s.n_loc) // chunk)  # then the uncompressed tail
    pool = context.engine.pool
    if s.evicts:
        assert (pool.scores[..., :len(prompt) - s.n_loc] != 0).any() and pool.length == len(prompt)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    out, _ = generate(model, prompt, s, max_new_tokens=4)
    assert out == naive_greedy(model, prompt, 4)


def test_final_eviction_protects_stabilizers_unless_asked_not_to(model):
    """By default the last stabilizers survive every eviction; unprotected, the final one keeps
    the top scores."""
    prompt = prompt_of(100, seed=2)
    s = Settings(policy="knorm", budget=24, chunk=10, stabilizers=8, n_loc=6)
    body = len(prompt) - s.n_loc
    kept = {}
    for protect in (True, False):
        with torch.inference_mode():
            context = Context(model, replace(s, final_stabilizers=protect),
                              pool_capacity(s, len(prompt), 1), len(prompt))
            context.prefill(prompt)
        kept[protect] = context.pool.index[:, :, :, :s.budget]
    last = torch.arange(body - s.stabilizers, body)
    # [L, B, KVH]: every one kept
    all_kept = lambda index: (index[..., None] == last).any(dim=-2).all(dim=-1)
    assert all_kept(kept[True]).all()
    assert not all_kept(kept[False]).all()  # knorm drops some of them in some layer or head


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_int8_pool_stays_close_to_full_attention_and_evicts_as_planned(model, positions):
    """Int8 K and V (one scale per entry): near full attention when nothing is evicted, not equal
    to it (the values really are rounded); with eviction, the pool stays int8 and static, and
    memory is estimated."""
    prompt = prompt_of(40)
    s = Settings(policy="locret", budget=64, chunk=7, stabilizers=4, n_loc=5, positions=positions,
                 kv_int8=True)
    with torch.inference_mode():
        context = Context(model, s, pool_capacity(s, len(prompt), 6), len(prompt))
        logits = context.prefill(prompt)
        full = model(torch.tensor([prompt]))[0, -1]
    error = (logits - full).abs().max().item()
    assert 0 < error < 0.01 * full.abs().max().item()
    assert context.pool.k.dtype == torch.int8 and len(context.pool.scales) == 2
    small = replace(s, budget=16)
    out, stats = generate(model, prompt_of(200, seed=2), small, max_new_tokens=6)
    plain, plain_stats = generate(model, prompt_of(200, seed=2), replace(small, kv_int8=False),
                                  max_new_tokens=6)
    assert (len(out) == 6 and stats.chunks == plain_stats.chunks
            and stats.pool_bytes < plain_stats.pool_bytes)
    capacity = pool_capacity(small, 200, 6)
    assert estimate(model, small, capacity).pool == stats.pool_bytes
    # dequantizing needs no temporaries: the pool holds its buffers
    assert (estimate(model, small, capacity).activations
            == estimate(model, replace(small, kv_int8=False), capacity).activations)


# One chunk's attention in a fresh process, on each number of threads given: the rise of its peak
# resident memory, in bytes. Tensors of 64 KiB or more get fresh pages from the system and give
# them back when freed (a fixed mmap threshold): else glibc can put them in freed pages still
# resident, and the rise understates what attention holds.
CHUNK_ATTENTION = """
import sys
import torch
from pathlib import Path
from torch.nn.attention.bias import causal_lower_right
from locret.memory import rss_bytes
from models.base import attend
H, KVH, T, S, D, *threads = map(int, sys.argv[1:])
q, k, v = (torch.randn(1, h, n, D) for h, n in ((H, T), (KVH, S), (KVH, S)))
for n in threads:
    torch.set_num_threads(n)
    past = S - T + 4  # set-up: a first, small call
    attend(q[:, :, :4], k[:, :, :past], v[:, :, :past], causal_lower_right(4, past), False)
    before = rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    attend(q, k, v, causal_lower_right(T, S), False)
    print(rss_bytes("VmHWM") - before)
"""


def test_cpu_attention_memory_stays_within_the_estimate(monkeypatch):
    """A chunk's attention on CPU (models/base.attend with the pool's causal bias) works in blocks:
    it holds about its partial outputs and each thread's blocks (memory.sdpa_bytes), not the
    [H, T, S] weights nor a [T, S] mask."""
    import os
    import subprocess
    import sys
    from locret.memory import sdpa_bytes
    from models import Llama, config_from_hf
    H, KVH, T, S, D = 8, 2, 256, 4096, 64
    threads = (2, 8)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)}
    args = map(str, (H, KVH, T, S, D, *threads))
    run = subprocess.run([sys.executable, "-c", CHUNK_ATTENTION, *args], env=env,
                         capture_output=True, text=True, check=True)
    model = Llama(config_from_hf(dict(
        model_type="llama", vocab_size=64, hidden_size=H * D, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=H, num_key_value_heads=KVH,
        max_position_embeddings=S, rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=False)))
    weights = H * T * S * 4  # 32 MiB, what materialized attention weights would take
    for n, used in zip(threads, map(int, run.stdout.split())):
        monkeypatch.setattr(torch, "get_num_threads", lambda: n)
        assert H * T * D * 4 <= used <= sdpa_bytes(model, T, S) + 2**20, n  # at least its output
        assert sdpa_bytes(model, T, S) == sdpa_bytes(model, T, 4 * S) < weights / 3  # not with S
