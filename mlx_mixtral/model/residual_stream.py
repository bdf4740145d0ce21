"""How much each layer changes the residual stream: the cosine between consecutive layers'
inputs.

The expert prefetch guesses a layer's experts from the previous layer's input, which works as
far as consecutive inputs point the same way. Trained models change the stream little per
layer; random-weight test models much more, so this is what makes a test model realistic
(bench.py's `mixtral-realistic`, tests/test_realistic_model.py).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .masks import windowed_mask


def layer_inputs(model: Any, tokens: list[int]) -> list[mx.array]:
    """The hidden states entering each layer for `tokens` (one uncached pass), float32,
    (length, hidden) each."""
    h = model.model.embed_tokens(mx.array([tokens]))
    length = h.shape[1]
    mask = windowed_mask(0, length, 0, length, model.args.sliding_window)
    out = []
    for layer in model.layers:
        out.append(h[0].astype(mx.float32))
        h = layer(h, mask, None)
    mx.eval(out)
    return out


def consecutive_cosines(model: Any, tokens: list[int]) -> list[float]:
    """Per pair of consecutive layers (l, l + 1), the cosine between their inputs, averaged
    over the tokens."""
    inputs = layer_inputs(model, tokens)

    def cosine(a: mx.array, b: mx.array) -> float:
        dots = (a * b).sum(-1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1))
        return dots.mean().item()

    return [cosine(a, b) for a, b in zip(inputs[:-1], inputs[1:], strict=True)]
