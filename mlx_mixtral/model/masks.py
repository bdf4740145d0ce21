"""Which keys each query may see: causal, sliding-window, and long chunks in blocks.

A query at position i sees the key at position j iff i - window < j <= i (Mistral's sliding
window; without a window, j <= i).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class WindowBand:
    """The sliding-window mask of a chunk longer than the window, kept as a description.

    One masked product over all keys would score every query against window + chunk keys;
    attention instead runs it in blocks of a quarter window of queries, each against only the
    keys its queries can reach (1.25 windows), a fraction of the work on long prompts."""

    q_start: int  # position of the first query
    k_start: int  # position of the first key
    window: int

    @staticmethod
    def block_size(window: int) -> int:
        # Smaller blocks score fewer keys but run more (small) kernels. On the CPU backend, for
        # 512-query chunks and a window of 256, attention took 5.2 s (one masked product),
        # 2.6 s (blocks of 128) and 2.3 s (blocks of 64) over a 4096-token prompt.
        return max(1, window // 4)

    def blocks(self, num_queries: int) -> Iterator[tuple[slice, slice, Mask]]:
        """(query slice, key slice, mask) per block of queries."""
        size = self.block_size(self.window)
        for a in range(0, num_queries, size):
            n = min(size, num_queries - a)
            first = self.q_start + a
            lo = max(self.k_start, first - self.window + 1)
            keys = slice(lo - self.k_start, first + n - self.k_start)
            yield slice(a, a + n), keys, window_mask(first, n, lo, first + n - lo, self.window)


Mask = mx.array | str | WindowBand | None


def windowed_mask(q_start: int, num_queries: int, k_start: int, num_keys: int,
                  window: int | None) -> Mask:
    """`window_mask`, or a `WindowBand` when the chunk spans two blocks or more."""
    if window is not None and num_queries >= 2 * WindowBand.block_size(window):
        return WindowBand(q_start, k_start, window)
    return window_mask(q_start, num_queries, k_start, num_keys, window)


def window_mask(q_start: int, num_queries: int, k_start: int, num_keys: int,
                window: int | None) -> Mask:
    """Boolean mask: query at position i sees key at position j iff i - window < j <= i.

    Queries hold positions q_start.., keys k_start.. (both contiguous). Returns None when every
    query sees every key, and "causal" when plain lower-right causality is the whole story.
    """
    q_end, k_end = q_start + num_queries - 1, k_start + num_keys - 1
    sees_all_past = window is None or q_end - window < k_start
    if sees_all_past and k_end <= q_start:
        return None
    if sees_all_past and k_end == q_end:
        return "causal"
    q = mx.arange(q_start, q_start + num_queries)[:, None]
    k = mx.arange(k_start, k_start + num_keys)[None]
    visible = k <= q
    if window is not None:
        visible = visible & (k > q - window)
    return visible
