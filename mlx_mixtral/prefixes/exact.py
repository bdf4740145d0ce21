"""Taking a prefix back as a run from nothing would have computed it, so that what follows is
that run's token for token.

With quantized KV (`--kv-bits`) that takes care: a run from nothing attends its first prefill
chunks to float keys (the cache is quantized once a chunk ends at `--quantized-kv-start` or
later) and the rest to quantized ones, so only quantized blocks are taken, and only from the
end of that float part on. Used by `generate` and the chat app.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..generation.kv import KVSettings
    from .store import PrefixStore


def float_part(kv: KVSettings, chunk: int) -> int:
    """Prompt positions a run from nothing computes with float keys in its cache: up to the
    end of the first prefill chunk after which the cache holds `kv.start` tokens or more."""
    if kv.bits is None:
        return 0
    chunks = max(1, -(-kv.start // chunk))
    return chunks * chunk


def take_as_computed(store: PrefixStore, ids: Sequence[int], fresh: Callable[[], list],
                     kv: KVSettings, chunk: int) -> tuple[list, int]:
    """(cache, n): a cache holding ids[:n] from the store, or `fresh()` and 0 when what it
    holds is not what a run from nothing prefilling in `chunk`s would hold there."""
    cache, n = store.take(ids, fresh, bits=kv.bits, group_size=kv.group_size)
    if n and kv.bits is not None and (cache[0].bits != kv.bits or n < float_part(kv, chunk)):
        return fresh(), 0  # computed as a run from nothing would
    return cache, n
