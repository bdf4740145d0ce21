"""MLX memory as one test sees it."""

from __future__ import annotations

import gc

import mlx.core as mx


def settled() -> int:
    """MLX's memory in use now, its peak reset: what earlier tests in this process still hold
    (their pagers' threads may keep slots alive), not counted against this test's budget."""
    gc.collect()
    mx.clear_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    return mx.get_active_memory()
