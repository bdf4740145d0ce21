"""The open chat, without widgets: its messages as stored, and what send, regenerate and edit do
to them, for any engine. The app shows what this holds; the store keeps it in step.

Everything here runs on the UI thread except `Turn.run`, which the worker runs: a turn carries
a copy of the conversation (its `Prompt`), so the worker never reads the list being changed.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import MlxMixtralError
from ..generation.sampling import SamplingParams
from ..generation.stats import Chunk, Stats
from .engine import Emit, Engine, Event, Prefill, Prompt, Ready, ShouldStop
from .store import Message, SavedChat, Store

SAVE_INTERVAL = 1.0  # seconds between saves of the reply being streamed
TITLE_LENGTH = 40  # a new chat's title: the start of its first message
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)


@dataclass(frozen=True)
class Turn:
    """A reply to write: the conversation it answers, and the settings it uses."""

    prompt: Prompt
    settings: SamplingParams

    def run(self, engine: Engine, emit: Emit, should_stop: ShouldStop) -> None:
        """The engine's reply (on the worker); a failure ends the reply, shown in the app."""
        try:
            engine.reply(self.prompt, self.settings, emit, should_stop)
        except Exception as e:  # noqa: BLE001 - shown in the app, never a traceback
            emit(Stats.failed(str(e)))


@dataclass
class Heard:
    """What the worker's events changed, for the view to show."""

    progress: list[Prefill] = field(default_factory=list)  # of a prompt being read
    ready: bool = False  # an opened chat is read into the cache
    text: str = ""  # more of the reply
    end: Stats | None = None  # the reply ended (`Conversation.finished` is it, stored)


def stored_numbers(end: Stats) -> dict[str, Any]:
    """What the store keeps of a reply's end: its numbers (a failed reply has none)."""
    if end.error is not None:
        return {}
    numbers = asdict(end)
    for bulky in ("tokens", "text", "expert_share", "error"):
        del numbers[bulky]
    return numbers


class Conversation:
    def __init__(self, store: Store, model: str, system: str | None = None,
                 settings: SamplingParams | None = None) -> None:
        self.store, self.model = store, model
        # What a new chat starts with (Ctrl+N); an opened chat brings its own.
        self.default_system, self.default_settings = system, settings or SamplingParams()
        self.id: int | None = None  # in the store (None: nothing sent yet)
        self.system, self.settings = self.default_system, self.default_settings
        self.messages: list[Message] = []
        self.reply: Message | None = None  # the reply being written
        self.finished: Message | None = None  # the last reply written
        self.numbers: dict[str, Any] = {}  # the last reply's, for the status bar
        self._saved = 0.0

    def prompt(self) -> Prompt:
        """The conversation as an engine reads it."""
        return Prompt([{"role": m.role, "content": m.content} for m in self.messages],
                      self.system, None if self.id is None else str(self.id))

    def last(self, role: str) -> Message | None:
        return next((m for m in reversed(self.messages) if m.role == role), None)

    def last_code_block(self) -> str | None:
        reply = self.last("assistant")
        blocks = CODE_BLOCK.findall(reply.content if reply else "")
        return blocks[-1] if blocks else None

    # ---- chats ----------------------------------------------------------------------------

    def new(self) -> None:
        self.id, self.messages, self.numbers = None, [], {}
        self.system, self.settings = self.default_system, self.default_settings

    def open(self, conversation_id: int) -> SavedChat | None:
        saved = self.store.load(conversation_id)
        if saved is None:
            return None
        self.id, self.system, self.messages = saved.id, saved.system, saved.messages
        try:
            self.settings = SamplingParams.from_kwargs(None, **saved.settings)
        except MlxMixtralError:
            self.settings = self.default_settings
        # This chat's own numbers: its last reply's, not the previous chat's.
        self.numbers = dict(next((m.stats for m in reversed(saved.messages) if m.stats), {}))
        return saved

    def use_defaults(self, settings: SamplingParams) -> None:
        """New chats start from `settings` (a model's own defaults came with it); so does the
        open chat, while nothing is sent and nothing changed."""
        if self.id is None and self.settings == self.default_settings:
            self.settings = settings
        self.default_settings = settings

    def set_model(self, name: str) -> None:
        """Go on with another model (the open chat is held with it from now on)."""
        self.model = name
        if self.id is not None:
            self.store.update(self.id, model=name)

    def set_system(self, text: str) -> bool:
        """Set the system prompt ("" for none); whether that changed it."""
        system = text.strip() or None
        if system == self.system:
            return False
        self.system = system
        if self.id is not None:
            self.store.update(self.id, system=system)
        return True

    def set_settings(self, settings: SamplingParams) -> None:
        self.settings = settings
        if self.id is not None:
            self.store.update(self.id, settings=settings.to_dict())

    def title(self) -> str:
        saved = None if self.id is None else self.store.load(self.id)
        return saved.title if saved else ""

    def rename(self, title: str) -> None:
        if self.id is not None and title.strip():
            self.store.update(self.id, title=" ".join(title.split())[:80])

    def delete(self) -> None:
        if self.id is not None:
            self.store.delete(self.id)
        self.new()

    # ---- turns ----------------------------------------------------------------------------

    def send(self, text: str) -> Turn:
        """A new user message, and its reply to write."""
        if self.id is None:
            title = " ".join(text.split())[:TITLE_LENGTH] or "New chat"
            self.id = self.store.create(self.model, self.system, self.settings.to_dict(), title)
        self._add("user", text)
        return self._start_reply()

    def edit(self, text: str) -> Turn:
        """The last user message replaced by `text` (its reply goes too), and a new reply."""
        self._drop_last("assistant")
        self._drop_last("user")
        return self.send(text)

    def regenerate(self) -> Turn | None:
        """The last reply replaced by a new one (None: there is no reply yet)."""
        if self.last("assistant") is None:
            return None
        self._drop_last("assistant")
        return self._start_reply()

    def _start_reply(self) -> Turn:
        prompt = self.prompt()  # what the reply answers: everything before it
        self.reply = self._add("assistant", "", "streaming")
        self._saved = time.monotonic()
        return Turn(prompt, self.settings)

    def _add(self, role: str, content: str, status: str = "complete") -> Message:
        message = Message(self.store.add_message(self.id, role, content, status), role, content,
                          status)
        self.messages.append(message)
        return message

    def _drop_last(self, role: str) -> None:
        message = self.last(role)
        if message is not None:
            self.messages.remove(message)
            self.store.delete_message(message.id)

    # ---- the reply as it streams ----------------------------------------------------------

    def hear(self, events: list[Event]) -> Heard:
        """Take in what the worker sent since last time."""
        heard = Heard(progress=[e for e in events if isinstance(e, Prefill)])
        for ready in (e for e in events if isinstance(e, Ready)):
            heard.ready = True
            if ready.context:
                self.numbers["context_used"] = ready.context
        if self.reply is None:
            return heard
        heard.text = "".join(e.text for e in events if isinstance(e, Chunk))
        if heard.text:
            self.extend(heard.text)
        heard.end = next((e for e in events if isinstance(e, Stats)), None)
        if heard.end is not None:
            self.finish(heard.end)
        return heard

    def extend(self, text: str) -> None:
        """More of the reply, saved every second or so: a crash loses at most that."""
        reply = self.reply
        reply.content += text
        if time.monotonic() - self._saved >= SAVE_INTERVAL:
            self.store.update_message(reply.id, reply.content, "streaming")
            self._saved = time.monotonic()

    def finish(self, end: Stats) -> Message:
        """The reply's end, stored with its numbers; a stopped or failed one is 'stopped'."""
        reply, self.reply = self.reply, None
        self.finished = reply
        reply.status = "stopped" if end.finish_reason in ("stopped", "error") else "complete"
        reply.stats = stored_numbers(end)
        self.numbers = dict(reply.stats)  # (a later chat-ready note adds to it)
        self.store.update_message(reply.id, reply.content, reply.status, reply.stats)
        return reply
