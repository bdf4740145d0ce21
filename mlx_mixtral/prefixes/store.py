"""The prefix store: `take(ids)` gives a cache holding the longest stored prefix of `ids`,
`give(tokens, cache)` keeps the blocks of `cache` the store does not have yet.

Blocks are kept per space: one model (its fingerprint), one block size, one KV dtype and
quantization; a space's blocks are only ever joined with each other. A cache is rebuilt from
the blocks that hold what it must hold to go on (every position for full attention, the last
window for a sliding one), looked up in RAM first, then on disk; a block read from disk is
kept in RAM again. New blocks go to both tiers at once (write-through), so a crash or a restart
loses none that were complete.

A sliding-window cache holds only its last window: blocks behind it cannot be cut any more,
so callers give the cache after each prefill chunk too (`give` keeps only what is new), and the
blocks a later prompt needs are there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..model.cache import parts
from .blocks import Block, check_layers, cut, join
from .chain import block_keys
from .disk_tier import DiskTier
from .folder import BLOCK_SUFFIX, DEFAULT_BLOCK, SPACE_FILE
from .ram_tier import RamTier

log = logging.getLogger("mlx_mixtral.prefixes")



@dataclass(frozen=True)
class Space:
    """What blocks must agree on to be joined."""

    model: str  # the model's fingerprint (and rank, when ranks split it)
    block: int
    dtype: str
    group_size: int
    bits: int | None

    @property
    def id(self) -> str:
        text = json.dumps([self.model, self.block, self.dtype, self.group_size, self.bits])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def space_of(model: str, block: int, cache: list) -> Space:
    layer = cache[0]
    first = parts(layer.keys)
    dtype = first[1].dtype if len(first) == 3 else first[0].dtype  # (scales have the dtype)
    return Space(model, block, str(dtype), layer.group_size, layer.bits)


def _read_space(path: Path) -> Space | None:
    """The space a space.json describes; None when it is missing or damaged."""
    try:
        data = json.loads(path.read_text())
        return Space(data["model"], int(data["block"]), str(data["dtype"]),
                     int(data["group_size"]), None if data["bits"] is None else int(data["bits"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Counters:
    taken: int = 0  # takes answered from stored blocks
    missed: int = 0  # takes that found nothing
    tokens: int = 0  # tokens reused
    ram_hits: int = 0  # blocks found in RAM
    disk_hits: int = 0  # blocks read back from disk
    blocks_added: int = 0


class PrefixStore:
    def __init__(self, model: str, folder: Path | None, block: int = DEFAULT_BLOCK,
                 ram: int = 0, disk: int = 0, name: str = "") -> None:
        if block < 1:
            raise ValueError(f"block must be at least 1 token, got {block}")
        self.model, self.block, self.name = model, block, name
        self.ram = RamTier(ram)
        self.disk = DiskTier(folder, disk if folder is not None else 0) if folder else None
        self.spaces: dict[str, Space] = {}
        self.lock = threading.Lock()
        self.counters = Counters()
        self._read_spaces()

    # ---- spaces ---------------------------------------------------------------------------------

    def _read_spaces(self) -> None:
        if self.disk is None or not self.disk.folder.is_dir():
            return
        for path in self.disk.folder.glob(f"*/{SPACE_FILE}"):
            space = _read_space(path)  # (a damaged description hides only its space)
            if space is not None and space.model == self.model and \
                    space.block == self.block and space.id == path.parent.name:
                self.spaces[space.id] = space

    def _described(self, space: Space) -> bool:
        """Whether the folder describes `space`, as it must before its blocks are written (a
        restart finds them by it); written now if it does not (also after the folder was
        cleared under us), False when it cannot be."""
        from ..user_files import write_json

        path = self.disk.folder / space.id / SPACE_FILE
        if _read_space(path) == space:
            return True  # (a damaged one is written again: else its blocks are never found)
        try:
            write_json(path, {"model": space.model, "name": self.name, "block": space.block,
                              "dtype": space.dtype, "group_size": space.group_size,
                              "bits": space.bits})
        except OSError as e:
            self.disk.cannot_write(e)
            return False
        return True

    # ---- lookups ---------------------------------------------------------------------------------

    def _has(self, space: Space, key: str) -> bool:
        return key in self.ram.blocks or (self.disk is not None and self.disk.has(space.id, key))

    def _get(self, space: Space, key: str) -> Block | None:
        block = self.ram.get(key)
        if block is not None:
            self.counters.ram_hits += 1
            return block
        if self.disk is None:
            return None
        block = self.disk.read(space.id, key)
        if block is not None:
            self.counters.disk_hits += 1
            self.ram.put(key, block)
        return block

    def _longest(self, space: Space, keys: list[str], fresh: list) -> tuple[int, int]:
        """(blocks, first block needed): the most blocks of `keys` a cache can be rebuilt
        from, with what it needs of them present."""
        present = [self._has(space, k) for k in keys]
        for count in range(len(keys), 0, -1):
            end = count * self.block
            first = max(layer.needs(end) for layer in fresh) // self.block
            if all(present[first:count]):
                return count, first
        return 0, 0

    def take(self, ids: Sequence[int], fresh: Callable[[], list],
             bits: int | None = None, group_size: int = 64) -> tuple[list, int]:
        """(cache, n): a cache holding ids[:n] rebuilt from stored blocks (n < len(ids), a
        multiple of the block size), or a fresh cache and 0. Only blocks kept as the caller
        keeps KV are used: float ones for a float request, quantized ones at `bits` and
        `group_size` (float blocks would not do for these: their KV was computed with float
        attention, so the reply would not be the one a cold quantized run gives)."""
        cache = fresh()
        if not cache or not hasattr(cache[0], "needs"):
            return cache, 0  # not our caches (mlx-lm's): nothing to rebuild them from
        usable = max(0, len(ids) - 1)  # at least one token is left to run (its logits)
        with self.lock:
            self._read_spaces()  # (another process may have started one)
            while True:
                best: tuple[int, int, Space] | None = None
                for space in list(self.spaces.values()):
                    if space.bits != bits or (bits is not None and
                                              space.group_size != group_size):
                        continue
                    keys = block_keys(space.id, ids[:usable], self.block)
                    count, first = self._longest(space, keys, cache)
                    if count and (best is None or count > best[0]):
                        best = (count, first, space)
                if best is None:
                    self.counters.missed += 1
                    return cache, 0
                count, first, space = best
                keys = block_keys(space.id, ids[:count * self.block], self.block)
                blocks = [self._get(space, k) for k in keys[first:count]]
                if all(b is not None and check_layers(b, cache) for b in blocks):
                    break
                for key, b in zip(keys[first:count], blocks, strict=True):
                    if b is None or not check_layers(b, cache):
                        self._remove(space, key)  # then look again without it
        end = count * self.block
        start = max(layer.needs(end) for layer in cache)
        cache = join(cache, blocks, first * self.block, start, end, space.group_size, space.bits)
        self.counters.taken += 1
        self.counters.tokens += end
        return cache, end

    # ---- keeping ------------------------------------------------------------------------------

    def give(self, tokens: Sequence[int], cache: list) -> list[str]:
        """Keep the complete blocks of `cache` (holding `tokens`) the store does not have yet;
        return the keys of all of `tokens`' complete blocks (a chat keeps them, to free its
        blocks when it is deleted)."""
        if not cache or not tokens or cache[0].empty() or not hasattr(cache[0], "held"):
            return []
        first = max(layer.held()[0] for layer in cache)
        end = min(cache[0].offset, len(tokens))
        space = space_of(self.model, self.block, cache)
        keys = block_keys(space.id, tokens[:end], self.block)
        with self.lock:
            self.spaces.setdefault(space.id, space)
            to_disk: bool | None = None  # (whether blocks can go to disk: asked once)
            added = False
            for i, key in enumerate(keys):
                start = i * self.block
                if start < first:
                    continue  # no longer held (a sliding window moved past it)
                if key in self.ram.blocks:
                    self.ram.get(key)
                    if self.disk is not None:
                        self.disk.touch(space.id, key)
                    continue
                if self.disk is not None and self.disk.has(space.id, key):
                    self.disk.touch(space.id, key)
                    continue
                block = cut(cache, start, start + self.block)
                self.ram.put(key, block)
                if to_disk is None:
                    to_disk = self.disk is not None and self.disk.budget > 0 and \
                        self._described(space)
                if to_disk:
                    self.disk.write(space.id, key, block)
                self.counters.blocks_added += 1
                added = True
            if added and self.disk is not None:
                self.disk.evict()
        return keys

    def _remove(self, space: Space, key: str) -> int:
        self.ram.remove(key)
        return self.disk.remove(space.id, key) if self.disk is not None else 0

    def forget(self, keys: Sequence[str], keep: Sequence[str] = ()) -> int:
        """Delete the blocks `keys` except those in `keep` (used by others); bytes freed on
        disk."""
        kept = set(keep)
        freed = 0
        with self.lock:
            for key in keys:
                if key in kept:
                    continue
                for space in self.spaces.values():
                    freed += self._remove(space, key)
        return freed

    def clear(self) -> None:
        """Forget every block of this model, in RAM and on disk."""
        with self.lock:
            self.ram.clear()
            if self.disk is not None:
                for space in self.spaces.values():
                    for path in (self.disk.folder / space.id).glob(f"*{BLOCK_SUFFIX}"):
                        path.unlink(missing_ok=True)

    # ---- numbers ------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.ram.nbytes

    def stats(self) -> dict[str, int]:
        c = self.counters
        disk = self.disk
        return {
            "block_tokens": self.block,
            "hits": c.taken, "misses": c.missed, "tokens_reused": c.tokens,
            "ram_block_hits": c.ram_hits, "disk_block_hits": c.disk_hits,
            "blocks_added": c.blocks_added,
            "ram_bytes": self.ram.nbytes, "ram_budget": self.ram.budget,
            "ram_blocks": len(self.ram.blocks), "ram_evictions": self.ram.evicted,
            "disk_bytes": disk.nbytes if disk else 0, "disk_budget": disk.budget if disk else 0,
            "disk_evictions": disk.evicted if disk else 0,
            "disk_dropped": disk.dropped if disk else 0,
            "disk_write_failures": disk.failed if disk else 0,
        }
