"""The gather-based MoE layer against a plain NumPy mixture of experts."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from mlx_mixtral.model import moe
from mlx_mixtral.model.routing import route


def numpy_moe(x: np.ndarray, gate: np.ndarray, w_gate, w_up, w_down, top_k: int) -> np.ndarray:
    """transformers' recipe: softmax over all experts -> top-k -> renormalise -> weighted sum."""
    x = x.astype(np.float64)
    logits = x @ gate.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in np.ndindex(x.shape[:-1]):
        top = np.argsort(-probs[t])[:top_k]
        weights = probs[t][top] / probs[t][top].sum()
        for e, w in zip(top, weights, strict=True):
            g, u = w_gate[e] @ x[t], w_up[e] @ x[t]
            out[t] += w * (w_down[e] @ (g / (1 + np.exp(-g)) * u))
    return out


def weights_of(layer: moe.SparseMoE) -> list[np.ndarray]:
    mlp = layer.switch_mlp
    if isinstance(mlp.gate_proj, QuantizedSwitchLinear):
        def dense(q):
            return np.array(mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits))
    else:
        def dense(q):
            return np.array(q.weight)
    return [np.array(layer.gate.weight), dense(mlp.gate_proj), dense(mlp.up_proj),
            dense(mlp.down_proj)]


@pytest.mark.parametrize("experts, top_k", [(8, 2), (64, 6), (4, 4), (8, 1)])
@pytest.mark.parametrize("tokens", [1, 5, 40])  # 40 x top_k >= 64 takes the sorted path
def test_matches_numpy(experts, top_k, tokens):
    mx.random.seed(experts + top_k + tokens)
    layer = moe.SparseMoE(32, 48, experts, top_k)
    x = mx.random.normal((2, tokens, 32))
    got = np.array(layer(x))
    expected = numpy_moe(np.array(x), *weights_of(layer), top_k)
    assert np.abs(got - expected).max() < 1e-4


def test_sorted_and_unsorted_paths_agree(monkeypatch):
    mx.random.seed(3)
    layer = moe.SparseMoE(32, 48, 8, 2)
    x = mx.random.normal((3, 50, 32))
    sorted_out = np.array(layer(x))
    monkeypatch.setattr(moe, "SORT_THRESHOLD", 10**9)
    assert np.abs(np.array(layer(x)) - sorted_out).max() < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tokens", [1, 40])
def test_quantized_experts_use_gather_qmm(bits, tokens):
    mx.random.seed(bits)
    layer = moe.SparseMoE(64, 128, 8, 2)
    nn.quantize(layer, group_size=32, bits=bits,
                class_predicate=lambda p, m: isinstance(m, SwitchLinear))
    assert isinstance(layer.switch_mlp.up_proj, QuantizedSwitchLinear)
    x = mx.random.normal((1, tokens, 64))
    expected = numpy_moe(np.array(x), *weights_of(layer), 2)
    assert np.abs(np.array(layer(x)) - expected).max() < 1e-3


def test_router_equals_softmax_topk_renormalise():
    logits = mx.random.normal((100, 64), key=mx.random.key(7))
    indices, weights = route(logits, 6)
    p = np.array(mx.softmax(logits, axis=-1))
    top = np.argsort(-p, axis=-1)[:, :6]
    assert (np.sort(np.array(indices), -1) == np.sort(top, -1)).all()
    ref = np.take_along_axis(p, np.array(indices), -1)
    ref /= ref.sum(-1, keepdims=True)
    assert weights.dtype == mx.float32
    assert np.abs(np.array(weights) - ref).max() < 1e-6
