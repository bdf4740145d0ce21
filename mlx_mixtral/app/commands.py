"""The command palette (Ctrl+P): the app's actions by name, and the chats, found by words from
their title or messages.

Hits rank in tiers: a command or chat holding the query as a whole word first, then one holding
it inside a word, then commands whose letters merely appear in order (Textual's fuzzy match);
within a tier, by the fuzzy score."""

from __future__ import annotations

import re
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from .keys import actions

MAX_CHATS = 20  # chats offered for one search


def tier(query: str, text: str) -> int:
    """2: `text` holds `query` as whole words; 1: inside a word; 0: neither (any case)."""
    query, text = " ".join(query.split()).lower(), text.lower()
    if not query or query not in text:
        return 0
    return 2 if re.search(rf"(?<!\w){re.escape(query)}(?!\w)", text) else 1


def rank(tier_: int, fuzzy: float) -> float:
    """A hit's score: its tier first, the fuzzy score (squashed below 1) within it."""
    return tier_ + fuzzy / (1 + fuzzy)


class ChatCommands(Provider):
    def _actions(self) -> list[tuple[str, str, str]]:
        return [(text, action, key) for action, text, key in actions()]

    async def discover(self) -> Hits:
        for text, action, key in self._actions():
            yield DiscoveryHit(text, partial(self.app.run_action, action), help=key)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, action, key in self._actions():
            score = matcher.match(text)
            if score > 0:
                yield Hit(rank(tier(query, text), score), matcher.highlight(text),
                          partial(self.app.run_action, action), help=key)
        words = query.strip()
        if len(words) < 2:
            return
        store = self.app.store
        for c in store.search(words)[:MAX_CHATS]:
            saved = store.load(c.id)
            found = max(tier(words, t) for t in
                        [c.title] + [m.content for m in (saved.messages if saved else [])])
            yield Hit(rank(found, 0.5), f"Open chat: {c.title}",
                      partial(self.app.choose_chat, c.id),
                      help="a chat whose title or messages contain these words")
