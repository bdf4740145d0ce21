"""Write a prompt's blocks into a prefix store's folder again and again until killed: the
store's fault test kills it (SIGKILL) at random moments of its writes. The blocks come from
another store's folder, a full-attention model's, so the cache is rebuilt without the model.
Its files are written slowly, a KB at a time, as a real model's blocks (megabytes each) are:
so a kill at a random moment mostly lands inside a write. Prints "writing" once the loop
starts.

    python block_writer.py SOURCE TARGET MODEL_KEY BLOCK LAYERS IDS
    (IDS: the prompt's token ids, comma-separated)
"""

from __future__ import annotations

import builtins
import sys
import time
from pathlib import Path
from typing import Any

from mlx_mixtral.model.cache import FullKVCache
from mlx_mixtral.prefixes import disk_tier
from mlx_mixtral.prefixes.store import PrefixStore

EVERYTHING = 1 << 40  # bytes: no budget evicts anything here
PIECE, PAUSE = 1024, 0.002  # bytes per write, seconds after each


class SlowFile:
    """A file written PIECE bytes at a time, each reaching the file before a pause."""

    def __init__(self, path: Any, mode: str) -> None:
        self.file = builtins.open(path, mode)  # noqa: SIM115 - closed by __exit__

    def write(self, data: bytes) -> int:
        for at in range(0, len(data), PIECE):
            self.file.write(data[at:at + PIECE])
            self.file.flush()
            time.sleep(PAUSE)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> SlowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def main(source: str, target: str, key: str, block: int, layers: int, ids: list[int]) -> None:
    def fresh() -> list:
        return [FullKVCache() for _ in range(layers)]

    cache, n = PrefixStore(key, Path(source), block, 0, EVERYTHING).take([*ids, 0], fresh)
    if n != len(ids):
        sys.exit(f"the source folder holds {n} of the prompt's {len(ids)} tokens")
    store = PrefixStore(key, Path(target), block, 0, EVERYTHING)
    disk_tier.open = SlowFile  # (the module's `open`: only the block files are slow)
    print("writing", flush=True)
    while True:  # forget the blocks and write them anew: a kill lands in some write
        store.forget(store.give(ids, cache))


if __name__ == "__main__":
    source, target, key, block, layers, ids = sys.argv[1:]
    main(source, target, key, int(block), int(layers), [int(t) for t in ids.split(",")])
