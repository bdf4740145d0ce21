"""The server's pool of KV caches: a conversation keeps its cache while other requests that
share only its beginning get copies, and the pool stays within its byte budget."""

from __future__ import annotations

import mlx.core as mx

from mlx_mixtral.model.cache import FullKVCache
from mlx_mixtral.server.cache_pool import CachePool, cache_bytes


def filled(tokens: list[int]) -> list:
    """A one-layer cache whose keys at each position are that position's token id."""
    cache = [FullKVCache()]
    x = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
    cache[0].update_and_fetch(x, x)
    return cache


def held(cache: list) -> list[int]:
    keys, _ = cache[0].state
    return [int(v) for v in keys.reshape(-1).tolist()]


def test_a_continuation_takes_the_entry_and_a_sharer_gets_a_copy():
    pool = CachePool(budget=10**6)
    system, a = [1, 2, 3], [10, 11, 12]
    pool.give(system + a, filled(system + a))
    # Another conversation with the same system prompt: a copy of the shared part.
    cache, n = pool.take(system + [20, 21], lambda: [FullKVCache()])
    assert n == 3 and held(cache) == system
    cache[0].update_and_fetch(*(mx.full((1, 1, 2, 1), 7.0),) * 2)  # it generates on
    assert len(pool.entries) == 1  # A's entry stayed, untouched
    mine, n = pool.take(system + a + [13], lambda: [FullKVCache()])
    assert n == 6 and held(mine) == system + a and not pool.entries  # A's next turn: all of it


def test_the_pool_keeps_within_its_budget_least_recently_used_first():
    one = cache_bytes(filled(list(range(100))))
    pool = CachePool(budget=int(2.5 * one))
    for start in (1000, 2000, 3000):
        pool.give(list(range(start, start + 100)), filled(list(range(start, start + 100))))
    assert pool.nbytes <= pool.budget and len(pool.entries) == 2
    assert [e.tokens[0] for e in pool.entries.values()] == [2000, 3000]
    pool.give([5], filled([5] * (10**4)))  # larger than the whole budget: not kept
    assert [e.tokens[0] for e in pool.entries.values()] == [2000, 3000]
