"""Will a model fit? Its size once loaded, read from the file headers, against free memory.

Loading a model larger than memory does not fail cleanly: the machine swaps until it is
unusable, or the process is killed. So `load` refuses it up front unless forced.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import mlx.core as mx

from .errors import MlxMixtralError
from .units import size

# Metal lets the GPU wire about three quarters of unified memory by default.
USABLE_SHARE = 0.75
_HALF = ("F16", "BF16")
_GGUF_HALF = (1, 30)  # GGML types F16, BF16
_GGUF_FLOAT = (0, *_GGUF_HALF)
_NATIVE_BITS = {2: 4, 3: 4, 8: 8}  # Q4_0, Q4_1, Q8_0: MLX reads them as they are


class MemoryLimitError(MlxMixtralError):
    """The model needs more memory than is available (pass force=True / --force to try)."""


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


def _cpu() -> bool:
    return mx.default_device() == mx.cpu


def _folder_bytes(folder: Path) -> int:
    from .weights import check_safetensors

    upcast = 2 if _cpu() else 1  # the CPU backend keeps half-precision tensors as float32
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        for name, info in check_safetensors(path).items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            total += (end - start) * (upcast if info.get("dtype") in _HALF else 1)
    return total


def _gguf_bytes(path: Path) -> int:
    from gguf.constants import GGMLQuantizationType

    from .gguf_check import check_gguf
    from .gguf_weights import mlx_bits

    total = 0
    for t in check_gguf(path):
        if t.type in _GGUF_HALF and _cpu():
            total += 2 * t.nbytes
        elif t.type in _GGUF_FLOAT:
            total += t.nbytes
        else:  # quantized: MLX's affine bits, and a scale and bias per group of 32
            n = math.prod(t.shape)
            bits = _NATIVE_BITS.get(t.type) or mlx_bits(GGMLQuantizationType(t.type))
            total += n * bits // 8 + n // 32 * (8 if _cpu() else 4)
    return total


def load_bytes(path: str | Path) -> int:
    """Memory the weights of a model folder or GGUF file take once loaded."""
    path = Path(path)
    return _gguf_bytes(path) if path.is_file() else _folder_bytes(path)


def check_fits(path: str | Path, force: bool = False) -> None:
    """Refuse (MemoryLimitError) a model that needs more memory than is available."""
    if force:
        return
    need, have = load_bytes(path), available_memory()
    if have and need > have:
        raise MemoryLimitError(
            f"{Path(path).name}: the model needs about {size(need)} of memory and "
            f"{size(have)} is available; close other programs, use a smaller quantization "
            "(mlx-mixtral convert -q --q-bits 4), or pass --force to load it anyway")
