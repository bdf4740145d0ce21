"""Our logits equal transformers' (torch CPU, float32) on tiny random models."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf, hf_logits

from mlx_mixtral import RollingKVCache, load_model

TOL = 1e-4
WINDOW = 8

CASES = {
    "a-mistral-window": ("mistral", dict(sliding_window=WINDOW)),
    "b-mixtral-8x2": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2,
                                      sliding_window=WINDOW)),
    "c-moe-64x6": ("mixtral", dict(num_local_experts=64, num_experts_per_tok=6,
                                   intermediate_size=32)),
    "d-tied": ("mistral", dict(tie_word_embeddings=True, sliding_window=WINDOW)),
    "e-head-dim": ("mixtral", dict(head_dim=24, sliding_window=WINDOW)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = build_hf(folder, model_type, **overrides)
    return ref, load_model(folder)


def test_loaded_config(pair):
    ref, ours = pair
    cfg = ref.config
    assert ours.args.sliding_window == cfg.sliding_window
    assert ours.args.head_dim == (cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads)
    assert ours.args.tie_word_embeddings == cfg.tie_word_embeddings


def test_whole_prompt(pair, tokens):
    ref, ours = pair
    ids = tokens(2, 3 * WINDOW)  # prompt longer than the window, batch of 2
    expected = hf_logits(ref, ids)
    got = np.array(ours(mx.array(ids)))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


def test_token_by_token_to_three_windows(pair, tokens):
    ref, ours = pair
    ids = tokens(2, 3 * WINDOW + 2, seed=2)
    expected = hf_logits(ref, ids)
    cache = ours.make_cache()
    if ours.args.sliding_window:
        assert all(isinstance(c, RollingKVCache) for c in cache)
    got = np.concatenate(
        [np.array(ours(mx.array(ids[:, i:i + 1]), cache=cache)) for i in range(ids.shape[1])],
        axis=1,
    )
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("chunk", [3, WINDOW, 2 * WINDOW + 1])
def test_chunked_prefill_then_decode(pair, tokens, chunk):
    ref, ours = pair
    ids = tokens(2, 4 * WINDOW, seed=3)
    expected = hf_logits(ref, ids)
    cache = ours.make_cache()
    prompt = 3 * WINDOW + 1
    parts = [np.array(ours(mx.array(ids[:, s:min(s + chunk, prompt)]), cache=cache))
             for s in range(0, prompt, chunk)]
    parts += [np.array(ours(mx.array(ids[:, i:i + 1]), cache=cache))
              for i in range(prompt, ids.shape[1])]
    got = np.concatenate(parts, axis=1)
    assert np.abs(got - expected).max() <= TOL
