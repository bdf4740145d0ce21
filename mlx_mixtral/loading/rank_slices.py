"""A tensor-parallel rank's part of a stored tensor, as byte ranges, read straight into memory.

MLX's sharding (model/sharding.py, `mlx.nn.layers.distributed`) gives rank r of N the r-th of N
equal parts of a weight along one axis. A rank that read whole tensors and sliced them would
read the whole checkpoint and briefly hold each whole tensor; instead the part's bytes are read
from the file: along the first axis one range, along a later axis one range per row before it
(quantized packed weights and their scales and biases are cut along the same axis, whole groups
at a time, since MLX's shard keeps whole groups). The ranges of one part share a length and a
stride, so a part is one `Part`, read in one loop of `preadv` into the destination array.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Part:
    """`count` ranges of `nbytes` bytes each, `stride` bytes apart, from `offset` on."""

    offset: int
    nbytes: int
    count: int = 1
    stride: int = 0

    @property
    def total(self) -> int:
        return self.nbytes * self.count


def part_of(shape: tuple[int, ...], itemsize: int, held: tuple[int, ...], rank: int,
            offset: int = 0) -> Part:
    """The bytes of rank `rank`'s part of a C-ordered tensor of `shape` stored at `offset`,
    the part being `held` (the same shape but one axis, cut into equal parts)."""
    shape, held = tuple(shape), tuple(held)
    if len(shape) != len(held):
        raise ValueError(f"a part {held} of a tensor {shape}")
    cut = [i for i, (a, b) in enumerate(zip(shape, held, strict=True)) if a != b]
    if not cut:
        return Part(offset, math.prod(shape) * itemsize)
    axis = cut[0]
    if len(cut) > 1 or shape[axis] % held[axis]:
        raise ValueError(f"{held} is not an equal part of {shape} along one axis")
    row = math.prod(shape[axis + 1:]) * itemsize  # one step along the cut axis
    rows = math.prod(shape[:axis])  # ranges: one per index before the cut axis
    nbytes = held[axis] * row
    first = offset + rank * nbytes
    if rows == 1:
        return Part(first, nbytes)
    return Part(first, nbytes, rows, shape[axis] * row)


def read_part(fd: int, part: Part, dest: memoryview) -> int:
    """Read `part` of the file open as `fd` into `dest` (exactly `part.total` bytes); the bytes
    read."""
    if len(dest) != part.total:
        raise ValueError(f"{len(dest)} bytes of room for a part of {part.total}")
    for i in range(part.count):
        at, want = i * part.nbytes, part.nbytes
        where = part.offset + i * part.stride
        while want:
            n = os.preadv(fd, [dest[at:at + want]], where)
            if n <= 0:
                raise OSError(f"the file ended early at byte {where} (truncated?)")
            at, want, where = at + n, want - n, where + n
    return part.total


def byte_view(array: np.ndarray) -> memoryview:
    return memoryview(array).cast("B")
