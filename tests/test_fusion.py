"""Fused q/k/v and expert gate/up projections compute exactly what the separate ones do."""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_mixtral import Model, ModelArgs
from mlx_mixtral.model.fusion import fuse_linears

ARGS = dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=8, num_experts_per_tok=2)


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("length", [1, 40])  # decode, and the sorted prefill path
def test_fused_model_equals_unfused(bits, length):
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(ARGS))
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    fused = copy.deepcopy(model).fuse()
    layer = fused.layers[0]
    assert "qkv_proj" in layer.self_attn and "q_proj" not in layer.self_attn
    assert "gate_up_proj" in layer.block_sparse_moe.switch_mlp
    tokens = mx.array(np.random.RandomState(1).randint(0, 128, (2, length)))
    expected, got = np.array(model(tokens)), np.array(fused(tokens))
    assert np.abs(expected - got).max() <= 1e-5


def test_mixed_precisions_stay_unfused():
    a, b = nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)
    qa = a.to_quantized(group_size=32, bits=4)
    qb = b.to_quantized(group_size=32, bits=8)
    assert fuse_linears([qa, qb]) is None
    assert fuse_linears([a, qa]) is None
    assert fuse_linears([a, b]).weight.shape == (64, 64)
