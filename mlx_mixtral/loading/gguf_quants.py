"""GGUF's Q4_0, Q4_1 and Q8_0 blocks as MLX affine weights, converted from raw bytes in NumPy.

`mx.load` converts these three types itself (mlx/io/gguf_quants.cpp) but only for a whole
file; this is the same conversion, bit for bit (tests/test_gguf_streaming.py compares the two),
for bytes MLX does not read: one expert's byte range, laid into its slot as it arrives, and the
tensors of a file that also holds types MLX cannot read.

A block is 32 weights (one MLX group of 32) after a float16 scale `d`:
- Q4_0: |d|16 bytes|, w = d * (q - 8); weights 0-15 in the low nibbles, 16-31 in the high ones;
- Q4_1: |d|m|16 bytes as Q4_0|, w = d * q + m;
- Q8_0: |d|32 int8|, w = d * q.
MLX's affine weights are w = scale * q + bias with q unsigned and packed little-endian,
element 0 in the lowest bits: scale = d and bias = -8d, m or -128d (Q8_0's q shifted by 128),
scales and biases in float16 as MLX keeps them (the model casts them as it casts the file's).
"""

from __future__ import annotations

import numpy as np

GROUP = 32  # weights per GGUF block, and per MLX group
NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # the types kept as they are quantized
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_BIAS_FACTOR = {"Q4_0": np.float16(-8), "Q8_0": np.float16(-128)}  # bias = factor * d


def block_bytes(kind: str) -> int:
    """Bytes of one 32-weight block of the GGUF type `kind` ("Q4_0" ...)."""
    return _BLOCK_BYTES[kind]


def packed_bytes(kind: str) -> int:
    """Bytes of one block's weights once packed for MLX."""
    return GROUP * NATIVE_BITS[kind] // 8


def to_affine(raw: np.ndarray, kind: str, weight: np.ndarray, scales: np.ndarray,
              biases: np.ndarray) -> None:
    """Convert the blocks in `raw` (uint8, a whole number of blocks) into MLX's layout,
    written into `weight` (its packed words: a contiguous uint32 or uint8 array), `scales`
    and `biases` (one value per block, float32 or float16 arrays, or uint16 ones holding
    bfloat16 bits)."""
    blocks = raw.reshape(-1, _BLOCK_BYTES[kind])
    out = weight.view(np.uint8)
    out.shape = (len(blocks), packed_bytes(kind))  # raises rather than copy
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0]
    _store(scales, d)
    if kind == "Q4_1":
        _store(biases, blocks[:, 2:4].copy().view(np.float16)[:, 0])
    else:
        _store(biases, d * _BIAS_FACTOR[kind])
    if kind == "Q8_0":
        np.bitwise_xor(blocks[:, 2:], 0x80, out=out)  # int8 q -> uint8 q + 128
        return
    pairs = blocks[:, -16:].reshape(-1, 8, 2)  # bytes 2j, 2j+1: weights 2j, 2j+1 (low nibbles)
    a, b = pairs[..., 0], pairs[..., 1]
    np.bitwise_or(a & 0x0F, b << 4, out=out[:, :8])  # weights 0-15
    np.bitwise_or(a >> 4, b & 0xF0, out=out[:, 8:])  # weights 16-31


def _store(dest: np.ndarray, values: np.ndarray) -> None:
    """float16 `values` into `dest` (float32, float16, or bfloat16 bits as uint16), rounded
    to nearest even as MLX casts."""
    dest = dest.view()
    dest.shape = (-1,)  # raises rather than copy
    if dest.dtype != np.uint16:
        np.copyto(dest, values, casting="unsafe")
        return
    bits = values.astype(np.float32).view(np.uint32)
    np.copyto(dest, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, casting="unsafe")


def affine_tensor(data: np.ndarray, kind: str, shape: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole tensor of `shape` (NumPy order, the last axis the one quantized) from its raw
    bytes: (packed uint32 weight, float16 scales, float16 biases), as `mx.load` returns them."""
    groups = shape[-1] // GROUP
    weight = np.empty((*shape[:-1], groups * packed_bytes(kind) // 4), np.uint32)
    scales = np.empty((*shape[:-1], groups), np.float16)
    biases = np.empty_like(scales)
    to_affine(np.ascontiguousarray(data).reshape(-1), kind, weight, scales, biases)
    return weight, scales, biases
