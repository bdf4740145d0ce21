"""Router analysis: recorded routing and the load-balancing loss, against transformers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import build_hf

from mlx_mixtral import RouterTrace, load_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral")
    ref = build_hf(folder, "mixtral", num_local_experts=8, num_experts_per_tok=2)
    return ref, load_model(folder)


def test_aux_loss_equals_transformers(pair, tokens):
    ref, ours = pair
    ids = tokens(2, 17)
    with torch.no_grad():
        out = ref(torch.tensor(ids), output_router_logits=True)
    trace = RouterTrace()
    logits = ours(mx.array(ids), router_trace=trace)
    assert np.abs(np.array(logits) - out.logits.numpy()).max() < 1e-4
    assert len(trace) == ref.config.num_hidden_layers
    loss = trace.load_balancing_loss(8, 2).item()
    assert abs(loss - out.aux_loss.item()) <= 1e-5


def test_trace_records_the_reference_choices(pair, tokens):
    ref, ours = pair
    ids = tokens(1, 12, seed=4)
    with torch.no_grad():
        router_logits = ref(torch.tensor(ids), output_router_logits=True).router_logits
    trace = RouterTrace()
    ours(mx.array(ids), router_trace=trace)
    for record, expected in zip(trace, router_logits, strict=True):
        expected_top = torch.topk(expected.float(), 2, dim=-1).indices.numpy()
        got = np.array(record.indices).reshape(-1, 2)
        assert (np.sort(got, -1) == np.sort(expected_top, -1)).all()
        assert np.allclose(np.array(record.weights).sum(-1), 1.0, atol=1e-6)
    counts = np.array(trace.expert_counts(8))
    assert counts.shape == (2, 8) and (counts.sum(1) == 12 * 2).all()


def test_trace_does_not_change_the_default_path(pair, tokens):
    _, ours = pair
    ids = mx.array(tokens(1, 9))
    plain = ours(ids)
    traced = ours(ids, router_trace=RouterTrace())
    assert np.array_equal(np.array(plain), np.array(traced))
