"""Building a Mixtral whose experts are paged from its safetensors files or its GGUF file
(`load(max_memory=)`).

Everything but the experts loads as usual (checkpoint.py's builder, lazy, then evaluated once).
The expert tensors are never handed to MLX: each MoE layer gets `plan.slots` empty expert
slots, in the dtypes the full model would have, and `ExpertFiles` (`GGUFExperts` for a GGUF)
fills them by byte range when the router asks.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..model.decoder import Model
from ..model.expert_cache import DEFAULT_READ_THREADS, ExpertPager, PagedMoE
from ..model.precision import loaded_dtype, target_dtype
from .checkpoint import build_model, sanitize, tensor_name
from .expert_files import ExpertFiles, is_expert_tensor
from .memory_plan import MemoryPlan
from .safetensors_file import read_safetensors
from .source import ModelSource

_STORED = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}


def _slot_float_dtype(source: ModelSource, dtype: str | mx.Dtype | None) -> mx.Dtype:
    """The dtype of the slots' float arrays: what the full model would load them as."""
    if source.format == "gguf":  # quantized experts, their scales float16 in the file
        return loaded_dtype(".switch_mlp.", mx.float16, True, target_dtype(dtype))
    experts = [t for t in source.tensors if is_expert_tensor(t.name)]
    quantized = any(t.name.endswith(".scales") for t in experts)
    sample = next((t for t in experts if t.dtype in _STORED), None)
    stored = _STORED[sample.dtype] if sample else mx.float16
    return loaded_dtype(sample.name if sample else ".switch_mlp.", stored, quantized,
                        target_dtype(dtype))


def _empty_slots(mlp: nn.Module, float_dtype: mx.Dtype) -> None:
    def zeros(a: mx.array) -> mx.array:
        kind = float_dtype if mx.issubdtype(a.dtype, mx.floating) else a.dtype
        return mx.zeros(a.shape, kind)

    mlp.update(tree_map(zeros, mlp.parameters()))


def build_paged(source: ModelSource, plan: MemoryPlan, dtype: str | mx.Dtype | None = None,
                policy: str = "lru", prefetch: bool = True,
                read_threads: int = DEFAULT_READ_THREADS, coalesce: bool = True
                ) -> tuple[Model, ExpertPager]:
    """A `Model` holding every weight but the experts, with `plan.slots` slots per layer, and
    the pager that fills them with `read_threads` readers (`coalesce`: adjacent ranges in one
    read)."""
    args = source.args
    if source.format == "gguf":
        from .gguf_weights import load_gguf_without_experts

        model = load_gguf_without_experts(source, plan.slots, dtype)
    else:
        lazy = read_safetensors(source.files)
        weights = sanitize({k: v for k, v in lazy.items() if not is_expert_tensor(k)}, args)
        del lazy  # the expert tensors were never read: nothing references them now
        experts = {tensor_name(t.name) for t in source.tensors if is_expert_tensor(t.name)}
        model = build_model(args, weights, source.quantization, str(source.path), dtype,
                            slots=plan.slots, stored=experts)
        del weights
    float_dtype = _slot_float_dtype(source, dtype)
    for layer in model.layers:
        _empty_slots(layer.block_sparse_moe.switch_mlp, float_dtype)
    mx.eval(model.parameters())
    mlps = [layer.block_sparse_moe.switch_mlp for layer in model.layers]
    if source.format == "gguf":
        from .gguf_experts import GGUFExperts

        files = GGUFExperts(source, mlps, args.num_local_experts, args.intermediate_size)
    else:
        files = ExpertFiles(source.files, mlps, args.num_local_experts,
                            args.intermediate_size, coalesce)
    pager = ExpertPager(args.num_local_experts, plan.slots,
                        [layer.block_sparse_moe.gate for layer in model.layers],
                        args.num_experts_per_tok, files, policy, prefetch, read_threads)
    for i, layer in enumerate(model.layers):
        moe = layer.block_sparse_moe
        layer.block_sparse_moe = PagedMoE(moe.gate, moe.switch_mlp, moe.top_k, i, pager)
    return model, pager
