"""The one place that decides which dtype a loaded model computes in, per backend.

- Asked for a dtype (`load(..., dtype=)`): every float tensor takes it, quantization scales
  included, and activations and logits follow.
- Not asked, on the CPU backend: float32. Half-precision activations make quantized matmuls
  about 8x slower there, and float16 scales about 30x.
- Not asked, on Metal: the checkpoint's own dtype.
- Always, on the CPU backend: unquantized expert weights stay float32, because `gather_mm`
  accepts nothing else there (`gather_qmm`, for quantized experts, takes any float dtype).
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import ConfigError

DTYPES: dict[str, mx.Dtype] = {"float32": mx.float32, "float16": mx.float16,
                               "bfloat16": mx.bfloat16}
EXPERT_MARK = ".switch_mlp."


def cpu_backend() -> bool:
    return mx.default_device() == mx.cpu


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def target_dtype(requested: str | mx.Dtype | None = None) -> mx.Dtype | None:
    """The dtype float tensors are loaded in; None keeps each tensor's own."""
    requested = parse_dtype(requested)
    if requested is not None:
        return requested
    return mx.float32 if cpu_backend() else None


def loaded_dtype(name: str, dtype: mx.Dtype, quantized: bool,
                 target: mx.Dtype | None) -> mx.Dtype:
    """The dtype the float tensor `name` (stored as `dtype`) has once loaded. `quantized`:
    it belongs to a quantized layer (its packed weight, scales or biases)."""
    if not quantized and EXPERT_MARK in name and cpu_backend():
        return mx.float32
    return target or dtype


def cast_weights(weights: dict[str, mx.array],
                 requested: str | mx.Dtype | None = None) -> dict[str, mx.array]:
    """`weights` (our names, lazy) in the dtypes this backend computes in."""
    target = target_dtype(requested)
    out = {}
    for name, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating):
            module = name.rpartition(".")[0]
            quantized = f"{module}.scales" in weights
            value = value.astype(loaded_dtype(name, value.dtype, quantized, target))
        out[name] = value
    return out
