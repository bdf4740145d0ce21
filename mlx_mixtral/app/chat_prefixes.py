"""What the chat app keeps of its chats' KV caches: blocks in the prefix store (prefixes/),
shared with every chat, request and prompt that begins the same way, and in the chat database,
per chat and model, the token ids its replies were generated as and the keys of its blocks.

No file is kept per chat: a reopened chat is rebuilt from blocks (it prefills only what follows
its last complete block), a reply writes only its new blocks, and deleting a chat frees the
blocks no other chat uses. A damaged block file is dropped with a log line (the store does it)
and the chat prefills that part again; it never stops the app.

Per-chat cache files of earlier versions (prompt-caches/conversation-*.safetensors, each chat's
whole cache rewritten after every reply) are deleted at start: the store recomputes what they
held on each chat's next turn.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..generation.kv import KVSettings
from ..generation.stream import prefill_chunk
from ..prefixes.exact import take_as_computed
from ..prefixes.settings import StoreSettings, open_store
from .store import Store

if TYPE_CHECKING:
    from ..generation.session import ChatSession
    from ..model.decoder import Model
    from ..prefixes.store import PrefixStore

log = logging.getLogger("mlx_mixtral.app")

OLD_CACHES = "prompt-caches"  # beside the database, one file per chat (before the store)


def remove_old_cache_files(data: Path) -> int:
    """Delete the per-chat cache files of earlier versions in `data` (the database's folder),
    and their folder once empty; return how many there were."""
    folder = data / OLD_CACHES
    files = sorted(folder.glob("conversation-*.safetensors"))
    for path in files:
        path.unlink(missing_ok=True)
    if files:
        log.warning("removed %d per-chat prompt cache file(s) from %s: chats now keep their "
                    "caches in the prefix store", len(files), folder)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return len(files)


@contextlib.contextmanager
def _or_without(what: str) -> Iterator[None]:
    """What the store cannot do (a full disk, a database locked too long) costs prefill time
    later, never a reply: one log line, and the chat goes on."""
    try:
        yield
    except (OSError, sqlite3.Error) as e:
        log.warning("prefix store: could not %s (%s); the chat goes on without it", what, e)


class ChatPrefixes:
    """The prefix store as the app uses it, with the chat database at `db` (its keys are the
    chats' ids as text, as `Prompt.key` gives them). It opens the database again: it runs on
    the engine's worker thread, and a connection's transactions are the whole connection's."""

    def __init__(self, db: Path, settings: StoreSettings | None = None) -> None:
        self.chats, self.settings = Store(db), settings or StoreSettings()
        self.store: PrefixStore | None = None  # once a model is loaded

    def close(self) -> None:
        self.chats.close()

    def open(self, model: Model, name: str) -> None:
        """Use the store of `model` (just loaded), and free what chats deleted while it was not
        loaded left there."""
        self.store = open_store(model, self.settings, name)
        self.free_deleted()

    def restore(self, session: ChatSession, key: str) -> int:
        """Start `session` (the chat `key`'s messages just loaded) from its kept replies' token
        ids and the longest prefix of it the store holds; return the tokens the cache holds."""
        with _or_without("restore the chat's cache"):
            session.adopt_replies(self.chats.prefix_replies(int(key), self.store.model))
            chunk = prefill_chunk(session.model, session.prefill_step)
            return session.take_cache(partial(take_as_computed, self.store,
                                              kv=session.kv or KVSettings(), chunk=chunk))
        return 0

    def give(self, tokens: list[int], cache: list) -> None:
        """Keep the blocks of `cache` that are new (after a prefill chunk)."""
        with _or_without("keep the prompt's blocks"):
            self.store.give(tokens, cache)

    def keep(self, session: ChatSession, key: str) -> list[str]:
        """Keep the session's new blocks, and its replies' ids and block keys for the chat
        `key`; return the keys."""
        keys: list[str] = []
        with _or_without("keep the chat's blocks"):
            keys = self.store.give(session.cached, session.cache)
            if not self.chats.keep_prefix(int(key), self.store.model, session.replies_state(),
                                          keys):
                self.store.forget(keys, keep=self.chats.kept_blocks())  # deleted meanwhile
        return keys

    def free_deleted(self) -> int:
        """Free the blocks of deleted chats that no stored chat uses; return the bytes freed
        on disk."""
        with _or_without("free a deleted chat's blocks"):
            freed = self.chats.take_freed_blocks(self.store.model)
            return self.store.forget(freed, keep=self.chats.kept_blocks()) if freed else 0
        return 0
