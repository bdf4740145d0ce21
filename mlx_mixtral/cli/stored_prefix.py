"""`generate` and the prefix store: the prompt's longest stored beginning is taken back instead
of prefilled, and the prompt's blocks are given to the store for the next run.

A reply from the store is the reply of a run from nothing (prefixes/exact.py says how, with
quantized KV). (Drafted decoding prefills all in float and quantizes later: `generate` keeps the
store off when it is combined with --kv-bits.)

Imported only when the store is used (it imports MLX and the caches): `generate` starts fast.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..prefixes.exact import take_as_computed
from ..prefixes.settings import StoreSettings, open_store

if TYPE_CHECKING:
    from ..generation.kv import KVSettings
    from ..generation.stats import Progress
    from ..model.decoder import Model
    from ..prefixes.store import PrefixStore


def take_prefix(store: PrefixStore, model: Model, ids: Sequence[int], kv: KVSettings,
                slack: int) -> tuple[list, int]:
    """(cache, n): a cache holding ids[:n] from the store, or a new one and 0. `slack`:
    positions a rolling cache keeps for rejected drafts (a restored cache has them too)."""
    from ..generation.stream import prefill_chunk

    def fresh() -> list:
        return model.make_cache(slack=slack)

    return take_as_computed(store, ids, fresh, kv, prefill_chunk(model))


def start_from_store(model: Model, settings: StoreSettings, name: str, ids: Sequence[int],
                     kv: KVSettings, slack: int) -> tuple[PrefixStore, list, int]:
    """(store, cache, n): the model's store (`name`: how `mlx-mixtral cache` shows it) and a
    cache holding ids[:n] from it, said on stderr with the time it took."""
    store = open_store(model, settings, name)
    took = time.perf_counter()
    cache, n = take_prefix(store, model, ids, kv, slack)
    if len(ids) > store.block:  # (a shorter prompt has no block to take or keep)
        print(f"Prefix store: {n} of {len(ids)} prompt tokens reused "
              f"({time.perf_counter() - took:.2f} s)", file=sys.stderr)
    return store, cache, n


def giver(store: PrefixStore, ids: Sequence[int], cache: list) -> Progress | None:
    """For a sliding-window cache, a prefill-progress callback giving its complete prompt
    blocks to the store after each chunk: it holds only its last window, so the blocks behind
    it are kept before the window moves past them. (A full cache is given once, after the
    reply: None.)"""
    if not any(getattr(layer, "window", None) for layer in cache):
        return None

    def give(done: int, total: int) -> None:
        if 0 < done < total:
            store.give(ids, cache)

    return give
