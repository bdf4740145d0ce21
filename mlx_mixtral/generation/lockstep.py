"""Ranks that generate together (a model split over several ranks by `mlx.launch`).

Every rank must run the same forward passes in the same order, or the collectives inside them
never meet. Whatever only rank 0 knows therefore reaches the others first: a prompt piped into
it, a random seed, and before each of a server's passes what changed in its batch (who joins,
whose client went away). Given those, the ranks compute identical logits and sample identical
tokens on their own.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np


def share_text(text: str | None, group: mx.distributed.Group) -> str:
    """Rank 0's text on every rank (other ranks pass None)."""
    data = np.frombuffer((text or "").encode("utf-8"), dtype=np.uint8) if group.rank() == 0 \
        else np.zeros(0, dtype=np.uint8)
    n = int(mx.distributed.all_sum(mx.array(len(data)), group=group).item())
    buffer = np.zeros(n, dtype=np.int32)
    buffer[:len(data)] = data
    shared = mx.distributed.all_sum(mx.array(buffer), group=group)
    return bytes(np.array(shared).astype(np.uint8)).decode("utf-8", "replace")


def share_seed(seed: int | None, group: mx.distributed.Group) -> int:
    """The seed every rank samples with: the one given, else a random one from rank 0. Ranks
    that sampled with different seeds would choose different tokens and part ways."""
    if seed is not None:
        return seed
    mine = secrets.randbelow(2**31) if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine), group=group).item())


def _quiet() -> None:
    pass


class Lockstep:
    """A stream of messages from rank 0 to all ranks (the server's: what changes in the batch
    before each pass, who joins and who was cancelled, so that every rank runs the same pass).

    `busy()` is called whenever a rank has heard from the others or is about to wait on them with
    work in hand, `idle()` when it may wait for as long as it likes (between jobs): a watchdog
    beats and disarms with them."""

    def __init__(self, group: mx.distributed.Group, busy: Callable[[], None] = _quiet,
                 idle: Callable[[], None] = _quiet) -> None:
        self.group, self.busy, self.idle = group, busy, idle
        self.leader = group.rank() == 0

    def announce(self, message: dict[str, Any] | None) -> dict[str, Any] | None:
        """Rank 0's `message` (None: no more work) on every rank; the others pass None and
        wait for it."""
        if not self.leader:
            self.idle()  # the next request may be hours away
        self.busy()
        text = share_text(json.dumps(message) if self.leader and message is not None else None,
                          self.group)
        self.busy()
        return json.loads(text) if text else None

    def largest(self, n: int) -> int:
        """The largest `n` of all ranks (sizes that differ by rank, agreed on)."""
        return int(mx.distributed.all_max(mx.array(n), group=self.group).item())
