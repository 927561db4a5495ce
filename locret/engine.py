"""Locret's engine: settings, KV pool and policy, and one forward of new tokens through them.

The chunk loop lives in context.py. Per chunk (as in the official Locret code): run it through the
model; in every layer the policy scores the chunk's new entries (appending to the kept entries'
stored scores); then each layer keeps the top-`budget` entries per KV head, the last `stabilizers`
protected (or, with eviction `shared`, every layer and KV head keeps the same entries: the best by
mean rank over all layers or over `shared_layers`, ranking.py). The prompt's last `n_loc` tokens are
prefilled without eviction; decoding does not evict unless asked to.

Positions: in `original` mode a token keeps its prompt position, so keys are stored rotated and
never turned again. In `compact` mode (the official default) the kept entries are re-indexed
0..n-1 after each eviction; as in the official code, keys are then stored before RoPE and rotated
to their current slot at each use (O(cache) per layer and forward), so they never drift, however
many evictions and in any dtype. Once the document is closed and no eviction can move them again,
they are turned to their slots for good (settle_keys), so the question and the answer do not turn
them again. One RoPE frequency set serves a whole generation: the one a single forward over the
prompt would use (it matters for longrope, whose factors switch with length).

Sliding-window layers (config.layer_types) keep only their window, in a WindowPool: the budget,
the policy and the retaining heads act on the global layers alone."""
from typing import NamedTuple

import torch

from models import CausalLM
from models.rope import apply_rope

from .errors import LocretError
from .kv_pool import KVPool
from .policies import Chunk, make_policy
from .settings import NEEDS_HEADS, Settings, layer_slice, turns_keys
from .window_pool import WindowPool


def window_room(s: Settings, capacity: int) -> int:
    """Entries a sliding-window layer holds beyond its window: one chunk, and with eviction all a
    question and its answer add after the document (as the global pool does), so that answering
    another question finds the windows as they were."""
    return max(s.chunk, capacity - s.budget) if s.evicts else s.chunk


def pool_bytes(s: Settings, config, capacity: int, dtype: torch.dtype) -> int:
    """The bytes the Engine's pools will allocate (KVPool's and WindowPool's bytes_needed)."""
    pool = KVPool.bytes_needed(config, capacity, dtype, s.kv_int8, turns_keys(s))
    if not config.has_windows:
        return pool
    layers = len(config.sliding_layers)
    return pool + WindowPool.bytes_needed(layers, config.num_key_value_heads, config.head_dim,
                                          config.sliding_window, window_room(s, capacity), dtype)


class Mark(NamedTuple):
    """Where the pools stood: Engine.rewind returns to it."""
    length: int
    seen: int
    window_length: int
    moves: int


class PolicyCache:
    """The cache the model sees: writes into the pool and, while `scoring`, lets the policy score.

    With `slot_rope` (cos, sin for slots 0..capacity-1) the pool holds keys before RoPE and each
    use turns them to their slots (once `settled`, each new key is turned once, in the pool);
    without, it holds them rotated by their own positions."""

    def __init__(self, pool: KVPool, policy,
                 slot_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                 windows: WindowPool | None = None):
        self.pool, self.policy, self.slot_rope, self.scoring = pool, policy, slot_rope, False
        self.windows = windows
        # model layer -> its row in the pool (global layers) or in `windows` (the others)
        self.rows = {layer: row for row, layer in enumerate(pool.layers)}
        window_layers = windows.layers if windows else []
        self.window_rows = {layer: row for row, layer in enumerate(window_layers)}
        # slot_rope's keys before the new ones are turned for good (Engine.settle_keys)
        self.settled = False

    def update(self, layer, q, k, v, head_scores, rope):
        if layer in self.window_rows:
            return self.windows.write(self.window_rows[layer], k, v)
        layer = self.rows[layer]
        if self.slot_rope is None:
            k_all, v_all = self.pool.write(layer, apply_rope(k, *rope), v)
        else:
            k_all, v_all = self.pool.write(layer, k, v)
            # the new keys, or all (eviction moves them)
            first = k_all.shape[2] - k.shape[2] if self.settled else 0
            turned = self.turn(k_all, first)
            if self.settled:
                k_all[:, :, first:] = turned  # the pool holds them turned from now on
            else:
                k_all = turned
        if self.scoring:
            S, T = k_all.shape[2], k.shape[2]
            scores = self.pool.scores[layer, :, :, :S]
            chunk = Chunk(q, k_all, scores[..., :S - T], self.pool.index[layer, :, :, :S],
                          head_scores, layer)
            scores.copy_(self.policy(chunk))
        return k_all, v_all

    def attention_mask(self, n_new):
        return self.pool.attention_mask(n_new)

    def window_view(self, positions, window):
        return self.windows.view(len(positions))

    def turn(self, keys: torch.Tensor, first: int) -> torch.Tensor:
        """keys [B, KVH, S, D] before RoPE, from slot `first` on, turned to their slots in the
        pool's one-layer buffer (no cache-sized temporaries): [B, KVH, S - first, D]."""
        S = keys.shape[2]
        cos, sin = (t[first:S] for t in self.slot_rope)
        return apply_rope(keys[:, :, first:], cos, sin, out=self.pool.turned[:, :, :S - first])


class Engine:
    """One generation's state: the model, its pools and the policy. `rope_length` (the prompt's
    length) picks the RoPE frequencies for the whole generation."""

    def __init__(self, model: CausalLM, settings: Settings, capacity: int, rope_length: int):
        heads = model.retaining_heads
        if settings.policy == "locret" and (not heads or heads[0] is None):
            raise LocretError(NEEDS_HEADS)
        c, p = model.config, model.lm_head.weight
        self.ranking_layers = layer_slice(settings.shared_layers, len(c.global_layers))
        self.model, self.settings, self.rope_length = model, settings, rope_length
        compacts = turns_keys(settings)
        self.pool = KVPool(c, capacity, dtype=p.dtype, device=p.device, int8=settings.kv_int8,
                           turned_keys=compacts)
        slot_rope = (model.rope(torch.arange(capacity, device=p.device), p.dtype, rope_length)
                     if compacts else None)
        self.windows = self.window_pool(capacity) if c.has_windows else None
        policy = make_policy(settings.policy, settings.random_seed, settings.span)
        self.cache = PolicyCache(self.pool, policy, slot_rope, self.windows)
        self.evictions = 0

    def window_pool(self, capacity: int) -> WindowPool:
        c, p = self.model.config, self.model.lm_head.weight
        room = window_room(self.settings, capacity)
        slots = torch.arange(c.sliding_window - 1 + room, device=p.device)
        return WindowPool(c.sliding_layers, c.num_key_value_heads, c.head_dim, c.sliding_window,
                          room, self.model.rope(slots, p.dtype, local=True), p.dtype, p.device)

    @property
    def nbytes(self) -> int:
        """The pools' bytes."""
        return self.pool.nbytes + (self.windows.nbytes if self.windows else 0)

    @property
    def moves(self) -> int:
        """How often kept entries moved: evictions, and slides of the sliding-window layers."""
        return self.evictions + (self.windows.slides if self.windows else 0)

    def forward(self, tokens: list[int], scoring: bool, all_logits: bool = False) -> torch.Tensor:
        """Run `tokens` after everything in the pools; return the last token's logits [V]
        (every token's, [T, V], with `all_logits`). More tokens than the sliding-window layers
        have room for run in pieces."""
        step = self.windows.capacity - self.windows.keep if self.windows else len(tokens)
        logits = [self.forward_piece(tokens[i:i + step], scoring, all_logits)
                  for i in range(0, len(tokens), step)]
        return torch.cat(logits) if all_logits else logits[-1]

    def forward_piece(self, tokens: list[int], scoring: bool, all_logits: bool) -> torch.Tensor:
        pool, device = self.pool, self.pool.k.device
        start = pool.length if self.settings.positions == "compact" else pool.seen
        window, vocab = self.model.config.max_position_embeddings, self.model.config.vocab_size
        if max(tokens) >= vocab:
            raise LocretError(f"token id {max(tokens)} is beyond the model's vocabulary of "
                              f"{vocab}: tokenizer and weights do not belong together")
        if start + len(tokens) > window:
            fix = ("a smaller --budget or --chunk" if turns_keys(self.settings)
                   else "a policy that evicts, with --positions compact")
            raise LocretError(f"positions would go past the model's {window}-token context "
                              f"({start + len(tokens)} positions): use {fix}")
        if self.windows:
            self.windows.make_room(len(tokens))
        self.cache.scoring = scoring
        logits = self.model(torch.tensor([tokens], device=device),
                            torch.arange(start, start + len(tokens), device=device),
                            self.cache, last_only=not all_logits, rope_length=self.rope_length)
        pool.advance(len(tokens))
        if self.windows:
            self.windows.advance(len(tokens))
        return logits[0] if all_logits else logits[0, -1]

    @property
    def raw_keys(self) -> bool:
        """Whether the pool holds keys before RoPE, turned to their slots at each use."""
        return self.cache.slot_rope is not None and not self.cache.settled

    def settle_keys(self, turn: bool = True) -> None:
        """Turn the kept keys to their slots for good, where no eviction can move them again (the
        document is closed; decoding does not evict); each new key is then turned once, as it is
        written. An int8 pool keeps its keys before RoPE (turning them would round them again).
        `turn=False`: they already are (a saved context). Turned as each use turns them: the same
        values to the bit. The sliding-window layers keep only what a question can see, all their
        room free for it (their keys stay before RoPE)."""
        s, pool = self.settings, self.pool
        if self.windows:
            self.windows.make_room(self.windows.capacity - self.windows.keep)
        if not self.raw_keys or s.kv_int8 or s.evict_during_decode:
            return
        if turn:
            for layer in range(pool.k.shape[0]):
                keys = pool.k[layer, :, :, :pool.length]
                keys.copy_(self.cache.turn(keys, 0))
        self.cache.settled = True

    def mark(self) -> Mark:
        window_length = self.windows.length if self.windows else 0
        return Mark(self.pool.length, self.pool.seen, window_length, self.moves)

    def rewind(self, mark: Mark) -> None:
        """Drop what came after `mark`; nothing kept may have moved since."""
        if self.moves != mark.moves:
            raise LocretError("the cache moved on while answering (evictions while decoding, or "
                              "sliding-window layers past their room): it cannot be rewound")
        self.pool.length, self.pool.seen = mark.length, mark.seen
        if self.windows:
            self.windows.length = mark.window_length

    def evict(self, protect: bool = True) -> None:
        s = self.settings
        self.pool.evict(s.budget, s.stabilizers if protect else 0, s.eviction == "shared",
                        self.ranking_layers)
        self.evictions += 1

    def decode_step(self, token: int) -> torch.Tensor:
        s = self.settings
        if s.evict_during_decode and s.evicts and self.pool.length == self.pool.capacity:
            self.evict()
        return self.forward([token], scoring=s.evicts and s.evict_during_decode)
