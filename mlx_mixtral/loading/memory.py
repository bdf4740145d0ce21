"""Will a model fit? Its size once loaded, read from the file headers, against free memory.

Loading a model larger than memory does not fail cleanly: the machine swaps until it is
unusable, or the process is killed. So `load` refuses it up front unless forced.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import mlx.core as mx

from ..errors import MemoryLimitError
from ..model.precision import loaded_dtype, target_dtype
from ..units import size

if TYPE_CHECKING:
    from .source import ModelSource

# Metal lets the GPU wire about three quarters of unified memory by default.
USABLE_SHARE = 0.75


def machine_memory() -> int:
    """Physical memory in bytes (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_memory() -> int:
    """Bytes a model may use now: Linux's MemAvailable; on a Mac, Metal's recommended working
    set (unified memory: free memory there is a poor guide, the OS reclaims caches)."""
    if sys.platform == "linux":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    if mx.metal.is_available():
        size = mx.device_info().get("max_recommended_working_set_size")
        if isinstance(size, int) and size > 0:
            return size
    return int(machine_memory() * USABLE_SHARE)


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def folder_tensor_bytes(source: ModelSource, target: mx.Dtype | None) -> list[int]:
    """Each tensor's bytes once loaded (in `source.tensors` order)."""
    quantized = {t.name.rpartition(".")[0] for t in source.tensors if t.name.endswith(".scales")}
    out = []
    for t in source.tensors:
        size = _ITEMSIZE.get(t.dtype)
        if size is None:  # integers: packed quantized weights, ids
            out.append(t.nbytes)
            continue
        module = t.name.rpartition(".")[0]
        dtype = {"F16": mx.float16, "BF16": mx.bfloat16}.get(t.dtype, mx.float32)
        dtype = loaded_dtype(t.name, dtype, module in quantized, target)
        out.append(t.count * dtype.size)
    return out


def _folder_bytes(source: ModelSource, target: mx.Dtype | None) -> int:
    return sum(folder_tensor_bytes(source, target))


def gguf_tensor_bytes(source: ModelSource, target: mx.Dtype | None) -> list[int]:
    """Each tensor of a GGUF's bytes once loaded (in `source.tensors` order)."""
    from gguf.constants import GGMLQuantizationType

    from .gguf_file import GGUF_GROUP_SIZE, mlx_bits
    from .gguf_quants import NATIVE_BITS

    float_size = (target or mx.float16).size
    out = []
    for t in source.tensors:
        if t.dtype in _ITEMSIZE:  # float tensors: norms, and whatever the file keeps in float
            size = target.size if target is not None else _ITEMSIZE[t.dtype]
            out.append(t.count * size)
            continue
        # quantized: MLX's affine bits, and a scale and bias per group of 32
        bits = NATIVE_BITS.get(t.dtype) or mlx_bits(GGMLQuantizationType[t.dtype])
        out.append(t.count * bits // 8 + t.count // GGUF_GROUP_SIZE * 2 * float_size)
    return out


def load_bytes(source: ModelSource, dtype: str | mx.Dtype | None = None) -> int:
    """Memory the weights take once loaded, from the file headers alone."""
    target = target_dtype(dtype)
    if source.format == "gguf":
        return sum(gguf_tensor_bytes(source, target))
    return _folder_bytes(source, target)


def check_fits(source: ModelSource, force: bool = False,
               dtype: str | mx.Dtype | None = None, ranks: int = 1,
               other_way: str = "") -> None:
    """Refuse (MemoryLimitError) a model that needs more memory than is available. Split over
    `ranks` machines, each needs about its share. `other_way`: one more remedy to name."""
    if force:
        return
    need, have = load_bytes(source, dtype) // ranks, available_memory()
    if have and need > have:
        per = " per rank" if ranks > 1 else ""
        raise MemoryLimitError(
            f"{source.path.name}: the model needs about {size(need)} of memory{per} and "
            f"{size(have)} is available; close other programs, use a smaller quantization "
            f"(mlx-mixtral convert -q --q-bits 4), {other_way}or pass force=True to load it "
            "anyway", params=("force",))
