"""A block's payload: every layer's keys and values for its positions, as MLX arrays named
"layer.kind.part" (a quantized buffer has three parts: packed, scales, biases). Cut from a cache
as copies of their own (a slice would keep the whole cache's buffer alive), and joined back into
a cache that continues as if it had computed them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..model.cache import Buffer, parts

KINDS = ("keys", "values")


@dataclass
class Block:
    arrays: dict[str, mx.array]
    nbytes: int


def cut(cache: list, first: int, end: int) -> Block:
    """Positions first..end-1 of every layer, copied."""
    arrays: dict[str, mx.array] = {}
    for i, layer in enumerate(cache):
        for kind, buffer in zip(KINDS, layer.positions(first, end), strict=True):
            for j, x in enumerate(parts(buffer)):
                arrays[f"{i}.{kind}.{j}"] = mx.contiguous(x)
    mx.eval(list(arrays.values()))
    return Block(arrays, sum(x.nbytes for x in arrays.values()))


def _buffer(blocks: Sequence[Block], layer: int, kind: str, first: int, end: int,
            offset: int) -> Buffer:
    """One layer's keys or values over positions first..end-1 from blocks starting at
    `offset`."""
    names = [f"{layer}.{kind}.{j}" for j in range(3) if f"{layer}.{kind}.{j}" in blocks[0].arrays]
    joined = [mx.concatenate([b.arrays[n] for b in blocks], axis=2)[..., first - offset:
                                                                    end - offset, :]
              for n in names]
    return joined[0] if len(joined) == 1 else tuple(joined)


def join(cache: list, blocks: Sequence[Block], offset: int, first: int, end: int,
         group_size: int, bits: int | None) -> list:
    """`cache` (fresh) made to hold positions first..end-1 from `blocks` (which start at
    position `offset` and are consecutive)."""
    for i, layer in enumerate(cache):
        keys, values = (_buffer(blocks, i, kind, first, end, offset) for kind in KINDS)
        layer.fill(first, keys, values, group_size, bits)
    return cache


def check_layers(block: Block, cache: list) -> bool:
    """Whether a block read from disk has each layer's keys and values, as `cache` has."""
    return all(f"{i}.{kind}.0" in block.arrays for i in range(len(cache)) for kind in KINDS)
