"""Fusing projections that read the same input: q/k/v, and each expert's gate/up.

One (quantized) matmul over concatenated rows replaces two or three, so a decode step runs
fewer kernels; the arithmetic is the same. Rows are independent in MLX's quantized layout (the
groups run along the input dimension), so quantized weights, scales and biases concatenate as
they are. Layers of different precision (GGUF Q4_K_M mixes them) are left unfused.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _spec(layer: nn.Module) -> tuple:
    return (type(layer), getattr(layer, "bits", None), getattr(layer, "group_size", None),
            getattr(layer, "mode", None), "biases" in layer, "bias" in layer)


def fuse_linears(layers: list[nn.Module], axis: int = 0) -> nn.Module | None:
    """One layer computing `layers` side by side (outputs concatenated), or None if their
    kinds or precisions differ. `axis` is the output axis of the weights (1 for experts)."""
    first = layers[0]
    if any(_spec(layer) != _spec(first) for layer in layers) or "bias" in first:
        return None
    fused = first.__class__.__new__(first.__class__)
    nn.Module.__init__(fused)
    for key, value in first.items():
        if isinstance(value, mx.array):
            fused[key] = mx.concatenate([layer[key] for layer in layers], axis=axis)
        else:
            fused[key] = value
    for name, value in vars(first).items():  # plain attributes: bits, a sharded one's group
        setattr(fused, name, value)
    if not first.trainable_parameters():
        fused.freeze()
    return fused
