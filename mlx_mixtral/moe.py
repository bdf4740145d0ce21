"""Sparse mixture of experts with stacked expert weights and gathered matmuls.

Each expert projection is one `[experts, out, in]` tensor; `mx.gather_mm` / `mx.gather_qmm`
pick each token's experts inside the kernel, so there is no Python loop over experts or tokens.
Module and parameter names follow mlx-lm (`block_sparse_moe.gate`, `switch_mlp.gate_proj` ...),
so mlx-lm folders load as they are and ours load in mlx-lm.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu  # silu(gate) * up as one compiled kernel

from .fusion import fuse_linears
from .routing import RouterRecord, route

# With this many (token, expert) pairs or more, sort them by expert first: each expert's
# weights are then read once per run of tokens instead of once per token.
SORT_THRESHOLD = 64


class ExpertLinear(nn.Module):
    """A bias-free linear layer per expert, weights stacked as `[experts, out, in]`."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int) -> None:
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine",
                     **_: object) -> QuantizedExpertLinear:
        return QuantizedExpertLinear.from_float(self, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    """`ExpertLinear` with quantized weights, computed with `mx.gather_qmm`."""

    def __init__(self, weight: mx.array, group_size: int = 64, bits: int = 4,
                 mode: str = "affine") -> None:
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    @classmethod
    def from_float(cls, layer: ExpertLinear, group_size: int, bits: int,
                   mode: str) -> QuantizedExpertLinear:
        return cls(layer.weight, group_size, bits, mode)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"),
            rhs_indices=indices, transpose=True, group_size=self.group_size, bits=self.bits,
            mode=self.mode, sorted_indices=sorted_indices,
        )


def _sort_by_expert(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Flatten (token, expert) pairs and order them by expert."""
    top_k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // top_k], flat[order], mx.argsort(order)


class ExpertsGLU(nn.Module):
    """The experts' SwiGLU MLPs: down(silu(gate(x)) * up(x)), for each token's top-k experts."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int) -> None:
        super().__init__()
        self.gate_proj = ExpertLinear(hidden, intermediate, num_experts)
        self.up_proj = ExpertLinear(hidden, intermediate, num_experts)
        self.down_proj = ExpertLinear(intermediate, hidden, num_experts)

    def fuse(self) -> None:
        """Compute every expert's gate and up projections with one gathered matmul."""
        fused = fuse_linears([self.gate_proj, self.up_proj], axis=1)
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x: (..., hidden), indices: (..., k) -> (..., k, hidden)."""
        x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, hidden): one row per gathered matmul
        do_sort = indices.size >= SORT_THRESHOLD
        idx = indices
        if do_sort:
            x, idx, inverse = _sort_by_expert(x, indices)
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x, idx, do_sort), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x, idx, do_sort), self.up_proj(x, idx, do_sort)
        h = swiglu(gate, up)
        y = self.down_proj(h, idx, do_sort)
        if do_sort:
            y = y[inverse].reshape(*indices.shape, 1, y.shape[-1])
        return y.squeeze(-2)


class SparseMoE(nn.Module):
    """Router plus experts: each token's output is the weighted sum of its top-k experts."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.switch_mlp = ExpertsGLU(hidden, intermediate, num_experts)

    def __call__(self, x: mx.array, trace: list | None = None) -> mx.array:
        gate_logits = self.gate(x)
        indices, weights = route(gate_logits, self.top_k)
        if trace is not None:
            trace.append(RouterRecord(gate_logits.astype(mx.float32), indices, weights))
        y = self.switch_mlp(x, indices)
        return (y * weights[..., None]).sum(axis=-2).astype(x.dtype)
