"""Router analysis: recorded routing and the load-balancing loss, against transformers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import Numbers, build_hf

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


def test_even_routing_scores_top_k_as_the_panel_says():
    """Perfectly even top-2 routing gives a load-balancing loss of 2.00, which is what the
    experts panel calls even."""
    import mlx.core as mx

    from mlx_mixtral.app.widgets import ExpertsPanel
    from mlx_mixtral.model.routing import load_balancing_loss

    experts, top_k = 8, 2
    logits = mx.zeros((64, experts))  # every expert equally likely: the even case
    loss = load_balancing_loss([logits], experts, top_k).item()
    assert abs(loss - top_k) < 1e-5
    panel = ExpertsPanel()
    shown = []
    panel.update = lambda text: shown.append(str(text))
    panel.show([[0.25] * experts], loss, top_k)
    assert "load balance 2.00 (2.00 = even)" in shown[-1]


@pytest.mark.parametrize("drafted", [False, True], ids=["plain", "drafted"])
def test_a_reply_records_its_routing_through_the_model_call(pair, drafted):
    """`stream_generate(router_trace=)` hands the trace to the model's own call (no wrapper
    around the model): every forward pass, prefill and decode, records each layer's routing,
    and the tokens are those of an untraced reply."""
    from mlx_mixtral.generation.speculative import LookupDrafter
    from mlx_mixtral.generation.stream import stream_generate

    _, ours = pair
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]

    def reply(trace):
        draft = LookupDrafter(2) if drafted else None
        *chunks, stats = stream_generate(ours, Numbers(), prompt, max_tokens=6, temperature=0,
                                         draft=draft, router_trace=trace)
        return stats.tokens

    trace = RouterTrace()
    assert reply(trace) == reply(None)
    layers = ours.args.num_hidden_layers
    assert len(trace) % layers == 0 and len(trace) >= 2 * layers
    first_layer = trace[::layers]
    routed = sum(int(np.prod(r.indices.shape[:-1])) for r in first_layer)
    assert routed >= len(prompt) + 5  # the prompt, and every token decoded after the first
