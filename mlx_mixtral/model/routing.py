"""The MoE router and what can be learned from it: chosen experts, weights, load balance."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


def route(gate_logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Top-k experts per token and their weights, in float32.

    Softmax over the k largest logits equals transformers' softmax -> top-k -> renormalise
    (the softmax denominator cancels), at a fraction of the work.
    """
    logits = gate_logits.astype(mx.float32)
    indices = mx.stop_gradient(mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
    return indices, weights


@dataclass
class RouterRecord:
    """One MoE layer's routing for one forward pass."""

    gate_logits: mx.array  # (..., experts) float32
    indices: mx.array  # (..., top_k)
    weights: mx.array  # (..., top_k)


class RouterTrace(list):
    """Per-layer `RouterRecord`s, filled when passed to `Model.__call__(router_trace=...)`."""

    def expert_counts(self, num_experts: int) -> mx.array:
        """(layers, experts): how many tokens chose each expert."""
        rows = [
            (r.indices.reshape(-1)[:, None] == mx.arange(num_experts)[None]).sum(axis=0)
            for r in self
        ]
        return mx.stack(rows)

    def load_balancing_loss(self, num_experts: int, top_k: int) -> mx.array:
        return load_balancing_loss([r.gate_logits for r in self], num_experts, top_k)


def load_balancing_loss(gate_logits: list[mx.array], num_experts: int, top_k: int) -> mx.array:
    """Switch-Transformer auxiliary loss, as transformers' `load_balancing_loss_func`.

    Over all layers' tokens: num_experts * sum_e (share of top-k slots routed to e) *
    (mean router probability of e). 1.0 means perfectly balanced.
    """
    logits = mx.concatenate([g.reshape(-1, num_experts) for g in gate_logits], axis=0)
    probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    chosen = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k]
    one_hot = chosen[..., None] == mx.arange(num_experts)  # (tokens, k, experts)
    tokens_per_expert = one_hot.astype(mx.float32).mean(axis=0)  # (k, experts)
    prob_per_expert = probs.mean(axis=0)  # (experts,)
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts
