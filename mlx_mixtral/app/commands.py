"""The command palette (Ctrl+P): the app's actions by name, and the chats, found by words from
their title or messages."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from .keys import actions

MAX_CHATS = 20  # chats offered for one search


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
                yield Hit(score, matcher.highlight(text), partial(self.app.run_action, action),
                          help=key)
        words = query.strip()
        if len(words) < 2:
            return
        for c in self.app.store.search(words)[:MAX_CHATS]:
            yield Hit(0.5, f"Open chat: {c.title}", partial(self.app.choose_chat, c.id),
                      help="a chat whose title or messages contain these words")
