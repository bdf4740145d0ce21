"""Several sequences in one forward pass, packed end to end in one row.

Continuous batching runs sequences of different lengths, each with a cache of its own (full or
rolling, quantized or not, maybe taken from a pool): a new prompt's chunk and the running
sequences' next tokens go through the model as one row of `sum(lengths)` tokens. Everything but
attention treats tokens one by one, so it runs on the packed row at once (and a paged MoE layer
loads the union of the experts all of them need, once); attention splits the row back into its
sequences, and each attends over its own cache with its own positions and mask. No padding, and
no cache is ever merged or split: a sequence joins and leaves the batch as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from .masks import Mask


@dataclass
class Packed:
    """`lengths[i]` new tokens of sequence i, whose cache (one per layer) is `caches[i]`."""

    lengths: list[int]
    caches: list[list]

    def __post_init__(self) -> None:
        if len(self.lengths) != len(self.caches) or not all(n > 0 for n in self.lengths):
            raise ValueError("a packed pass needs one cache and at least one token per sequence")

    @property
    def ends(self) -> list[int]:
        """The row index of each sequence's last token."""
        out, at = [], -1
        for n in self.lengths:
            at += n
            out.append(at)
        return out

    def layers(self, window: int | None) -> list[PackedLayer]:
        """One `PackedLayer` per layer; the masks are made once, from the first layer's caches,
        before any cache moves (the layers move in lockstep)."""
        masks = [c[0].make_mask(n, window_size=window)
                 for n, c in zip(self.lengths, self.caches, strict=True)]
        return [PackedLayer(self.lengths, [c[i] for c in self.caches], masks)
                for i in range(len(self.caches[0]))]


@dataclass
class PackedLayer:
    """What one attention layer needs of a packed pass: the sequences' lengths, their caches of
    this layer, and their masks."""

    lengths: list[int]
    caches: list
    masks: list[Mask]
