"""The RAM tier: blocks in memory, least recently used first out when over the byte budget.
Every block is on disk too (when the disk tier has room), so one dropped here is read back
from there."""

from __future__ import annotations

from collections import OrderedDict

from .blocks import Block


class RamTier:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.blocks: OrderedDict[str, Block] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.evicted = 0

    def get(self, key: str) -> Block | None:
        block = self.blocks.get(key)
        if block is not None:
            self.blocks.move_to_end(key)
        return block

    def put(self, key: str, block: Block) -> None:
        if block.nbytes > self.budget or key in self.blocks:
            return
        self.blocks[key] = block
        self.nbytes += block.nbytes
        while self.nbytes > self.budget:
            _, old = self.blocks.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evicted += 1

    def remove(self, key: str) -> None:
        block = self.blocks.pop(key, None)
        if block is not None:
            self.nbytes -= block.nbytes

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0
