"""KVPool: writes, top-k eviction with protected stabilizers, static storage, size estimate, mask.

Every expectation is computed here by a direct reference (plain Python per layer, batch row and
KV head), never copied from a run of the code under test."""
import pytest
import torch
from torch.nn.attention.bias import CausalVariant

from locret.errors import LocretError
from locret.int8 import dequantize, group_size, quantize
from locret.kv_pool import KVPool
from models import ModelConfig

L, KVH, D = 2, 2, 8


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(model_type="llama", vocab_size=32, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                                 num_key_value_heads=KVH, head_dim=D, max_position_embeddings=512),
                          **overrides})


class Mirror:
    """What the test knows independently of the pool: every K/V row written, keyed by prompt
    position, and, per (layer, batch, head), which positions are held in slot order."""

    def __init__(self, batch: int, total: int, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randn(L, batch, KVH, total, D, generator=g).to(dtype)
        self.v = torch.randn(L, batch, KVH, total, D, generator=g).to(dtype)
        # a distinct real score for every (layer, batch, head, position): no ties anywhere
        self.score = torch.stack([torch.randperm(total, generator=g)
                                  for _ in range(L * batch * KVH)])
        self.score = self.score.view(L, batch, KVH, total).float() / 4 - 3
        self.held = [[[[] for _ in range(KVH)] for _ in range(batch)] for _ in range(L)]
        self.batch = batch

    def heads(self):
        for l in range(L):
            for b in range(self.batch):
                for h in range(KVH):
                    yield l, b, h


def write_chunk(pool: KVPool, m: Mirror, start: int, T: int) -> None:
    """Write positions start..start+T-1 in every layer, give them their real scores, advance."""
    n = pool.length
    for layer in range(L):
        k_all, v_all = pool.write(layer, m.k[layer, :, :, start:start + T],
                                  m.v[layer, :, :, start:start + T])
        assert k_all.shape == v_all.shape == (m.batch, KVH, n + T, D)
        assert torch.equal(k_all[:, :, n:], m.k[layer, :, :, start:start + T])
        pool.scores[layer, :, :, n:n + T] = m.score[layer, :, :, start:start + T]
    pool.advance(T)
    for l, b, h in m.heads():
        m.held[l][b][h].extend(range(start, start + T))


def reference_evict(held: list[int], score: torch.Tensor, keep: int,
                    protect: int) -> tuple[list[int], list[int]]:
    """-> (kept positions, their old slots), in slot order: the last `protect` slots, plus the best
    scored of the rest until `keep` entries are kept."""
    n = len(held)
    protected = set(range(max(n - protect, 0), n))
    rest = sorted((s for s in range(n) if s not in protected), key=lambda s: float(score[held[s]]),
                  reverse=True)
    slots = sorted(protected | set(rest[:keep - len(protected)]))
    return [held[s] for s in slots], slots


def check_pool(pool: KVPool, m: Mirror) -> None:
    """The pool holds exactly what the mirror says, bit for bit."""
    n = pool.length
    for l, b, h in m.heads():
        held = m.held[l][b][h]
        assert len(held) == n
        assert pool.index[l, b, h, :n].tolist() == held
        pos = torch.tensor(held)
        assert torch.equal(pool.k[l, b, h, :n], m.k[l, b, h, pos])
        assert torch.equal(pool.v[l, b, h, :n], m.v[l, b, h, pos])
        # real scores, never +inf
        assert torch.equal(pool.scores[l, b, h, :n], m.score[l, b, h, pos])


def evict_and_check(pool: KVPool, m: Mirror, keep: int, protect: int) -> list[list[int]]:
    expected, expected_slots = {}, {}
    for l, b, h in m.heads():
        expected[l, b, h], expected_slots[l, b, h] = reference_evict(
            m.held[l][b][h], m.score[l, b, h], keep, protect)
    kept_slots = pool.evict(keep, protect)
    assert kept_slots.shape == (L, m.batch, KVH, keep)
    assert pool.length == keep
    for l, b, h in m.heads():
        assert kept_slots[l, b, h].tolist() == expected_slots[l, b, h]
        m.held[l][b][h] = expected[l, b, h]
    check_pool(pool, m)
    return [m.held[l][b][h] for l, b, h in m.heads()]


def storage(pool: KVPool):
    return [(t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
            for t in (pool.k, pool.v, pool.scores, pool.index, pool.scratch)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [1, 2])
def test_two_rounds_of_eviction_keep_the_top_scored_with_stabilizers(dtype, seed):
    m = Mirror(1, total=24, dtype=dtype, seed=seed)
    # In some heads, make the future stabilizers the worst of the first chunk: without protection
    # they would be evicted, so the protection is really exercised (positions 10, 11 are the last 2
    # of round 1).
    for l, b, h in m.heads():
        if (l + b + h) % 2 == 0:
            m.score[l, b, h, 10:12] = torch.tensor([-100.0, -101.0]) - l - b - h
    pool = KVPool(tiny_config(), capacity=16, dtype=dtype)
    before = storage(pool)

    write_chunk(pool, m, 0, 12)
    assert (pool.length, pool.seen) == (12, 12)
    check_pool(pool, m)
    assert storage(pool) == before

    kept = evict_and_check(pool, m, keep=7, protect=2)
    assert (pool.length, pool.seen) == (7, 12)
    assert all(10 in k and 11 in k for k in kept)  # stabilizers kept...
    assert (pool.scores[..., 5:7] < -99).any()  # ...with their real (low) score, not +inf
    assert not torch.isinf(pool.scores[..., :7]).any()
    assert storage(pool) == before

    write_chunk(pool, m, 12, 9)  # positions continue from where the prompt left off
    assert (pool.length, pool.seen) == (16, 21)
    check_pool(pool, m)
    assert storage(pool) == before

    kept = evict_and_check(pool, m, keep=6, protect=3)
    assert (pool.length, pool.seen) == (6, 21)
    assert all({18, 19, 20} <= set(k) for k in kept)
    # round 1's stabilizers are no longer protected: with their -100 scores they must be gone now
    for (l, b, h), k in zip(m.heads(), kept):
        if (l + b + h) % 2 == 0:
            assert 10 not in k and 11 not in k
    assert storage(pool) == before

    # and writing after the second eviction still lands behind the kept entries
    write_chunk(pool, m, 21, 3)
    assert (pool.length, pool.seen) == (9, 24)
    check_pool(pool, m)
    assert storage(pool) == before


def test_layers_and_heads_evict_independently():
    n, keep = 10, 4
    m = Mirror(1, total=n, dtype=torch.float32)
    pos = torch.arange(n).float()
    # four different orderings, all distinct values
    patterns = [pos, -pos, (pos * 7) % n, -((pos * 3) % n)]
    for l, b, h in m.heads():
        m.score[l, b, h] = patterns[(l * KVH + h + b) % 4]
    pool = KVPool(tiny_config(), capacity=n)
    write_chunk(pool, m, 0, n)
    evict_and_check(pool, m, keep=keep, protect=1)
    sets = {(l, b, h): m.held[l][b][h] for l, b, h in m.heads()}
    assert sets[0, 0, 0] != sets[0, 0, 1]  # heads of one layer differ
    assert sets[0, 0, 0] != sets[1, 0, 0]  # one head in different layers differs
    assert sets[0, 0, 0] == [6, 7, 8, 9]  # scores increase with position: the most recent
    assert sets[0, 0, 1] == [0, 1, 2, 9]  # scores decrease: the oldest, plus the stabilizer


def test_evict_with_no_stabilizers_is_plain_top_k():
    m = Mirror(1, total=9, dtype=torch.float32, seed=3)
    pool = KVPool(tiny_config(), capacity=9)
    write_chunk(pool, m, 0, 9)
    evict_and_check(pool, m, keep=3, protect=0)
    for l, b, h in m.heads():
        best = sorted(range(9), key=lambda p: float(m.score[l, b, h, p]))[-3:]
        assert m.held[l][b][h] == sorted(best)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity", [16, 37])
@pytest.mark.parametrize("turned_keys", [False, True])
def test_bytes_needed_matches_allocation(dtype, capacity, turned_keys):
    config = tiny_config()
    pool = KVPool(config, capacity=capacity, dtype=dtype, turned_keys=turned_keys)
    assert KVPool.bytes_needed(config, capacity, dtype, turned_keys=turned_keys) == pool.nbytes
    # and, counted directly: K, V, one layer of scratch (and of turned keys) in `dtype`, scores
    # fp32, indices int64
    elem = torch.tensor([], dtype=dtype).element_size()
    layers_of_kv = 2 * L + 1 + turned_keys
    direct = layers_of_kv * KVH * capacity * D * elem + L * KVH * capacity * (4 + 8)
    assert pool.nbytes == direct


def test_writing_past_capacity_raises():
    m = Mirror(1, total=12, dtype=torch.float32)
    pool = KVPool(tiny_config(), capacity=8)
    with pytest.raises(LocretError, match="KV pool full"):
        pool.write(0, m.k[0, :, :, :9], m.v[0, :, :, :9])
    write_chunk(pool, m, 0, 5)
    with pytest.raises(LocretError, match="KV pool full"):
        pool.write(0, m.k[0, :, :, 5:9], m.v[0, :, :, 5:9])
    write_chunk(pool, m, 5, 3)  # exactly full is fine
    assert pool.length == 8
    check_pool(pool, m)
    with pytest.raises(LocretError, match="KV pool full"):
        pool.write(1, m.k[1, :, :, 8:9], m.v[1, :, :, 8:9])


def test_attention_mask():
    """A lower-right causal bias over the filled entries and the new tokens (never a dense mask)."""
    m = Mirror(1, total=12, dtype=torch.float32)
    pool = KVPool(tiny_config(), capacity=12)
    assert pool.attention_mask(4) is None
    write_chunk(pool, m, 0, 5)
    assert pool.attention_mask(1) is None  # one new token sees every entry: no mask needed
    for n_new in (2, 3):
        bias = pool.attention_mask(n_new)
        assert (bias.variant == CausalVariant.LOWER_RIGHT
                and (bias.seq_len_q, bias.seq_len_kv) == (n_new, 5 + n_new))
    # the mask follows the filled length, not the positions
    evict_and_check(pool, m, keep=2, protect=1)
    bias = pool.attention_mask(2)
    assert (bias.seq_len_q, bias.seq_len_kv) == (2, 4)


def reference_shared_evict(held: list[int], scores: list[torch.Tensor], keep: int, protect: int):
    """One kept set for every layer and head: each (layer, head) ranks the held tokens 0..n-1 by its
    score, a token's value is its mean rank; the last `protect` always, then the best values.
    -> (positions that must be kept, positions that may be: those tied with the last one kept)."""
    n = len(held)
    mean_rank = [0.0] * n
    for score in scores:
        order = sorted(range(n), key=lambda s: float(score[held[s]]))
        for rank, s in enumerate(order):
            mean_rank[s] += rank / (n - 1) / len(scores)
    protected = set(range(max(n - protect, 0), n))
    rest = sorted((s for s in range(n) if s not in protected), key=lambda s: mean_rank[s],
                  reverse=True)
    cut = mean_rank[rest[keep - len(protected) - 1]]
    must = protected | {s for s in rest if mean_rank[s] > cut + 1e-9}
    tied = {s for s in rest if abs(mean_rank[s] - cut) <= 1e-9}
    return {held[s] for s in must}, {held[s] for s in must | tied}


@pytest.mark.parametrize("ranking_layers", [range(L), range(1, 2)])
def test_shared_eviction_keeps_the_same_best_mean_rank_entries_everywhere(ranking_layers):
    batch = 1
    m = Mirror(batch, total=20, dtype=torch.float32, seed=5)
    pool = KVPool(tiny_config(), capacity=14)
    write_chunk(pool, m, 0, 12)
    for keep, protect, start, T in [(6, 2, 12, 8), (5, 0, None, None)]:
        ranking = [[m.score[l, b, h] for l in ranking_layers for h in range(KVH)]
                   for b in range(batch)]
        expected = [reference_shared_evict(m.held[0][b][0], ranking[b], keep, protect)
                    for b in range(batch)]
        layers = slice(ranking_layers.start, ranking_layers.stop)
        kept_slots = pool.evict(keep, protect, shared=True, ranking_layers=layers)
        assert kept_slots.shape == (L, batch, KVH, keep) and pool.length == keep
        for b, (must, may) in enumerate(expected):
            kept = pool.index[0, b, 0, :keep].tolist()
            assert must <= set(kept) <= may and kept == sorted(kept)
            for l, h in [(l, h) for l in range(L) for h in range(KVH)]:
                m.held[l][b][h] = list(kept)
        check_pool(pool, m)  # every layer and head holds the same entries, with its own real scores
        if start is not None:
            write_chunk(pool, m, start, T)


def test_int8_round_trip_is_within_half_a_step_of_each_group_own_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 64, generator=g)
    x[0, 1, 7, 20] = 1000.0  # an outlier value: its own group's scale, nobody else's
    x[1, 2, 3] = 0  # an all-zero entry stays zero
    values, scale = quantize(x)
    assert (values.dtype == torch.int8 and scale.shape == (2, 3, 50, 4)
            and scale.dtype == torch.float16)
    groups = x.unflatten(-1, (4, 16))
    torch.testing.assert_close(scale.float(), (groups.abs().amax(dim=-1) / 127).clamp(min=2**-14),
                               rtol=2**-10, atol=0)
    back = dequantize(values, scale, torch.empty(x.shape))
    assert ((back - x).unflatten(-1, (4, 16)).abs() <= scale.float()[..., None] / 2 * 1.01).all()
    assert torch.equal(back[1, 2, 3], torch.zeros(64))
    error = (back - x).abs()
    # randn: max |x| ~ 3, step 3 / 127
    assert error[0, 1, 7, 16:32].max() > 1 and error[0, 1, 7, :16].max() < 0.03
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    assert (dequantize(values, scale, torch.empty(x.shape), out) is out
            and torch.equal(out, back.bfloat16()))
    assert (group_size(64) == 16 and group_size(96) == 16 and group_size(72) == 8
            and group_size(8) == 8)


def test_int8_pool_evicts_the_same_entries_and_keeps_their_scales():
    """An int8 pool keeps what a float pool keeps, and each kept entry reads back as its own
    quantized row."""
    m = Mirror(1, total=14, dtype=torch.float32, seed=5)
    pools = [KVPool(tiny_config(), capacity=14), KVPool(tiny_config(), capacity=14, int8=True)]
    for pool in pools:
        for layer in range(L):
            k_all, v_all = pool.write(layer, m.k[layer], m.v[layer])
            pool.scores[layer] = m.score[layer]
        pool.advance(14)
    # reads come back in the model dtype
    assert pools[1].k.dtype == torch.int8 and k_all.dtype == torch.float32
    # in the pool's buffer: no cache-sized temporary
    assert k_all.data_ptr() == pools[1].dequantized[0].data_ptr()
    torch.testing.assert_close(k_all, dequantize(*quantize(m.k[L - 1]),
                                                 torch.empty(m.k[L - 1].shape)))
    kept = [pool.evict(keep=6, protect=2) for pool in pools]
    assert torch.equal(kept[0], kept[1]) and torch.equal(pools[0].index, pools[1].index)
    for layer in range(L):
        rows = kept[1][layer][..., None].expand(-1, -1, -1, D)
        expected = [dequantize(*quantize(t[layer].gather(2, rows)), torch.empty(rows.shape))
                    for t in (m.k, m.v)]
        for got, want in zip(pools[1].read(layer, 6), expected):
            assert torch.equal(got, want)


def test_int8_pool_bytes():
    config = tiny_config(head_dim=64)
    pool = KVPool(config, capacity=40, dtype=torch.bfloat16, int8=True)
    assert KVPool.bytes_needed(config, 40, torch.bfloat16, int8=True) == pool.nbytes
    direct = ((2 * L + 1) * KVH * 40 * 64 * 1 + 2 * L * KVH * 40 * 4 * 2 + L * KVH * 40 * (4 + 8)
              + KVH * 40 * 64 * (4 + 2 * 2))  # one layer dequantized: fp32 work, K and V in bf16
    assert pool.nbytes == direct
    kv_bytes = lambda p: sum(t.nbytes for t in (p.k, p.v, *p.scales))
    bf16 = KVPool(config, capacity=40, dtype=torch.bfloat16)
    # K and V: 56% of bf16 at head_dim 64
    assert kv_bytes(pool) / kv_bytes(bf16) == (64 + 4 * 2) / 128
