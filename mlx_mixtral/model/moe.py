"""Sparse mixture of experts: a float32 router and mlx-lm's switch layers.

The expert projections are mlx-lm's `SwitchLinear` / `QuantizedSwitchLinear` (stacked
`[experts, out, in]` weights computed with `mx.gather_mm` / `mx.gather_qmm`) inside its
`SwitchGLU`, which sorts (token, expert) pairs by expert for long inputs. Added here: the
router in float32, the gate and up projections fused into one gathered matmul after loading,
and the expert dtype the CPU backend needs. Module and parameter names follow mlx-lm
(`block_sparse_moe.gate`, `switch_mlp.gate_proj` ...), so its folders load as they are.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, _gather_sort, _scatter_unsort

from .fusion import fuse_linears
from .routing import RouterRecord, route

# mlx-lm's SwitchGLU sorts from this many (token, expert) pairs on; the fused path matches it.
SORT_THRESHOLD = 64


class ExpertsGLU(SwitchGLU):
    """mlx-lm's `SwitchGLU`, plus `fuse()`: gate and up as one gathered matmul."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int) -> None:
        super().__init__(hidden, intermediate, num_experts, bias=False)

    def fuse(self) -> None:
        fused = fuse_linears([self.gate_proj, self.up_proj], axis=1)
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    @property
    def compute_dtype(self) -> mx.Dtype | None:
        """The dtype unquantized experts compute in (None for quantized ones)."""
        # (not .get: its default would be looked up, and fails, when fused)
        proj = self["gate_up_proj"] if "gate_up_proj" in self else self.gate_proj  # noqa: SIM401
        return None if hasattr(proj, "bits") else proj.weight.dtype

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        if "gate_up_proj" not in self:
            return super().__call__(x, indices)
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= SORT_THRESHOLD
        idx, inverse = indices, None
        if do_sort:
            x, idx, inverse = _gather_sort(x, indices)
        gate, up = mx.split(self.gate_up_proj(x, idx, sorted_indices=do_sort), 2, axis=-1)
        y = self.down_proj(self.activation(up, gate), idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inverse, indices.shape)
        return y.squeeze(-2)


class SparseMoE(nn.Module):
    """Router plus experts: each token's output is the weighted sum of its top-k experts."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.switch_mlp = ExpertsGLU(hidden, intermediate, num_experts)
        self.group: mx.distributed.Group | None = None  # tensor parallel: experts hold 1/N

    def __call__(self, x: mx.array, trace: list | None = None) -> mx.array:
        gate_logits = self.gate(x)
        indices, weights = route(gate_logits, self.top_k)
        if trace is not None:
            trace.append(RouterRecord(gate_logits.astype(mx.float32), indices, weights))
        # Unquantized experts may be kept in float32 (gather_mm on the CPU backend takes
        # nothing else); the input follows them, and the output returns to the model's dtype.
        expert_dtype = self.switch_mlp.compute_dtype
        y = self.switch_mlp(x if expert_dtype is None else x.astype(expert_dtype), indices)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        if self.group is not None:  # each rank computed its slice of every expert
            y = mx.distributed.all_sum(y, group=self.group)
        return y.astype(x.dtype)
