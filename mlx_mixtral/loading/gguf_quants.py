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

import threading

import numpy as np

GROUP = 32  # weights per GGUF block, and per MLX group
NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # the types kept as they are quantized
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_BIAS_FACTOR = {"Q4_0": -8.0, "Q8_0": -128.0}  # bias = factor * d
# Nibbles are unzipped a chunk of blocks at a time in 64-bit words (little-endian, as on every
# machine MLX runs on): the chunk's scratch stays in the CPU's cache, which makes it about twice
# as fast as whole-tensor passes. 2,048 blocks: 130 KB of scratch per reading thread.
_CHUNK = 2048
_U64 = {name: np.uint64(v) for name, v in (("nibbles", 0x0F0F0F0F0F0F0F0F),
                                           ("bytes", 0x00FF00FF00FF00FF),
                                           ("halves", 0x0000FFFF0000FFFF),
                                           ("low", 0xFFFFFFFF))}
_SHIFT = {n: np.uint64(n) for n in (4, 8, 16, 32)}
_scratch = threading.local()  # per thread: loaders convert on several threads at once


def block_bytes(kind: str) -> int:
    """Bytes of one 32-weight block of the GGUF type `kind` ("Q4_0" ...)."""
    return _BLOCK_BYTES[kind]


def packed_bytes(kind: str) -> int:
    """Bytes of one block's weights once packed for MLX."""
    return GROUP * NATIVE_BITS[kind] // 8


def flat_view(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`a` reshaped without a copy (its memory is what is written)."""
    view = a.view()
    view.shape = shape  # raises rather than copy
    return view


def to_affine(raw: np.ndarray, kind: str, weight: np.ndarray, scales: np.ndarray,
              biases: np.ndarray) -> None:
    """Convert the blocks in `raw` (uint8, a whole number of blocks) into MLX's layout,
    written into `weight` (its packed words: a contiguous uint32 or uint8 array), `scales`
    and `biases` (one value per block, float32 or float16 arrays, or uint16 ones holding
    bfloat16 bits). NumPy lets go of the GIL in each step, so threads convert in parallel."""
    size = _BLOCK_BYTES[kind]
    n = raw.size // size
    blocks = flat_view(raw, (n, size))
    out = flat_view(weight.view(np.uint8), (n, packed_bytes(kind)))
    d = np.ndarray((n,), np.float16, raw, 0, (size,))
    _store(scales, d)
    if kind == "Q4_1":
        _store(biases, np.ndarray((n,), np.float16, raw, 2, (size,)))
    else:  # exact in float32, as in MLX's float16 (short of scales past 65504 / 128)
        _store(biases, np.multiply(d, _BIAS_FACTOR[kind], dtype=np.float32))
    if kind == "Q8_0":
        np.bitwise_xor(blocks[:, 2:], 0x80, out=out)  # int8 q -> uint8 q + 128
        return
    for start in range(0, n, _CHUNK):
        _unzip_nibbles(blocks[start:start + _CHUNK, -16:], out[start:start + _CHUNK])


def _unzip_nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """GGUF's 16 bytes of a block (weights 0-15 in the low nibbles, 16-31 in the high ones)
    into MLX's (weight 2k in the low nibble of byte k, 2k+1 in its high one), for each row."""
    m = len(qs)
    if getattr(_scratch, "rows", 0) < m:
        _scratch.rows = m
        _scratch.qs = np.empty((m, 16), np.uint8)
        _scratch.words = np.empty((3, 2 * m), np.uint64)
    copy = _scratch.qs[:m]
    np.copyto(copy, qs)
    words = copy.view(np.uint64).reshape(-1)  # two per block: bytes 0-7, 8-15
    low, high, tmp = _scratch.words[:, :2 * m]
    np.bitwise_and(words, _U64["nibbles"], out=low)
    np.right_shift(words, _SHIFT[4], out=high)
    high &= _U64["nibbles"]
    for x in (low, high):  # 8 nibbles, one per byte -> 32 bits, in order
        for shift, mask in ((4, "bytes"), (8, "halves"), (16, "low")):
            np.right_shift(x, _SHIFT[shift], out=tmp)
            x |= tmp
            x &= _U64[mask]
    packed = out.view(np.uint64)  # (m, 2): weights 0-15, 16-31
    for col, x in enumerate((low, high)):
        np.left_shift(x[1::2], _SHIFT[32], out=packed[:, col])
        packed[:, col] |= x[0::2]


def _store(dest: np.ndarray, values: np.ndarray) -> None:
    """Float `values` into `dest` (float32, float16, or bfloat16 bits as uint16), rounded
    to nearest even as MLX casts."""
    dest = flat_view(dest, (-1,))
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
