"""Block keys: each block of `block` tokens is named by a hash of every token up to its end (and
the store's space: model, KV dtype and quantization), so a block is found again only under an
identical prefix. Each key hashes the previous key and its own tokens: a chain."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def block_keys(space: str, ids: Sequence[int], block: int) -> list[str]:
    """The keys of `ids`' complete blocks, in order."""
    keys: list[str] = []
    previous = space.encode()
    for start in range(0, len(ids) - block + 1, block):
        chunk = ids[start:start + block]
        digest = hashlib.sha256(previous + struct.pack(f"<{len(chunk)}q", *chunk)).hexdigest()
        keys.append(digest[:32])
        previous = digest.encode()
    return keys
