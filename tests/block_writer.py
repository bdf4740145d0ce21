"""Write a prompt's blocks into a prefix store's folder again and again until killed: the
store's fault test kills it (SIGKILL) at random moments of its writes. The blocks come from
another store's folder, a full-attention model's, so the cache is rebuilt without the model.
Prints "writing" once the loop starts.

    python block_writer.py SOURCE TARGET MODEL_KEY BLOCK LAYERS IDS
    (IDS: the prompt's token ids, comma-separated)
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlx_mixtral.model.cache import FullKVCache
from mlx_mixtral.prefixes.store import PrefixStore

EVERYTHING = 1 << 40  # bytes: no budget evicts anything here


def main(source: str, target: str, key: str, block: int, layers: int, ids: list[int]) -> None:
    def fresh() -> list:
        return [FullKVCache() for _ in range(layers)]

    cache, n = PrefixStore(key, Path(source), block, 0, EVERYTHING).take([*ids, 0], fresh)
    if n != len(ids):
        sys.exit(f"the source folder holds {n} of the prompt's {len(ids)} tokens")
    store = PrefixStore(key, Path(target), block, 0, EVERYTHING)
    print("writing", flush=True)
    while True:  # forget the blocks and write them anew: a kill lands in some write
        store.forget(store.give(ids, cache))


if __name__ == "__main__":
    source, target, key, block, layers, ids = sys.argv[1:]
    main(source, target, key, int(block), int(layers), [int(t) for t in ids.split(",")])
