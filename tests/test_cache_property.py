"""Random prefill / decode / trim sequences on the rolling cache against a brute-force window."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_mixtral import RollingKVCache
from mlx_mixtral.model.attention import attend

D = 4

operations = st.lists(
    st.one_of(
        st.tuples(st.just("feed"), st.integers(1, 13)),
        st.tuples(st.just("trim"), st.integers(0, 9)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 9), ops=operations, seed=st.integers(0, 2**16))
def test_rolling_cache_equals_brute_force(window, ops, seed):
    rng = np.random.RandomState(seed)
    cache = RollingKVCache(window)
    alive: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # position -> (key, value)
    offset = 0
    for op, n in ops:
        if op == "trim":
            n = cache.trim(n)
            offset -= n
            alive = {p: kv for p, kv in alive.items() if p < offset}
            continue
        q, k, v = (rng.randn(1, 1, n, D).astype(np.float32) for _ in range(3))
        mask = cache.make_mask(n)
        keys, values = cache.update_and_fetch(mx.array(k), mx.array(v))
        got = np.array(attend(mx.array(q), keys, values, 1.0, mask))
        for i in range(n):
            alive[offset + i] = (k[0, 0, i], v[0, 0, i])
        for i in range(n):
            p = offset + i
            seen = [alive[j] for j in sorted(alive) if p - window < j <= p]
            ks, vs = np.stack([s[0] for s in seen]), np.stack([s[1] for s in seen])
            scores = ks @ q[0, 0, i]
            weights = np.exp(scores - scores.max())
            expected = (weights / weights.sum()) @ vs
            assert np.abs(got[0, 0, i] - expected).max() < 1e-4
        offset += n
        # what the cache can still hold: the last `window` positions
        alive = {p: kv for p, kv in alive.items() if p >= offset - window}
        assert cache.offset == offset
        assert cache.keys.shape[2] <= window
