"""KV caches kept between requests, so the next turn of a conversation prefills only what is new:
the server's keeper under `mlx.launch`, whose ranks must agree on every hit (one process keeps
prompts in the prefix store, `prefixes/store.py`, instead).

Each entry is a cache and the token ids it holds. A request that continues an entry (it starts
with all of the entry's tokens: the next turn of that conversation) takes the entry out of the
pool, so nobody else touches it while it generates. A request that shares only part of an entry
(another conversation with the same system prompt) gets a copy of that part and leaves the
entry for its own conversation. Afterwards the cache comes back holding prompt + reply. Entries
are evicted least recently used first until the pool's bytes fit its budget, so the server's
memory stays bounded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..generation.kv import PROMPT_CACHE_BYTES
from ..generation.prefix import common_prefix, copy_cache, reuse_prefix


def cache_bytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


@dataclass
class Entry:
    tokens: list[int]
    cache: list
    nbytes: int


class CachePool:
    """`measure(cache)` gives a cache's bytes. Ranks that run in lockstep measure alike (their
    largest), so that they keep and evict the same entries."""

    def __init__(self, budget: int = PROMPT_CACHE_BYTES,
                 measure: Callable[[list], int] = cache_bytes) -> None:
        self.budget, self.measure = budget, measure
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.lock = threading.Lock()
        self._next = 0
        self.evicted = 0  # entries dropped to keep within the budget

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def take(self, ids: Sequence[int], fresh: Callable[[], list]) -> tuple[list, int]:
        """(cache, n): the pool's best cache for `ids`, now owned by the caller and trimmed to
        its first n tokens, which equal ids[:n] (n < len(ids)); or a fresh cache and 0."""
        with self.lock:
            best, length = None, 0
            for key, entry in self.entries.items():
                n = common_prefix(entry.tokens, ids)
                if n > length:
                    best, length = key, n
            if best is None:
                return fresh(), 0
            entry = self.entries[best]
            if length == len(entry.tokens):
                del self.entries[best]
                cache = entry.cache
            else:
                self.entries.move_to_end(best)  # just used
                cache = copy_cache(entry.cache)
        return reuse_prefix(cache, entry.tokens, ids, fresh)

    def give(self, tokens: Sequence[int], cache: list) -> None:
        """Keep `cache` (holding `tokens`); evict the least recently used beyond the budget.
        An entry that another one extends is dropped: the longer one serves both."""
        nbytes = self.measure(cache)
        if not tokens or nbytes > self.budget:
            return
        with self.lock:
            for key in [k for k, e in self.entries.items()
                        if common_prefix(e.tokens, tokens) == len(e.tokens)]:
                del self.entries[key]
            self.entries[self._next] = Entry(list(tokens), cache, nbytes)
            self._next += 1
            while self.nbytes > self.budget:
                self.entries.popitem(last=False)
                self.evicted += 1

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
