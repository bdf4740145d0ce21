"""The rolling KV cache: bounded memory, exact masks, trimming before and after a wrap."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_mixtral import FullKVCache, Model, ModelArgs, RollingKVCache
from mlx_mixtral.model.masks import window_mask

W = 16
ARGS = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            sliding_window=W, rope_theta=10000.0)


def make_model(layers: int) -> Model:
    mx.random.seed(0)
    m = Model(ModelArgs.from_dict({**ARGS, "num_hidden_layers": layers}))
    m.update(tree_map(lambda p: p * 3, m.parameters()))  # peaked attention
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def model():
    return make_model(2)


def ids(length: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.RandomState(seed).randint(0, 64, (1, length)))


def cache_bytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def decode(model, cache, tokens: mx.array) -> np.ndarray:
    return np.concatenate(
        [np.array(model(tokens[:, i:i + 1], cache=cache)) for i in range(tokens.shape[1])], 1
    )


@pytest.mark.parametrize("q_start, n_q, k_start, n_k, window", [
    (0, 7, 0, 7, 3), (5, 4, 2, 7, 3), (10, 1, 0, 11, 4), (3, 5, 0, 8, None), (9, 1, 0, 10, None),
])
def test_window_mask_is_i_minus_w_lt_j_le_i(q_start, n_q, k_start, n_k, window):
    mask = window_mask(q_start, n_q, k_start, n_k, window)
    expected = np.array([[j <= i and (window is None or j > i - window)
                          for j in range(k_start, k_start + n_k)]
                         for i in range(q_start, q_start + n_q)])
    if mask is None:
        assert expected.all()
    elif isinstance(mask, str):
        assert mask == "causal" and n_k - k_start >= 0
        assert (expected == np.tril(np.ones((n_q, n_k), bool), n_k - n_q)).all()
    else:
        assert (np.array(mask) == expected).all()


def test_memory_stops_at_the_window(model):
    one = model.make_cache()
    model(ids(1), cache=one)
    decode(model, one, ids(W - 1, 1))
    mx.eval([c.state for c in one])
    at_window = cache_bytes(one)

    decode(model, one, ids(3 * W, 2))  # now at 4x the window
    assert one[0].offset == 4 * W
    assert cache_bytes(one) == at_window

    chunked = model.make_cache()
    for start in range(0, 4 * W, 5):  # chunked prefill of 4x the window
        model(ids(4 * W, 3)[:, start:start + 5], cache=chunked)
    assert chunked[0].offset == 4 * W
    assert cache_bytes(chunked) == at_window
    assert all(c.keys.shape[2] == W for c in chunked)


def test_full_cache_grows(model):
    cache = [FullKVCache() for _ in model.layers]
    model(ids(300), cache=cache)
    assert cache[0].offset == 300 and cache[0].keys.shape[2] >= 300


def test_trim_before_wrap_is_exact(model):
    seq = ids(W - 2, 4)
    full = np.array(model(seq))
    cache = model.make_cache()
    model(seq[:, :10], cache=cache)
    assert all(c.trim(4) == 4 for c in cache)  # back to 6 positions
    got = decode(model, cache, seq[:, 6:])
    assert np.abs(got - full[:, 6:]).max() < 1e-4


def test_trim_after_wrap_attends_only_to_what_is_left():
    # 3W positions seen, trim 5: positions 2W .. 3W-6 remain (W-5 keys); trimmed slots must be
    # masked out. With one layer a cached key depends on its token alone, and attention is
    # invariant to a common position shift (RoPE is relative), so the result equals running
    # just the surviving tokens from position 0.
    model = make_model(1)
    seq = ids(3 * W + 6, 5)
    cache = model.make_cache()
    model(seq[:, : 3 * W], cache=cache)
    for c in cache:
        c.trim(5)
    assert cache[0].offset == 3 * W - 5 and not cache[0].complete
    cont = mx.concatenate([seq[:, : 3 * W - 5], seq[:, 3 * W:]], axis=1)  # new tokens after
    got = decode(model, cache, cont[:, 3 * W - 5:])
    survivors = cont[:, 2 * W:]
    expected = np.array(model(survivors))[:, W - 5:]
    assert np.abs(got - expected).max() < 1e-4


def test_complete_again_after_a_window():
    cache = RollingKVCache(4)
    k = mx.zeros((1, 1, 10, 2))
    cache.update_and_fetch(k, k)
    cache.trim(2)
    assert not cache.complete
    for _ in range(3):
        cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert cache.complete
