"""Each conversation's KV cache, saved beside the database when a reply completes, so that a
reopened chat prefills only the new message. The files share a byte budget: the least recently
used go first. A file that is missing, stale, damaged or from another model is deleted (with a
note in the log) and the conversation is prefilled as if it had none; it never stops the app.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ..generation.kv import PROMPT_CACHE_BYTES

log = logging.getLogger("mlx_mixtral.app")


class ChatCaches:
    def __init__(self, folder: Path, budget: int = PROMPT_CACHE_BYTES) -> None:
        self.folder, self.budget = folder, budget

    def path(self, key: str) -> Path:
        return self.folder / f"conversation-{key}.safetensors"

    def used(self, key: str) -> None:
        """Mark a file as just used (least recently used goes first)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(key))

    def discard(self, key: str, why: str) -> None:
        log.warning("prompt cache %s ignored and deleted: %s", self.path(key).name, why)
        self.path(key).unlink(missing_ok=True)

    def forget(self, key: str) -> None:
        """A deleted chat: its file goes with it (it holds the replies' text and tokens)."""
        self.path(key).unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("conversation-*.safetensors"),
                      key=lambda p: p.stat().st_mtime)

    def evict(self) -> None:
        """Delete the least recently used files until the rest fit in the budget."""
        files = self.files()
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.budget:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
