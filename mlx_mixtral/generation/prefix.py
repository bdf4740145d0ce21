"""Reusing a KV cache for a new token sequence: keep the longest common prefix, trim the rest.

A rolling cache that wrapped cannot bring back what it overwrote: when a trim reaches behind
what it still holds, the cache is rebuilt from nothing instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def copy_cache(cache: list) -> list:
    """A cache of one's own holding the same tokens (MLX arrays are values: writing into the
    copy never changes the original)."""
    # Ours keep positions in meta_state; mlx-lm's caches keep everything in state.
    return [type(c).from_state(c.state, c.meta_state) if hasattr(c, "meta_state")
            else type(c).from_state(c.state) for c in cache]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reuse_prefix(cache: list, cached: Sequence[int], ids: Sequence[int],
                 fresh: Callable[[], list]) -> tuple[list, int]:
    """(cache, n): `cache` trimmed to its first n positions, which equal ids[:n]; n stays below
    len(ids), so at least one token is left to run (its logits are needed). `cached` are the
    ids whose keys and values the cache holds; `fresh()` makes an empty cache."""
    common = min(common_prefix(cached, ids), len(ids) - 1)
    held = cache[0].offset if cache else 0
    if common < held:
        for c in cache:
            c.trim(held - common)
        if not all(getattr(c, "complete", True) for c in cache):
            return fresh(), 0  # lost to the window: rebuild
    return cache, common
