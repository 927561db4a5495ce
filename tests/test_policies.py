"""Scoring policies against direct formulas written here with explicit loops in float64.

A chunk of T new tokens over a pool of S entries (the first S - T kept from earlier chunks):
query head h reads KV head h // G, and the chunk's i-th query sits at slot S - T + i, seeing
every slot up to its own."""
import math
from dataclasses import replace

import pytest
import torch

from locret.errors import LocretError
from locret.policies import (POLICIES, QUERY_BLOCK, Chunk, Precomputed, Random, h2o, knorm, locret,
                             make_policy, snapkv, streamingllm, tova)

B, KVH, G, D, S, T = 2, 2, 2, 8, 12, 5
H = KVH * G
OLD = S - T


def make_chunk(seed: int = 0, dtype: torch.dtype = torch.float32) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, T, D, generator=g) * 2).to(dtype)  # * 2: attention far from uniform
    k = (torch.randn(B, KVH, S, D, generator=g) * 2).to(dtype)
    stored = torch.randn(B, KVH, OLD, generator=g)
    # increasing prompt positions per (batch, head), some below 4 (sinks), the new chunk contiguous
    old_positions = [[0, 2, 3, 5, 9, 13, 20], [1, 4, 6, 7, 8, 15, 19],
                     [3, 4, 10, 11, 12, 16, 17], [0, 1, 2, 3, 18, 19, 20]]
    index = torch.tensor([p + list(range(30, 30 + T)) for p in old_positions]).view(B, KVH, S)
    head_scores = torch.randn(B, KVH, T, generator=g)
    return Chunk(q=q, k=k, stored=stored, index=index, head_scores=head_scores)


def reference_attention(c: Chunk) -> list:
    """att[b][h][i][j] (float64): softmax over visible keys of q_h,i . k_{h//G},j / sqrt(D); 0 where
    hidden."""
    q, k = c.q.double(), c.k.double()
    att = []
    for b in range(B):
        per_head = []
        for h in range(H):
            rows = []
            for i in range(T):
                visible = range(S - T + i + 1)
                logits = [float(q[b, h, i] @ k[b, h // G, j]) / math.sqrt(D) for j in visible]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                rows.append([x / sum(e) for x in e] + [0.0] * (S - len(e)))
            per_head.append(rows)
        att.append(per_head)
    return att


def as_tensor(nested) -> torch.Tensor:
    return torch.tensor(nested, dtype=torch.float64)


def close(actual: torch.Tensor, expected, atol=1e-5):
    expected = expected if isinstance(expected, torch.Tensor) else as_tensor(expected)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def chunk() -> Chunk:
    return make_chunk()


@pytest.fixture(scope="module")
def ref(chunk):
    return reference_attention(chunk)


def test_chunk_attention_matches_reference(chunk, ref):
    att = chunk.attention()
    assert att.shape == (B, KVH, G, T, S)
    assert att.dtype == torch.float32
    expected = [[[ref[b][kv * G + g] for g in range(G)] for kv in range(KVH)] for b in range(B)]
    close(att, expected)
    # hidden keys get exactly nothing; each row is a distribution
    for i in range(T):
        assert (att[..., i, S - T + i + 1:] == 0).all()
    close(att.sum(-1), torch.ones(B, KVH, G, T))


@pytest.mark.parametrize("last", [1, 3, T])
def test_chunk_attention_of_last_queries(chunk, ref, last):
    att = chunk.attention(last=last)
    assert att.shape == (B, KVH, G, last, S)
    expected = [[[ref[b][kv * G + g][T - last:] for g in range(G)] for kv in range(KVH)]
                for b in range(B)]
    close(att, expected)


@pytest.mark.parametrize("block", [1, 2, T - 1, T, 64])
def test_received_attention_in_blocks_of_queries(chunk, ref, block):
    """Summed a few queries at a time (the transient bound): the same as over the whole chunk at
    once."""
    expected = [[[sum(ref[b][kv * G + g][i][j] for g in range(G) for i in range(T))
                  for j in range(S)]
                 for kv in range(KVH)] for b in range(B)]
    close(chunk.received(block=block), expected)


def test_h2o_on_a_chunk_longer_than_the_query_block(monkeypatch):
    """h2o over a chunk of more queries than one block sums every block, each at most QUERY_BLOCK
    queries (what memory.py counts): equal to one full softmax."""
    g = torch.Generator().manual_seed(3)
    T_long, S_long = 300, 340  # several blocks of QUERY_BLOCK queries
    q, k = torch.randn(1, H, T_long, D, generator=g), torch.randn(1, KVH, S_long, D, generator=g)
    c = Chunk(q=q, k=k, stored=torch.zeros(1, KVH, S_long - T_long),
              index=torch.arange(S_long).expand(1, KVH, -1), head_scores=None)
    logits = (q.double().view(1, KVH, G, T_long, D) @ k.double()[:, :, None].transpose(-1, -2)
              / math.sqrt(D))
    visible = torch.arange(S_long) <= S_long - T_long + torch.arange(T_long)[:, None]
    expected = logits.masked_fill(~visible, float("-inf")).softmax(-1).sum(dim=(2, 3))
    blocks, attention_rows = [], Chunk.attention_rows
    monkeypatch.setattr(Chunk, "attention_rows",
                        lambda self, i, j: blocks.append((i, j)) or attention_rows(self, i, j))
    close(h2o(c), expected)
    assert (blocks == [(i, min(i + QUERY_BLOCK, T_long)) for i in range(0, T_long, QUERY_BLOCK)]
            and len(blocks) >= 3)


def test_chunk_attention_in_bf16():
    c = make_chunk(seed=1, dtype=torch.bfloat16)
    ref = reference_attention(c)  # on the bf16 values, in float64
    att = c.attention()
    assert att.dtype == torch.float32
    close(att, [[[ref[b][kv * G + g] for g in range(G)] for kv in range(KVH)] for b in range(B)])


def stored_then(c: Chunk, new) -> list:
    """[B][KVH][S]: the stored scores followed by `new`[b][kv][t]."""
    return [[c.stored[b, kv].tolist() + list(new[b][kv]) for kv in range(KVH)] for b in range(B)]


def test_streamingllm(chunk):
    out = streamingllm(chunk)
    assert out.shape == (B, KVH, S)
    for b in range(B):
        for kv in range(KVH):
            for j in range(S):
                p = int(chunk.index[b, kv, j])
                assert float(out[b, kv, j]) == (math.inf if p < 4 else float(p))
    # the example has sinks and non-sinks
    assert torch.isinf(out).any() and not torch.isinf(out).all()


def test_h2o(chunk, ref):
    expected = []
    for b in range(B):
        rows = []
        for kv in range(KVH):
            stored = chunk.stored[b, kv].tolist() + [0.0] * T
            received = [sum(ref[b][kv * G + g][i][j] for g in range(G) for i in range(T))
                        for j in range(S)]
            rows.append([s + r for s, r in zip(stored, received)])
        expected.append(rows)
    close(h2o(chunk), expected)


def reference_snapkv(c: Chunk, ref, window: int, kernel: int) -> list:
    w, r = min(window, T), kernel // 2
    expected = []
    for b in range(B):
        rows = []
        for kv in range(KVH):
            total = [0.0] * S
            for g in range(G):
                votes = [sum(ref[b][kv * G + g][i][j] for i in range(T - w, T)) for j in range(S)]
                for j in range(S):
                    # window clipped at the edges
                    total[j] += max(votes[max(0, j - r):min(S, j + r + 1)])
            rows.append(total)
        expected.append(rows)
    return expected


def test_snapkv_default(chunk, ref):
    out = snapkv(chunk)
    assert out.shape == (B, KVH, S)
    close(out, reference_snapkv(chunk, ref, window=32, kernel=7))


@pytest.mark.parametrize("window,kernel", [(2, 3), (1, 5)])
def test_snapkv_window_and_kernel(chunk, ref, window, kernel):
    out = snapkv(chunk, window=window, kernel=kernel)
    close(out, reference_snapkv(chunk, ref, window=window, kernel=kernel))
    # the window really matters: all queries would vote differently
    assert not torch.allclose(out.double(),
                              as_tensor(reference_snapkv(chunk, ref, window=T, kernel=kernel)))


def test_tova(chunk, ref):
    expected = [[[sum(ref[b][kv * G + g][T - 1][j] for g in range(G)) / G for j in range(S)]
                 for kv in range(KVH)] for b in range(B)]
    out = tova(chunk)
    assert out.shape == (B, KVH, S)
    close(out, expected)


def test_knorm(chunk):
    k = chunk.k.double()
    new = [[[-math.sqrt(sum(float(x) ** 2 for x in k[b, kv, OLD + t])) for t in range(T)]
            for kv in range(KVH)] for b in range(B)]
    close(knorm(chunk), stored_then(chunk, new))


def test_locret(chunk):
    out = locret(chunk)
    assert out.shape == (B, KVH, S)
    assert torch.equal(out, torch.tensor(stored_then(chunk, chunk.head_scores.tolist()),
                                         dtype=torch.float32))


@pytest.mark.parametrize("span", [3, 5])
def test_locret_span_takes_the_best_score_among_neighbours(chunk, span):
    scores = chunk.head_scores.tolist()
    best = [[[max(row[max(0, t - span // 2):t + span // 2 + 1]) for t in range(T)] for row in per_b]
            for per_b in scores]
    out = make_policy("locret", span=span)(chunk)
    assert torch.equal(out, torch.tensor(stored_then(chunk, best), dtype=torch.float32))
    assert not torch.equal(out, locret(chunk))


def test_precomputed_scores_take_the_span_as_the_heads_do(chunk):
    """An oracle's scores, looked up by each new entry's prompt position, pooled within the chunk
    like the heads'."""
    P = int(chunk.index.max()) + 1
    table = torch.zeros(2, B, KVH, P)
    # layer 1 holds the heads' scores
    table[1].scatter_(-1, chunk.index[..., -T:], chunk.head_scores.float())
    for span in (1, 3):
        looked_up = Precomputed(table, span)(replace(chunk, layer=1))
        assert torch.equal(looked_up, make_policy("locret", span=span)(chunk))
    # layer 0's zeros
    assert torch.equal(Precomputed(table, 3)(chunk)[..., -T:], torch.zeros(B, KVH, T))


def test_random(chunk):
    a, b, c = Random(7)(chunk), Random(7)(chunk), Random(8)(chunk)
    for out in (a, b, c):
        assert out.shape == (B, KVH, S)
        assert torch.equal(out[..., :OLD], chunk.stored)
        assert ((out[..., OLD:] >= 0) & (out[..., OLD:] < 1)).all()
    assert torch.equal(a, b)
    assert not torch.equal(a[..., OLD:], c[..., OLD:])
    assert torch.equal(make_policy("random", seed=7)(chunk), a)


def test_make_policy():
    assert make_policy("full") is None
    assert (make_policy("h2o") is h2o and make_policy("snapkv") is snapkv
            and make_policy("locret") is locret)
    assert isinstance(make_policy("random"), Random)
    with pytest.raises(LocretError) as err:
        make_policy("oracle")
    message = str(err.value)
    assert "oracle" in message
    for name in ["full", "locret", "streamingllm", "h2o", "snapkv", "tova", "knorm", "random"]:
        assert name in message and name in POLICIES


def test_policies_do_not_modify_their_inputs(chunk):
    before = [t.clone() for t in (chunk.q, chunk.k, chunk.stored, chunk.index, chunk.head_scores)]
    for name in POLICIES[1:]:
        make_policy(name)(chunk)
    after = (chunk.q, chunk.k, chunk.stored, chunk.index, chunk.head_scores)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
