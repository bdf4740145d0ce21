"""`mlx-mixtral chat`: the terminal chat app.

The app lays out the widgets and routes events to plain objects: the open chat and what send,
regenerate and edit do to it live in `Conversation` (which keeps the store in step); every
engine call runs on the `EngineWorker`'s one thread, whose events a 20 Hz timer drains into
the widgets. All database writes happen on the UI thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Header, ListView

from ..generation.sampling import SamplingParams
from ..generation.stats import Stats
from ..loading.locate import same_model
from .chat_actions import ChatActions
from .commands import ChatCommands
from .conversation import Conversation, Turn
from .engine import Engine, EngineInfo, Prefill
from .keys import FOOTER_KEYS, KEYS, key_label
from .store import Store
from .widgets import (
    ChatList,
    ExpertsPanel,
    LoadingPanel,
    MessageList,
    PromptInput,
    StatusBar,
    chat_flags,
)
from .worker import EngineWorker

UI_INTERVAL = 0.05  # seconds between UI updates while streaming (about 20 a second)
ACTIONS = {action for _, action, _, _ in KEYS if action}


def prefill_note(progress: Prefill, seconds: float, replying: bool) -> str:
    """The status line while a prompt is read, `seconds` after it started."""
    if progress.done >= progress.total:
        return "generating ... (Esc stops)" if replying else "chat ready"
    left = seconds / max(progress.done, 1) * (progress.total - progress.done)
    what = "reading the prompt" if replying else "reading this chat"
    return (f"{what}: {progress.done}/{progress.total} tokens, about {left:.0f} s left"
            + (" (Esc stops)" if replying else ""))


APP_CSS = """
#main { height: 1fr; }
#sidebar { width: 28; border-right: solid $primary; }
#sidebar.hidden, ExpertsPanel.hidden { display: none; }
#messages { height: 1fr; padding: 0 1; }
PromptInput { height: 5; border: round $accent; }
#loading { height: auto; padding: 1 2; }
#loading.hidden, #progress.hidden { display: none; }
#sidebar ListItem.current { background: $boost; text-style: bold; }
#sidebar Static { text-wrap: nowrap; text-overflow: ellipsis; }
"""


class ChatApp(ChatActions, App):
    TITLE = "mlx-mixtral"
    CSS = APP_CSS
    # Not priority bindings: the message box keeps its own editing keys, and a dialog its Esc.
    BINDINGS = [Binding(key, action, label, show=key in FOOTER_KEYS)
                for key, action, label, _ in KEYS if action]
    COMMANDS = App.COMMANDS | {ChatCommands}

    def __init__(self, engine: Engine, model_name: str, store: Store, system: str | None = None,
                 settings: SamplingParams | None = None, export_dir: Path | None = None,
                 notice: str | None = None, given: Iterable[str] = ()) -> None:
        """`settings`: the sampling of new chats; a model's own defaults replace those not
        `given` by the user."""
        super().__init__()
        self.sampling, self.given = settings or SamplingParams(), frozenset(given)
        self.engine, self.model_name, self.store = engine, model_name, store
        self.conversation = Conversation(store, model_name, system, settings)
        self.worker = EngineWorker(engine)
        self.export_dir = export_dir or Path.cwd()
        self.info: EngineInfo | None = None  # the loaded model (None: loading)
        self.previous: str | None = None  # the model a switch left, to go back to if it fails
        self.notice = notice  # said in the empty chat at start (the first run's hint)
        self.editing = False  # Ctrl+L: the next message replaces the last one
        self.replies_done = 0  # finished replies, for whoever waits on the app (tests)
        # (done, total) as heard, the latest few, for tests and whoever watches the app
        self.prefill_seen: deque[tuple[int, int]] = deque(maxlen=10_000)
        self._prefill_t0 = time.monotonic()

    @property
    def generating(self) -> bool:
        return self.conversation.reply is not None

    # ---- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield ChatList(id="sidebar")
            with Vertical():
                yield LoadingPanel(self.model_name, id="loading")
                yield MessageList(id="messages")
                yield PromptInput(id="prompt")
            yield ExpertsPanel(classes="hidden", id="experts")
        yield StatusBar(id="status")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While a dialog is open, its keys are its own (quitting still works)."""
        return not (isinstance(self.screen, ModalScreen) and action in ACTIONS
                    and action != "quit")

    def on_resize(self, event) -> None:
        self.query_one(ChatList).fit(event.size.width)

    def on_mount(self) -> None:
        self.query_one(MessageList).anchor()
        if self.notice:
            self.query_one(MessageList).note(self.notice)
        self.query_one(StatusBar).show(None, note=f"loading {self.model_name} ...")
        self.set_interval(UI_INTERVAL, self._drain)
        self.refresh_sidebar()
        self._load()

    def _focus_prompt(self) -> None:
        self.query_one(PromptInput).focus()

    def _status(self, note: str = "") -> None:
        if not self.query(StatusBar):  # the app is closing: a late timer tick has no bar
            return
        c = self.conversation
        defaults = self.info.defaults if self.info else None
        self.query_one(StatusBar).show(self.info, c.numbers, note,
                                       chat_flags(c.system, c.settings, defaults))

    # ---- the model ------------------------------------------------------------------------

    def _load(self, name: str | None = None) -> None:
        panel, ui = self.query_one(LoadingPanel), self.call_from_thread
        self.worker.load(lambda fraction: ui(panel.progress, fraction),
                         lambda info: ui(self._loaded, info),
                         lambda message: ui(self._load_failed, message), name)

    def _loaded(self, info: EngineInfo) -> None:
        self.info = info
        self.sub_title = info.describe()  # in the header: no toast over the message box
        self.query_one(LoadingPanel).add_class("hidden")
        experts = self.query_one(ExpertsPanel)
        experts.set_class(not info.is_moe, "hidden")
        if info.is_moe:
            experts.show(None, None, info.top_k)
        self._focus_prompt()
        # The model as the engine names it: a server's model by its id, not the URL.
        self.model_name, self.previous = info.source or self.model_name, None
        self.conversation.use_defaults(info.defaults.apply(self.sampling, self.given))
        self.conversation.set_model(self.model_name)  # a switched model continues the chat
        self._status(note="model loaded")
        self._prefill()

    def _load_failed(self, message: str) -> None:
        failed, previous = self.model_name, self.previous
        if previous is not None:  # a switch failed: say why, and go on with the model we had
            self.notify(message, title=f"Could not switch to {failed}", severity="error")
            self.previous = None
            self._switch_model(previous, fallback=True)
            return
        self.query_one(LoadingPanel).failed(failed, message, f"Press "
                                            f"{key_label('ctrl+o')} to choose another model.")
        self.query_one(StatusBar).show(None, note=f"could not load {failed}: {message}")

    def _switch_model(self, name: str, fallback: bool = False) -> None:
        if name == self.model_name and self.info is not None:
            return
        if not fallback and self.info is not None:
            self.previous = self.model_name
        self.model_name, self.info = name, None
        self.worker.cancel_prefill()
        self.query_one(LoadingPanel).start(name)
        self.query_one(StatusBar).show(None, note=f"loading {name} ...")
        self._load(name)

    # ---- chats ----------------------------------------------------------------------------

    def refresh_sidebar(self) -> None:
        self.query_one(ChatList).show(self.store.list(), self.conversation.id)

    async def on_list_view_selected(self, event: ListView.Selected) -> None:
        conversation_id = getattr(event.item, "conversation_id", None)
        if conversation_id is not None:
            await self.choose_chat(conversation_id)

    async def choose_chat(self, conversation_id: int) -> None:
        """From the list of chats or the command palette."""
        if not self.generating:
            await self.open_conversation(conversation_id)
            self._focus_prompt()

    async def open_conversation(self, conversation_id: int) -> None:
        saved = self.conversation.open(conversation_id)
        if saved is None:
            return
        self.editing = False
        await self.query_one(MessageList).show(self.conversation.messages)
        self._prefill()
        if not same_model(saved.model, self.model_name):
            self.notify(f"This chat was held with {saved.model}; continuing with "
                        f"{self.model_name}.", severity="warning")
        self.refresh_sidebar()
        self._status(note=f"opened “{saved.title}”")

    def _prefill(self) -> None:
        """Have the engine read the open chat now (a new one has nothing to read; a model still
        loading reads it once loaded)."""
        self.worker.cancel_prefill()
        if self.info is not None and self.conversation.messages:
            self._prefill_t0 = time.monotonic()
            self.worker.prefill(self.conversation.prompt())

    async def action_new_chat(self) -> None:
        if self.generating:
            return
        self.conversation.new()
        self.editing = False
        await self.query_one(MessageList).show([])
        self._prefill()
        self.refresh_sidebar()
        self._focus_prompt()
        self._status(note="new chat")

    # ---- replies --------------------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text or self.generating or self.info is None:
            return
        self.query_one(PromptInput).clear()
        new = self.conversation.id is None
        turn = self.conversation.edit(text) if self.editing else self.conversation.send(text)
        self.editing = False
        if new:
            self.refresh_sidebar()
        await self._start(turn)

    async def action_regenerate(self) -> None:
        turn = None if self.generating else self.conversation.regenerate()
        if turn is not None:
            await self._start(turn)

    async def _start(self, turn: Turn) -> None:
        messages = self.query_one(MessageList)
        await messages.show(self.conversation.messages, self.conversation.reply)
        messages.anchor()
        self._prefill_t0 = time.monotonic()
        self.worker.reply(turn)
        self._status(note="generating ... (Esc stops)")

    async def _drain(self) -> None:
        heard = self.conversation.hear(self.worker.take())
        self.prefill_seen += [(p.done, p.total) for p in heard.progress]
        if heard.ready:
            self._status(note="chat ready")
        elif heard.progress:
            self._status(note=prefill_note(heard.progress[-1], time.monotonic()
                                           - self._prefill_t0, self.generating))
        if heard.text:
            await self.query_one(MessageList).last_reply().add(heard.text)
        if heard.end is not None:
            await self._finished(heard.end)

    async def _finished(self, end: Stats) -> None:
        reply = self.conversation.finished
        await self.query_one(MessageList).last_reply().finish(reply.status)
        self.replies_done += 1
        if end.error:
            self.notify(end.error, title="Generation failed", severity="error")
        if end.expert_share is not None and self.info is not None:
            self.query_one(ExpertsPanel).show(end.expert_share, end.balance, self.info.top_k)
        self._status(note="stopped" if reply.status == "stopped" else "")
        self.refresh_sidebar()

    def action_stop(self) -> None:
        if self.generating:
            self.worker.stopping.set()

    def action_edit_last(self) -> None:
        last = self.conversation.last("user")
        if self.generating or last is None:
            return
        self.query_one(PromptInput).edit_text(last.content)
        self.editing = True
        self._status(note="editing the last message: Enter resends it")

    async def action_quit(self) -> None:
        self.worker.close()
        await self._drain()
        self.exit()

    def on_unmount(self) -> None:
        # However the app ends: stop the generation thread before the interpreter exits, or
        # MLX aborts the process on its way out ("terminate called ...").
        self.worker.close()
